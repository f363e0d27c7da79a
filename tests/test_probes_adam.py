"""The batched Adam linear grid equals heads trained alone with torch.optim.Adam; minibatch training of one head."""

import pytest
import torch

from pipeline.probes.adam import Fit, fit_module, train_linear_grid
from pipeline.probes.heads import LinearProbe

LRS = [1e-3, 1e-2, 1e-1, 1e-2, 3e-2, 3e-3]
WDS = [0.0, 1e-2, 1e-1, 0.0, 0.5, 1e-3]
L2 = [False, False, False, True, True, False]


def _data(n=600, d=24, c=4, noise=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    x = means[y] + noise * torch.randn(n, d, generator=g)
    return x[:400], y[:400], x[400:], y[400:]


@pytest.mark.parametrize("patience", [4, 100])
def test_batched_grid_equals_each_head_trained_alone_with_torch_adam(patience):
    """Reference: a plain LinearProbe per head with autograd, torch.optim.Adam (L2 weight decay) and
    LambdaLR cosine decay, same seed (same minibatch order); early stopping must agree too.

    In float64, so that the comparison is sharp: Adam divides by sqrt(v) + eps, which turns the
    float32 rounding differences of two correct implementations into visible ones.
    """
    zt, yt, zv, yv = (t.double() if t.is_floating_point() else t for t in _data())
    fit = Fit(epochs=15, batch_size=64, patience=patience, seed=3)
    res = train_linear_grid(zt, yt, zv, yv, lrs=LRS, weight_decays=WDS, l2_normalize=L2, n_out=4, fit=fit)
    epochs = []
    for h in range(len(LRS)):
        alone = LinearProbe(24, 4, l2_normalize=L2[h]).double()
        info = fit_module(alone, zt, yt, zv, yv, lr=LRS[h], weight_decay=WDS[h], fit=fit, decoupled=False)
        torch.testing.assert_close(res.weight[h], alone.weight.detach().T, atol=1e-8, rtol=1e-7)
        torch.testing.assert_close(res.bias[h], alone.bias.detach(), atol=1e-8, rtol=1e-7)
        assert int(res.best_epoch[h]) == info["best_epoch"]
        assert float(res.val_score[h]) == pytest.approx(info["val_score"])
        epochs.append(info["best_epoch"])
    if patience == 4:  # early stopping really happened, at different epochs for different heads
        assert len(set(epochs)) > 1 and min(epochs) < 15


def test_batched_grid_float32_predicts_like_heads_alone():
    zt, yt, zv, yv = _data()
    fit = Fit(epochs=15, batch_size=64, patience=100, seed=3)
    res = train_linear_grid(zt, yt, zv, yv, lrs=LRS, weight_decays=WDS, l2_normalize=L2, n_out=4, fit=fit)
    for h in range(len(LRS)):
        alone = LinearProbe(24, 4, l2_normalize=L2[h])
        fit_module(alone, zt, yt, zv, yv, lr=LRS[h], weight_decay=WDS[h], fit=fit, decoupled=False)
        batched = LinearProbe(24, 4, l2_normalize=L2[h])
        with torch.no_grad():
            batched.weight.copy_(res.weight[h].T)
            batched.bias.copy_(res.bias[h])
        agree = (batched.predict_standardized(zv) == alone.predict_standardized(zv)).float().mean()
        assert agree >= 0.99


def test_batched_grid_equals_grid_of_one_for_regression():
    zt, _, zv, _ = _data()
    w = torch.randn(24, generator=torch.Generator().manual_seed(1))
    yt, yv = zt @ w + 0.1 * torch.randn(400), zv @ w + 0.1 * torch.randn(200)
    fit = Fit(epochs=10, batch_size=50, patience=3, seed=0, metric="r2")
    res = train_linear_grid(zt, yt, zv, yv, lrs=LRS, weight_decays=WDS, l2_normalize=L2, n_out=1, regression=True,
                            fit=fit)
    for h in (0, 3, 5):
        one = train_linear_grid(zt, yt, zv, yv, lrs=[LRS[h]], weight_decays=[WDS[h]], l2_normalize=[L2[h]], n_out=1,
                                regression=True, fit=fit)
        torch.testing.assert_close(res.weight[h], one.weight[0], atol=1e-5, rtol=1e-4)
    assert float(res.val_score.max()) > 0.95


def test_max_steps_caps_training():
    zt, yt, zv, yv = _data()
    res = train_linear_grid(zt, yt, zv, yv, lrs=LRS, weight_decays=WDS, l2_normalize=L2, n_out=4,
                            fit=Fit(epochs=50, batch_size=64, max_steps=10, patience=50))
    assert res.steps == 10
