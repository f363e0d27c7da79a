"""End to end on the digits demo: pretrained features transfer, random features and raw pixels do worse."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from pipeline.config import ExtractConfig, load_config
from pipeline.extract import run_extract
from pipeline.probes.config import ProbeConfig
from pipeline.probes.job import run_probes
from pipeline.sources.demo import write_digits

N = 1000
LAYERS = "[blocks.2,blocks.4,blocks.6,bn2]"


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    manifest = pd.read_csv(root / "manifest.csv")
    subset = manifest.sample(n=N, random_state=0).sort_values("image_id")
    subset.to_csv(root / "subset.csv", index=False)
    return root


def _extract(digits, store_root, weights):
    cfg = load_config(ExtractConfig, None, ["source.kind=manifest", f"source.uri={digits / 'subset.csv'}",
                                            f"store.root={store_root}", f"encoder.layers={LAYERS}",
                                            f"encoder.weights={weights}", "encoder.pooling=multiscale",
                                            "store.shard_rows=128",
                                            "store.chunk_rows=64"])
    return run_extract(cfg).store_uri


PROBES = ProbeConfig.from_dict({"tasks": ["digit"], "heads": ["linear"],
                                "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 0}})


def _best_test_accuracy(store_uri):
    board = run_probes(store_uri, PROBES).results.leaderboard()
    return float(board.loc[board.task == "digit", "test_accuracy"].iloc[0])


@pytest.mark.slow
def test_pretrained_layers_beat_pixels_and_random_features(ray_local, digits, tmp_path):
    from pipeline.probes.splits import split_task
    from pipeline.stores import FeatureStore

    pretrained_uri = _extract(digits, tmp_path / "s", "imagenet")
    pretrained = _best_test_accuracy(pretrained_uri)
    random_init = _best_test_accuracy(_extract(digits, tmp_path / "s", "random:0"))

    # logistic regression on the raw pixels of the same images, on the probes' own split
    index = FeatureStore(pretrained_uri).index()
    split = split_task(index, PROBES.tasks[0], PROBES.split)
    pixels = np.stack([np.asarray(Image.open(digits / i).convert("L"), np.float32).ravel() / 255
                       for i in index.image_id])
    y = index["digit"].to_numpy()
    clf = LogisticRegression(max_iter=3000).fit(pixels[split.rows["train"]], y[split.rows["train"]])
    raw = clf.score(pixels[split.rows["test"]], y[split.rows["test"]])

    print(f"digit test accuracy: pretrained {pretrained:.3f}, raw pixels {raw:.3f}, random init {random_init:.3f}")
    assert pretrained > raw, (pretrained, raw)
    assert pretrained > random_init, (pretrained, random_init)


def test_linear_probes_match_converged_scikit_learn_on_the_same_split(digits, tmp_path):
    """Real pretrained features, strata's stored split, the same penalties: the validation-selected linear
    head of every (task, layer) cell comes within 0.5 points of scikit-learn's LogisticRegression (fitted to
    convergence, C selected on validation, ties to the smaller C)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.probes.candidates import sklearn_c
    from pipeline.probes.config import LinearHeadSpec
    from pipeline.probes.split_table import read_splits
    from pipeline.stores import FeatureStore

    subset = pd.read_csv(digits / "subset.csv").iloc[:480]
    subset.to_csv(digits / "parity_subset.csv", index=False)
    cfg = load_config(ExtractConfig, None, ["source.kind=manifest", f"source.uri={digits / 'parity_subset.csv'}",
                                            f"store.root={tmp_path}", "encoder.layers=[blocks.4,bn2]",
                                            "encoder.pooling=avg", "run.local_max_images=1000",
                                            "store.shard_rows=256", "store.chunk_rows=128"])
    uri = run_extract(cfg).store_uri
    probes = ProbeConfig.from_dict({"tasks": ["digit", "parity"], "heads": ["linear"], "device": "cpu",
                                    "split": {"train": 0.6, "val": 0.2, "test": 0.2}})
    run = run_probes(uri, probes, use_ray=False)
    store, splits = FeatureStore(uri), read_splits(f"{run.out_uri}/splits.parquet")
    index = store.index()
    pos = pd.Index(index["image_id"])
    wds = sorted(LinearHeadSpec().weight_decays, reverse=True)
    chosen = run.results.table[run.results.table["selected_in_kind"] & (run.results.table["head"] == "linear")]
    for layer in store.layers:
        x = store.layer(layer).astype(np.float64)
        for task in ("digit", "parity"):
            part = splits[(splits["task"] == task) & splits["few_shot_k"].isna()]
            rows = {s: pos.get_indexer(part.loc[part["split"] == s, "image_id"]) for s in ("train", "val", "test")}
            y = index[task].astype(str).to_numpy()
            scaler = StandardScaler().fit(x[rows["train"]])
            z = {s: scaler.transform(x[r]) for s, r in rows.items()}
            best = None
            for wd in wds:
                m = LogisticRegression(C=sklearn_c(wd, len(rows["train"]), len(set(y[rows["train"]]))),
                                       tol=1e-6, max_iter=20_000).fit(z["train"], y[rows["train"]])
                val = m.score(z["val"], y[rows["val"]])
                if best is None or val > best[0]:
                    best = (val, m)
            sk_test = best[1].score(z["test"], y[rows["test"]])
            ours = float(chosen.loc[(chosen["task"] == task) & (chosen["layer"] == layer), "test_accuracy"].iloc[0])
            print(f"{task} {layer}: strata {ours:.4f} scikit-learn {sk_test:.4f}")
            assert ours >= sk_test - 0.005, (task, layer, ours, sk_test)
