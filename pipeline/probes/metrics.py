"""Probe metrics: numpy versions for reporting, batched torch versions for per-epoch model selection."""

from __future__ import annotations

import numpy as np
import torch

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
REGRESSION_METRICS = ("r2", "mae")


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches (NaN when empty)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Recall of each class present in y_true: {class: accuracy on its rows}."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return {c.item() if hasattr(c, "item") else c: float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)}


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in y_true (sklearn's definition)."""
    recalls = list(per_class_accuracy(y_true, y_pred).values())
    return float(np.mean(recalls)) if recalls else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean F1 over the labels seen in y_true or y_pred (sklearn's default labels)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if not len(y_true):
        return float("nan")
    f1s = []
    for c in np.unique(np.concatenate([y_true, y_pred])):
        tp = np.sum((y_true == c) & (y_pred == c))
        denom = np.sum(y_true == c) + np.sum(y_pred == c)
        f1s.append(2.0 * tp / denom if denom else 0.0)
    return float(np.mean(f1s))


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination (NaN when fewer than 2 rows)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if len(y_true) < 2:
        return float("nan")
    ss_tot = np.sum((y_true - y_true.mean()) ** 2)
    ss_res = np.sum((y_true - y_pred) ** 2)
    return float(1.0 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute error (NaN when empty)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    return float(np.mean(np.abs(y_true - y_pred))) if len(y_true) else float("nan")


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(y_true, y_pred), "balanced_accuracy": balanced_accuracy(y_true, y_pred),
            "macro_f1": macro_f1(y_true, y_pred)}


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {"r2": r2_score(y_true, y_pred), "mae": mae(y_true, y_pred)}


def batched_score(pred: torch.Tensor, y: torch.Tensor, *, metric: str, n_classes: int = 0) -> torch.Tensor:
    """One score per head: `pred` is (H, n) class codes (or values for "r2"), `y` is (n,). Higher is better."""
    if metric == "r2":
        ss_tot = ((y - y.mean()) ** 2).sum().clamp_min(1e-12)
        return 1.0 - ((pred - y) ** 2).sum(1) / ss_tot
    correct = (pred == y).float()
    if metric == "accuracy":
        return correct.mean(1)
    onehot = torch.nn.functional.one_hot(y, n_classes).float()  # (n, C)
    support = onehot.sum(0)  # (C,)
    tp = correct @ onehot  # (H, C)
    if metric == "balanced_accuracy":
        present = support > 0
        return (tp[:, present] / support[present]).mean(1)
    if metric == "macro_f1":
        predicted = torch.nn.functional.one_hot(pred, n_classes).float().sum(1)  # (H, C)
        denom = predicted + support
        seen = denom > 0
        f1 = torch.where(seen, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))
        return f1.sum(1) / seen.sum(1)
    raise ValueError(f"metric {metric!r} unknown; valid: {list(CLASSIFICATION_METRICS) + ['r2']}")
