"""The batched linear grid equals heads trained alone; one group's selection, test metrics and refusals."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.probes.config import ProbeConfig
from pipeline.probes.grid import Fit, fit_module, train_group, train_linear_grid
from pipeline.probes.heads import LinearProbe
from pipeline.probes.splits import split_task

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


def _split_and_features(n=900, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    means = rng.normal(size=(3, 32)) * 1.2
    x = (means[y] + rng.normal(size=(n, 32))).astype(np.float16)
    index = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "label": np.array(["a", "b", "c"])[y]})
    return index, x


CFG = {"tasks": ["label"], "device": "cpu", "epochs": 20, "batch_size": 128, "patience": 5,
       "heads": [{"kind": "linear", "lrs": [1e-3, 1e-2], "weight_decays": [0.0, 1e-2]},
                 {"kind": "linear", "l2_normalize": True, "lrs": [1e-2]},
                 {"kind": "knn", "ks": [1, 15]}, {"kind": "prototype"}, "auto"],
       "few_shot": [None, 4]}


def test_train_group_selects_on_val_and_tests_only_selected():
    index, x = _split_and_features()
    cfg = ProbeConfig.from_dict(CFG)
    split = split_task(index, "label", cfg.split)
    out = train_group(x, split, "layer0", cfg)
    df = pd.DataFrame(out.rows)
    assert (df["status"] == "ok").all()
    for k, g in df.groupby(df["few_shot"].fillna(-1)):
        assert g["selected"].sum() == 1
        best = g.loc[g["selected"]].iloc[0]
        assert best["val_score"] == g["val_score"].max()
        assert g.groupby("head")["selected_in_kind"].sum().eq(1).all()
        assert g.loc[~g["selected_in_kind"], "test_accuracy"].isna().all()  # test computed once, for the chosen
        assert g.loc[g["selected_in_kind"], "test_accuracy"].notna().all()
        linear = g[g["head"] == "linear"]
        assert (linear["batch_heads"] == len(linear)).all()  # all linear heads in one batched computation
    full = df[df["few_shot"].isna()]
    assert full["n_train"].iloc[0] == len(split.rows["train"])
    four = df[df["few_shot"] == 4]
    assert (four["n_train"] == 12).all()
    auto = df[df["requested"] == "auto"]
    assert set(auto.loc[auto["few_shot"] == 4, "head"]) == {"prototype"}  # 4 per class -> prototype
    assert set(auto.loc[auto["few_shot"].isna(), "head"]) == {"mlp"}  # ~210 per class -> MLP
    assert auto["auto_reason"].str.contains("training samples per class").all()
    assert len(out.heads) == 2 and {h.meta["few_shot"] for h in out.heads} == {None, 4}
    assert json.loads(full["hparams"].iloc[0])


def test_train_group_is_deterministic():
    index, x = _split_and_features()
    cfg = ProbeConfig.from_dict(CFG)
    split = split_task(index, "label", cfg.split)
    a = pd.DataFrame(train_group(x, split, "l", cfg).rows).drop(columns="train_time_s")
    b = pd.DataFrame(train_group(x, split, "l", cfg).rows).drop(columns="train_time_s")
    pd.testing.assert_frame_equal(a, b)


def test_train_group_refuses_non_finite_features():
    index, x = _split_and_features()
    x[5, 3] = np.nan
    x[7, 0] = np.inf
    cfg = ProbeConfig.from_dict(CFG)
    with pytest.raises(ValueError, match=r"2 rows have NaN/inf features, .*re-extract the layer or drop it"):
        train_group(x, split_task(index, "label", cfg.split), "bad", cfg)
