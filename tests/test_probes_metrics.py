"""Metrics agree with scikit-learn; batched (per-head) versions agree with the numpy ones."""

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from pipeline.probes import metrics as M


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 6, 300))  # class 5 only predicted
    assert M.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p))
    assert M.balanced_accuracy(y, p) == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert M.macro_f1(y, p) == pytest.approx(skm.f1_score(y, p, average="macro"))
    per = M.per_class_accuracy(y, p)
    assert per == pytest.approx(dict(zip(range(5), skm.recall_score(y, p, average=None, labels=range(5)))))


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.normal(size=100)
    p = y + rng.normal(scale=0.5, size=100)
    assert M.r2_score(y, p) == pytest.approx(skm.r2_score(y, p))
    assert M.mae(y, p) == pytest.approx(skm.mean_absolute_error(y, p))


@pytest.mark.parametrize("metric", ["accuracy", "balanced_accuracy", "macro_f1"])
def test_batched_scores_match_per_head(metric):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    preds = np.stack([np.where(rng.random(200) < q, y, rng.integers(0, 4, 200)) for q in (0.2, 0.5, 0.9)])
    got = M.batched_score(torch.tensor(preds), torch.tensor(y), metric=metric, n_classes=4).numpy()
    want = [getattr(M, metric)(y, p) for p in preds]
    assert got == pytest.approx(want, abs=1e-6)


def test_empty_inputs_give_nan():
    assert np.isnan(M.accuracy([], [])) and np.isnan(M.macro_f1([], [])) and np.isnan(M.r2_score([1.0], [1.0]))
