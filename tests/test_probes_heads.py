"""Heads learn a separable task, stay at chance on shuffled labels; the auto head choice; standardisation."""

import numpy as np
import pytest
import torch

from pipeline.probes.adam import Fit, fit_module, train_linear_grid
from pipeline.probes.heads import (KNNProbe, LinearProbe, MLPProbe, PrototypeProbe, build_head, choose_head,
                                   fit_standardizer)

C, D = 4, 16


def _blobs(n=800, shuffle=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g) * 4.0
    y = torch.randint(0, C, (n,), generator=g)
    x = means[y] + torch.randn(n, D, generator=g) + 3.0  # offset: standardisation has work to do
    if shuffle:
        y = y[torch.randperm(n, generator=g)]
    mean, std = fit_standardizer(x[: n // 2])
    z = (x - mean) / std
    return (z[: n // 2], y[: n // 2], z[n // 2:], y[n // 2:]), (mean, std), x


def _val_acc(head, z_val, y_val):
    return float((head.predict_standardized(z_val) == y_val).float().mean())


def _train(kind, data):
    zt, yt, zv, yv = data
    fit = Fit(epochs=40, batch_size=128, patience=40, seed=0)
    torch.manual_seed(0)
    if kind == "linear":
        res = train_linear_grid(zt, yt, zv, yv, lrs=[1e-2], weight_decays=[1e-4], l2_normalize=[False], n_out=C,
                                fit=fit)
        head = LinearProbe(D, C)
        with torch.no_grad():
            head.weight.copy_(res.weight[0].T)
            head.bias.copy_(res.bias[0])
        return head
    if kind == "mlp":
        head = MLPProbe(D, C, hidden_sizes=(64,), dropout=0.1)
        fit_module(head, zt, yt, zv, yv, lr=1e-2, weight_decay=1e-4, fit=fit)
        return head
    if kind.startswith("prototype"):
        head = PrototypeProbe(D, C, metric=kind.split("-")[1], learnable=kind.endswith("learn"))
        head.set_class_means(zt, yt)
        if head.prototypes.requires_grad:
            fit_module(head, zt, yt, zv, yv, lr=1e-2, weight_decay=0.0, fit=fit)
        return head
    return KNNProbe(D, C, k=5, cosine=kind == "knn-cos").set_bank(zt, yt)


KINDS = ["linear", "mlp", "prototype-cosine", "prototype-euclidean", "prototype-euclidean-learn", "knn-cos",
         "knn-l2"]


@pytest.mark.parametrize("kind", KINDS)
def test_head_learns_separable_task(kind):
    data, _, _ = _blobs()
    assert _val_acc(_train(kind, data), data[2], data[3]) >= 0.99


@pytest.mark.parametrize("kind", KINDS)
def test_head_stays_at_chance_on_shuffled_labels(kind):
    data, _, _ = _blobs(shuffle=True)
    acc = _val_acc(_train(kind, data), data[2], data[3])
    assert abs(acc - 1 / C) < 0.1, acc


def test_head_applies_its_own_standardisation_to_raw_features():
    data, (mean, std), x = _blobs()
    head = _train("linear", data).set_standardization(mean, std)
    raw_pred = head.predict(x[400:].numpy().astype(np.float16))
    assert (raw_pred == head.predict_standardized(data[2]).numpy()).mean() > 0.995
    meta = {"kind": "linear", "spec": {"l2_normalize": False}, "dim": D, "n_out": C, "task_type": "classification",
            "hparams": {}}
    clone = build_head(meta, head.state_dict())
    assert np.array_equal(clone.predict(x[400:]), head.predict(x[400:]))


@pytest.mark.parametrize("per_class, kind", [(1, "prototype"), (9.9, "prototype"), (10, "linear"), (60, "linear"),
                                             (149, "linear"), (150, "mlp"), (5000, "mlp")])
def test_choose_head_by_samples_per_class(per_class, kind):
    got, reason = choose_head(per_class)
    assert got == kind
    assert f"{per_class:.1f} training samples per class" in reason and kind.replace("mlp", "MLP") in reason


def test_constant_training_features_get_std_one_like_scikit_learn():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    train = rng.normal(size=(5, 4)).astype(np.float32)
    train[:, 1] = 3.0  # constant on a few-shot training set ...
    train[:, 2] = 1e-3 + np.float32(1e-12) * np.arange(5)  # ... or constant up to rounding
    held_out = rng.normal(size=(8, 4)).astype(np.float32)  # ... but not elsewhere
    mean, std = fit_standardizer(torch.from_numpy(train))
    assert std[1] == 1.0 and std[2] == 1.0
    ref = StandardScaler().fit(train)
    np.testing.assert_allclose(((torch.from_numpy(held_out) - mean) / std).numpy(), ref.transform(held_out),
                               rtol=1e-5, atol=1e-5)  # z = x - mean there, not (x - mean) * 1e6
