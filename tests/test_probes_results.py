"""Results written through fsspec; a saved head reloads (safetensors) and reproduces predictions."""

import json

import fsspec
import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

from pipeline.probes import InMemoryFeatureTable, ProbeConfig, load_head, run_probe_grid


@pytest.fixture(scope="module")
def results():
    rng = np.random.default_rng(0)
    n = 500
    y = rng.integers(0, 3, n)
    feats = {"a": (rng.normal(size=(3, 20))[y] * 1.5 + rng.normal(size=(n, 20)) + 5).astype(np.float16),
             "b": rng.normal(size=(n, 6)).astype(np.float16)}
    index = pd.DataFrame({"image_id": [f"x{i}" for i in range(n)], "kind": np.array(["cat", "dog", "owl"])[y],
                          "size": feats["a"][:, 0].astype(np.float64) * 2 + rng.normal(size=n) * 0.1})
    cfg = ProbeConfig.from_dict({"tasks": ["kind", "size"], "device": "cpu", "epochs": 60, "few_shot": [None, 3],
                                 "heads": [{"kind": "linear", "lrs": [1e-2, 1e-1]}, {"kind": "mlp", "hidden_sizes": [16]}, "prototype",
                                           {"kind": "knn", "ks": [3]}]})
    table = InMemoryFeatureTable(feats, index)
    return run_probe_grid(table, cfg, use_ray=False), table


def test_write_and_reload_reproduces_predictions(results, tmp_path):
    res, table = results
    written = res.write(str(tmp_path))
    assert written[-1].endswith("_SUCCESS")
    df = pd.read_parquet(tmp_path / "results.parquet")
    assert len(df) == len(res.table) and {"task", "layer", "head", "hparams", "val_score", "selected"} <= set(df)
    assert json.loads((tmp_path / "config.json").read_text())["tasks"][0]["name"] == "kind"
    assert len(res.heads) == 2 * 2 * 2  # (task, layer, few-shot k)
    x = table.features("a")
    for h in res.heads:
        m = h.meta
        path = tmp_path / "heads" / m["task"] / m["layer"] / ("all" if m["few_shot"] is None else "k3")
        state = safetensors.torch.load_file(str(path / "head.safetensors"))
        sidecar = json.loads((path / "head.json").read_text())
        assert sidecar["classes"] == m["classes"] and len(sidecar["standardization"]["mean"]) == x.shape[1] or \
            m["layer"] == "b"
        torch.testing.assert_close(state["mean"], torch.tensor(sidecar["standardization"]["mean"]))
        head, meta = load_head(str(path / "head.safetensors"))
        assert meta["kind"] == m["kind"]
        feats = table.features(m["layer"])
        want = res.head(m["task"], m["layer"], m["few_shot"]).predict(feats)
        np.testing.assert_allclose(head.predict(feats), want, rtol=1e-5)
    # a selected classification head on the informative layer predicts the labels it was trained on
    head, meta = load_head(str(tmp_path / "heads" / "kind" / "a" / "all" / "head.safetensors"))
    labels = np.asarray(meta["classes"])[head.predict(x)]
    assert (labels == table.index()["kind"].to_numpy()).mean() > 0.9


def test_heads_of_names_that_slug_alike_get_their_own_files(tmp_path):
    """'日本' and '中国' (or '$x$' and '#x#') must not share a file, and '..' must stay under heads/."""
    from pipeline.probes.results import head_path

    rng = np.random.default_rng(1)
    n, names = 120, ["日本", "中国", "..", "$x$", "#x#"]
    y = rng.integers(0, 2, (n, len(names)))
    index = pd.DataFrame({"image_id": [f"x{i}" for i in range(n)],
                          **{t: np.array(["no", "yes"])[y[:, j]] for j, t in enumerate(names)}})
    feats = {"l": (y @ rng.normal(size=(len(names), 8)) + rng.normal(size=(n, 8)) * 0.3).astype(np.float16)}
    cfg = ProbeConfig.from_dict({"tasks": names, "device": "cpu", "heads": ["prototype"]})
    res = run_probe_grid(InMemoryFeatureTable(feats, index), cfg, use_ray=False)
    res.write(str(tmp_path / "out"))
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("head.json"))
    assert len(files) == len(names) and all(p.parts[:2] == ("out", "heads") for p in files)
    for task in names:
        _, meta = load_head(str(tmp_path / "out" / f"{head_path(task, 'l', None)}.safetensors"))
        assert meta["task"] == task
    assert head_path("digit", "blocks.2", 5) == "heads/digit/blocks.2/k5/head"  # safe names stay readable


def test_write_to_memory_filesystem(results):
    res, _ = results
    res.write("memory://probe-results/run1")
    fs = fsspec.filesystem("memory")
    assert fs.exists("/probe-results/run1/_SUCCESS")
    head, _ = load_head("memory://probe-results/run1/heads/size/a/all/head.safetensors")
    assert head.regression


@pytest.mark.s3
def test_write_to_s3_with_explicit_storage_options(results, s3_bucket, monkeypatch):
    # the endpoint and keys come only from storage_options, never from the environment
    for var in ("STRATA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    res, table = results
    out = s3_bucket.url("probes", "run1")
    written = res.write(out, storage_options=s3_bucket.storage_options)
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    assert written[-1].endswith("_SUCCESS") and fs.exists(f"{s3_bucket.name}/probes/run1/_SUCCESS")
    assert len(fs.find(f"{s3_bucket.name}/probes/run1/heads")) == 2 * len(res.heads)
    head, meta = load_head(f"{out}/heads/kind/a/all/head.safetensors", storage_options=s3_bucket.storage_options)
    want = res.head("kind", "a", None).predict(table.features("a"))
    np.testing.assert_array_equal(head.predict(table.features("a")), want)


def test_leaderboard_reports_best_layer_and_test_of_it(results):
    res, _ = results
    board = res.leaderboard()
    row = board[(board["task"] == "kind") & board["few_shot"].isna()].iloc[0]
    assert row["best_layer"] == "a" and row["test_accuracy"] > 0.9 and row["layers_compared"] == 2
    reg = board[(board["task"] == "size") & board["few_shot"].isna()].iloc[0]
    assert reg["metric"] == "r2" and reg["best_layer"] == "a" and reg["test_r2"] > 0.9
    assert "best_layer" in board.to_string()
