"""One (task, layer) group: selection on validation (ties to the stronger penalty), test metrics once, refusals;
a layer's tasks share the L-BFGS basis."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.probes import candidates
from pipeline.probes.config import ProbeConfig
from pipeline.probes.grid import train_group, train_layer
from pipeline.probes.splits import split_task


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


def test_ties_on_validation_go_to_the_stronger_penalty():
    index, x = _split_and_features(seed=1)
    cfg = ProbeConfig.from_dict({"tasks": ["label"], "device": "cpu",
                                 "heads": [{"kind": "linear", "weight_decays": [1e-4, 1e-3, 1e-2, 1e-1]}]})
    df = pd.DataFrame(train_group(x, split_task(index, "label", cfg.split), "l", cfg).rows)
    wd = df["hparams"].map(lambda h: json.loads(h)["weight_decay"])
    assert list(wd) == [1e-1, 1e-2, 1e-3, 1e-4]  # listed strongest first
    best = df["val_score"].max()
    assert wd[df["selected"]].iloc[0] == wd[df["val_score"] == best].max()
    assert df["converged"].all() and (df["steps"] > 0).all()
    c = df["hparams"].map(lambda h: json.loads(h)["C"])
    n = len(split_task(index, "label", cfg.split).rows["train"])
    np.testing.assert_allclose(c * wd * n, 1.0)  # scikit-learn's C of each penalty (3 classes: multinomial)


def test_tasks_of_a_layer_on_the_same_rows_share_one_basis(monkeypatch):
    index, x = _split_and_features()
    index["upper"] = index["label"].str.upper()
    calls = []
    real = candidates.row_basis
    monkeypatch.setattr(candidates, "row_basis", lambda z: (calls.append(len(z)), real(z))[1])
    cfg = ProbeConfig.from_dict({"tasks": ["label", "upper"], "device": "cpu", "heads": ["linear"]})
    splits = {t: split_task(index, t, cfg.split) for t in ("label", "upper")}
    out = train_layer(x, splits, "l", cfg)
    assert set(out) == {"label", "upper"} and len(calls) == 1
    a, b = (pd.DataFrame(out[t].rows) for t in ("label", "upper"))
    np.testing.assert_allclose(a["val_score"], b["val_score"])  # the same problem, relabelled


def test_knn_ks_above_the_training_rows_are_recorded_as_capped_and_said_once(caplog):
    from pipeline.probes import InMemoryFeatureTable, run_probe_grid

    index, x = _split_and_features()
    index.loc[index.index[index["label"] == "c"][2:], "label"] = "b"  # two images of class c
    cfg = ProbeConfig.from_dict({"tasks": ["label"], "device": "cpu", "few_shot": [4, None],
                                 "heads": [{"kind": "knn", "ks": [1, 5, 10, 5000]}]})
    table = InMemoryFeatureTable({"l": x, "l2": x[:, ::-1].copy(), "l3": x * 2}, index)
    with caplog.at_level("INFO", logger="pipeline.probes"):
        results = run_probe_grid(table, cfg, use_ray=False)
    df = results.table[results.table["few_shot"].notna()]
    assert (df["n_train"] == 9).all()  # 4 per class, but c has 1 training row at most: all of it
    ks = [json.loads(h)["k"] for h in df[df["layer"] == "l"]["hparams"]]
    assert ks == [1, 5, 9]  # 10 and 5000 are both a vote over the 9 rows: one head, recorded as k=9
    assert (df["batch_heads"] == 3).all() and df.groupby("layer")["selected"].sum().eq(1).all()
    msgs = [r.getMessage() for r in caplog.records]
    capped = [m for m in msgs if "capped" in m]  # once per (task, training set), not per layer
    assert len(capped) == 2 and "few-shot k=4: knn ks [10, 5000] exceed the 9 training rows" in capped[0]
    assert "'label': knn ks [5000] exceed the" in capped[1]
    assert sum("few-shot k=4, but classes" in m for m in msgs) == 1

    index, x = _split_and_features()
    split = split_task(index, "label", cfg.split)
    only_big = ProbeConfig.from_dict({"tasks": ["label"], "device": "cpu", "few_shot": [2],
                                      "heads": [{"kind": "knn", "ks": [10, 50]}]})
    out = train_group(x, split, "l", only_big)
    (head,) = out.heads
    assert head.meta["hparams"]["k"] == 6 and json.loads(out.rows[0]["hparams"])["k"] == 6
