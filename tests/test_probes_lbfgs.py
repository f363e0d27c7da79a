"""L-BFGS linear probes reach scikit-learn's converged LogisticRegression (and Ridge), in either basis."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from pipeline.probes.candidates import sklearn_c
from pipeline.probes.lbfgs import SolverSettings, fit_logistic_grid, fit_ridge_grid, row_basis

TIGHT = SolverSettings(tol=1e-8, max_iter=5000)


def _blobs(n, d, c, seed=0, noise=2.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    x = rng.normal(size=(c, d))[y] + noise * rng.normal(size=(n, d))
    z = (x - x.mean(0)) / x.std(0)
    return torch.tensor(z), torch.tensor(y)


@pytest.mark.parametrize("n,d,c", [(200, 30, 4), (80, 300, 3), (150, 20, 2)])  # n > d, d > n, binary
def test_every_penalty_reaches_scikit_learns_optimum(n, d, c):
    z, y = _blobs(n, d, c, seed=d)
    wds = [1e-1, 1e-2, 1e-3]
    fit = fit_logistic_grid(z, y, weight_decays=wds, n_classes=c, settings=TIGHT)
    assert fit.converged.all()
    for h, wd in enumerate(wds):
        sk = LogisticRegression(C=sklearn_c(wd, n, c), tol=1e-10, max_iter=100_000).fit(z.numpy(), y.numpy())
        W, b = fit.weight[h].numpy(), fit.bias[h].numpy()
        if c == 2:  # binomial: w = w1 - w0
            W, b = (W[:, 1] - W[:, 0])[None], np.array([b[1] - b[0]])
        else:
            W, b = W.T, b - b.mean()  # the multinomial bias is unpenalised: defined up to a constant
            sk.intercept_ = sk.intercept_ - sk.intercept_.mean()
        scale = np.abs(sk.coef_).max()
        assert np.abs(W - sk.coef_).max() <= 1e-4 * scale, wd
        assert np.abs(b - sk.intercept_).max() <= 1e-4 * max(scale, 1.0), wd


def test_l2_normalised_rows_equal_a_fit_on_normalised_features():
    z, y = _blobs(120, 40, 3, seed=5)
    zn = z / z.norm(dim=1, keepdim=True) * np.sqrt(z.shape[1])
    a = fit_logistic_grid(z, y, weight_decays=[1e-2], n_classes=3, l2_normalize=True, settings=TIGHT)
    b = fit_logistic_grid(zn, y, weight_decays=[1e-2], n_classes=3, settings=TIGHT)
    torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)


def test_float32_basis_of_a_wide_layer_predicts_like_float64():
    z, y = _blobs(100, 500, 4, seed=2)
    f64 = fit_logistic_grid(z, y, weight_decays=[1e-3], n_classes=4)
    f32 = fit_logistic_grid(z.float(), y, weight_decays=[1e-3], n_classes=4)
    agree = ((z @ f64.weight[0]).argmax(1) == (z.float() @ f32.weight[0]).argmax(1)).double().mean()
    assert agree >= 0.99 and f32.weight.dtype == torch.float32


def test_basis_spans_the_rows_and_maps_back_exactly():
    for n, d in ((50, 200), (200, 50)):
        z, _ = _blobs(n, d, 2)
        b = row_basis(z)
        w = torch.randn(1, b.Q.shape[1], 3, dtype=z.dtype)
        torch.testing.assert_close(z @ b.to_features(w)[0], b.Q @ w[0])  # logits the same in either basis
        assert b.Q.shape[1] <= min(n, d)


def test_max_iter_stops_a_head_and_says_it_did_not_converge():
    z, y = _blobs(200, 30, 4)
    fit = fit_logistic_grid(z, y, weight_decays=[1e-1, 1e-6], n_classes=4, settings=SolverSettings(tol=1e-9,
                                                                                                     max_iter=3))
    assert fit.iterations.tolist() == [3, 3] and not fit.converged.any()


def test_ridge_grid_is_scikit_learns_ridge():
    rng = np.random.default_rng(0)
    for n, d in ((80, 120), (150, 10)):
        z = torch.tensor(rng.normal(size=(n, d)))
        t = z[:, 0] * 2 + 0.1 * torch.tensor(rng.normal(size=n))
        fit = fit_ridge_grid(z, t, weight_decays=[1e-2, 1.0])
        for h, lam in enumerate([1e-2, 1.0]):
            ref = Ridge(alpha=n * lam / 2).fit(z.numpy(), t.numpy())  # mean squared error + lam/2 ||w||^2
            np.testing.assert_allclose(fit.weight[h][:, 0].numpy(), ref.coef_, atol=1e-8)
            assert float(fit.bias[h][0]) == pytest.approx(ref.intercept_, abs=1e-8)


def test_a_tight_tolerance_on_float32_features_is_reached_in_float64():
    z, y = _blobs(300, 20, 3, seed=4, noise=1.0)
    fit = fit_logistic_grid(z.float(), y, weight_decays=[1e-3], n_classes=3, settings=SolverSettings(tol=1e-7))
    assert bool(fit.converged[0]) and fit.weight.dtype == torch.float32


def test_separable_few_shot_heads_converge_whatever_else_is_in_the_batch():
    """Five rows a class in 60 dims: every penalty converges, alone or batched with the others (float32 steps
    used to stall here on rounding, and one head's failed curvature test froze the others' memories)."""
    z, y = _blobs(10, 60, 2, seed=8, noise=0.5)
    wds = [1.0, 1e-1, 1e-2, 1e-3, 3e-4, 1e-4, 1e-5, 1e-6]
    batched = fit_logistic_grid(z.float(), y, weight_decays=wds, n_classes=2)
    assert batched.converged.all() and int(batched.iterations.max()) < 100
    for h, wd in enumerate(wds):
        alone = fit_logistic_grid(z.float(), y, weight_decays=[wd], n_classes=2)
        assert bool(alone.converged[0])
        agree = ((z.float() @ alone.weight[0]).argmax(1) == (z.float() @ batched.weight[h]).argmax(1)).all()
        assert bool(agree)


def test_a_warm_start_reaches_the_same_optimum_in_fewer_iterations():
    z, y = _blobs(200, 30, 4, seed=5)
    loose = fit_logistic_grid(z, y, weight_decays=[1e-4], n_classes=4, settings=SolverSettings(tol=1e-3))
    cold = fit_logistic_grid(z, y, weight_decays=[1e-4], n_classes=4, settings=TIGHT)
    warm = fit_logistic_grid(z, y, weight_decays=[1e-4], n_classes=4, settings=TIGHT, start=loose.start)
    assert warm.converged.all() and warm.iterations[0] < cold.iterations[0]
    scale = cold.weight.abs().max()
    assert (warm.weight - cold.weight).abs().max() <= 1e-4 * scale
    assert ((warm.bias - warm.bias.mean()) - (cold.bias - cold.bias.mean())).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("polish_tol", [1e-8, None])
def test_selection_picks_among_polished_heads(polish_tol):
    """With a loose tol, the validation leader is refitted to polish_tol: the selected head is scikit-learn's optimum
    for its C. Without polishing, the same leader is wherever the loose tol stopped it."""
    from pipeline.probes.candidates import GroupData, train_candidates
    from pipeline.probes.heads import fit_standardizer
    from pipeline.probes.metrics import accuracy
    from pipeline.probes import ProbeConfig

    z_all, y_all = _blobs(300, 40, 3, seed=11, noise=1.5)
    z_all, idx = z_all.float(), np.arange(300)
    tr, va = idx[:200], idx[200:]
    mean, std = fit_standardizer(z_all[tr])
    z = {"train": (z_all[tr] - mean) / std, "val": (z_all[va] - mean) / std}
    y = {"train": y_all[tr], "val": y_all[va]}
    config = ProbeConfig.from_dict({"tasks": ["t"], "heads": [{"kind": "linear", "weight_decays": [1e-1, 1e-3, 1e-5],
                                                                "tol": 1e-2, "polish_tol": polish_tol}]})
    data = GroupData(z, y, 3, False, lambda h: h.set_standardization(mean, std), {}, b"",
                     lambda p: accuracy(y["val"].numpy(), p))
    cands, _ = train_candidates(data, config, None, 3)
    cands = [c for c in cands if c.kind == "linear"]
    scores = [accuracy(y["val"].numpy(), c.val_pred) for c in cands]
    leader = cands[max(range(len(cands)), key=lambda i: (scores[i], -i))]
    wd = leader.hparams["weight_decay"]
    sk = LogisticRegression(C=sklearn_c(wd, 200, 3), tol=1e-10, max_iter=100_000).fit(z["train"].double().numpy(),
                                                                                     y["train"].numpy())
    gap = np.abs(leader.head.weight.detach().double().numpy() - sk.coef_).max() / np.abs(sk.coef_).max()
    if polish_tol:
        assert leader.converged and gap <= 1e-4, (wd, gap)
    else:
        assert gap > 1e-2, (wd, gap)


def test_the_final_gradient_bounds_the_distance_to_the_optimum():
    """What lets selection skip refitting strongly penalised heads: ||w - w*|| <= ||g|| / lambda."""
    z, y = _blobs(200, 30, 4, seed=3)
    wds = [1.0, 1e-1, 1e-2, 1e-3, 1e-5]
    loose = fit_logistic_grid(z, y, weight_decays=wds, n_classes=4, settings=SolverSettings(tol=1e-3))
    tight = fit_logistic_grid(z, y, weight_decays=wds, n_classes=4, settings=TIGHT)
    dist = (loose.start[0] - tight.start[0]).flatten(1).norm(dim=1)
    assert (dist > 0).all() and (dist <= loose.grad_norm / torch.tensor(wds, dtype=dist.dtype)).all()
    near = loose.near_optimum(wds, 1e-2)
    assert near[0] and not near[-1], near
