"""Scores per (task, layer) on the probes' training rows, and rank agreement with accuracy across layers."""
import numpy as np
import pandas as pd
import pytest

from pipeline.analysis.score_table import layer_scores, rank_agreement, score_agreement
from pipeline.probes import InMemoryFeatureTable
from pipeline.probes.config import SplitSpec
from pipeline.probes.splits import split_task


def _table(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    means = rng.normal(size=(4, 16))
    feats = {f"l{k}": (means[y] * s + rng.normal(size=(n, 16))).astype(np.float16)
             for k, s in enumerate([0.0, 0.5, 1.0, 2.0])}  # class signal grows with depth
    index = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "label": y.astype(str)})
    return InMemoryFeatureTable(feats, index)


def test_every_score_ranks_layers_by_their_class_signal():
    table = _table()
    splits = {"label": split_task(table.index(), "label", SplitSpec())}
    scores = layer_scores(table, splits, table.layers)
    assert list(scores["layer"]) == ["l0", "l1", "l2", "l3"]
    assert (scores["n_rows"] == len(splits["label"].rows["train"])).all()
    for name in ("logme", "nleep", "h_score", "knn_accuracy"):
        assert scores[name].is_monotonic_increasing, (name, scores[name].tolist())
    acc = pd.DataFrame({"task": "label", "layer": table.layers, "val_accuracy": [0.25, 0.5, 0.7, 0.9],
                        "test_accuracy": [0.3, 0.5, 0.6, 0.95]})
    agree = score_agreement(scores, acc)
    assert set(agree["score"]) == {"logme", "nleep", "h_score", "knn_accuracy"}
    assert (agree["kendall_tau_val"] >= 0.9).all()  # kNN accuracy may tie at the top
    assert (agree["n"] == 4).all()


def test_rank_agreement_is_undefined_on_too_few_layers_or_a_constant():
    assert np.isnan(rank_agreement([1, 2], [0.1, 0.2])["kendall_tau"])
    assert np.isnan(rank_agreement([1, 1, 1], [0.1, 0.2, 0.3])["kendall_tau"])  # LEEP: one value per task
    r = rank_agreement([3, 2, 1, np.nan], [0.1, 0.2, 0.3, 0.4])
    assert r["kendall_tau"] == pytest.approx(-1.0) and r["n"] == 3
