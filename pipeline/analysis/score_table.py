"""Transferability scores per (task, layer) on the probes' own training rows, and how well each ranks the layers.

The rows are a task's training split (the same rows its probes train on; kNN accuracy is scored
on the validation split), standardised with their own statistics like the probes' inputs, and at
most `SCORE_SAMPLE` of them (seeded) so that a score costs the same on a million-row store.
Tasks whose training rows are the same share one eigen-basis per layer.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from . import transferability as T

log = logging.getLogger(__name__)

SCORES = ("logme", "nleep", "h_score", "knn_accuracy")
SCORE_LABELS = {"logme": "LogME", "nleep": "NLEEP", "h_score": "H-score", "knn_accuracy": "kNN accuracy",
                "leep": "LEEP"}
SCORE_SAMPLE = 4000
MIN_LAYERS_FOR_RANKING = 3


def _rows(split: Any, name: str, cap: int | None, seed: int) -> np.ndarray:
    rows = np.asarray(split.rows[name])
    if cap is not None and len(rows) > cap:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=cap, replace=False))
    return rows


def layer_scores(source: Any, splits: Mapping[str, Any], layers: Sequence[str], *, sample: int | None = SCORE_SAMPLE,
                 seed: int = 0) -> pd.DataFrame:
    """One row per (task, layer): the scores of SCORES on that task's training rows (classification tasks only)."""
    out = []
    tasks = {t: s for t, s in splits.items() if s.task_type == "classification"}
    picks = {t: (_rows(s, "train", sample, seed), _rows(s, "val", sample, seed)) for t, s in tasks.items()}
    needed = np.unique(np.concatenate([np.concatenate(p) for p in picks.values()])) if picks else np.zeros(0, int)
    for layer in layers:
        X = _read_rows(source, layer, needed)  # only the sampled rows, whatever the store's size
        at = {int(r): i for i, r in enumerate(needed)}
        cache: dict[bytes, tuple[np.ndarray, np.ndarray, T.FeatureBasis]] = {}
        for task, split in tasks.items():
            tr, va = picks[task]
            key = tr.tobytes() + b"|" + va.tobytes()
            if key not in cache:
                x = X[[at[int(r)] for r in tr]].astype(np.float64)
                mean, std = x.mean(0), x.std(0)
                std[std <= 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0
                z = (x - mean) / std
                cache[key] = (z, (X[[at[int(r)] for r in va]] - mean) / std, T.feature_basis(z))
            z, z_val, basis = cache[key]
            y, y_val = split.targets[tr], split.targets[va]
            row: dict[str, Any] = {"task": task, "layer": layer, "n_rows": len(tr)}
            for name, fn in (("logme", lambda: T.logme(z, y, basis=basis)),
                             ("nleep", lambda: T.nleep(z, y, basis=basis, seed=seed)),
                             ("h_score", lambda: T.h_score(z, y, basis=basis)),
                             ("knn_accuracy", lambda: T.knn_accuracy(z, y, z_val, y_val))):
                try:
                    row[name] = float(fn())
                except (ValueError, np.linalg.LinAlgError) as e:  # a degenerate layer gets NaN, not a crash
                    log.warning("score %s of task %r layer %r failed: %s", name, task, layer, e)
                    row[name] = float("nan")
            out.append(row)
    df = pd.DataFrame(out, columns=["task", "layer", "n_rows", *SCORES])
    order = {name: i for i, name in enumerate(layers)}
    return df.sort_values(["task", "layer"], key=lambda c: c.map(order) if c.name == "layer" else c,
                          ignore_index=True)


def _read_rows(source: Any, layer: str, rows: np.ndarray) -> np.ndarray:
    """(len(rows), d) float32 rows of a layer by row position: a FeatureStore reads only those rows."""
    if hasattr(source, "get"):
        ids = source.index()["image_id"].to_numpy(dtype=object)[rows]
        return np.asarray(source.get(list(ids), layer), dtype=np.float32)
    return np.asarray(source.features(layer)[rows], dtype=np.float32)


def rank_agreement(score: Sequence[float], accuracy: Sequence[float]) -> dict[str, float]:
    """Kendall tau-b, weighted Kendall tau (top ranks weigh more) and Spearman rho; NaN when undefined.

    Undefined: fewer than MIN_LAYERS_FOR_RANKING finite pairs, or a constant score or accuracy.
    """
    s, a = np.asarray(score, dtype=float), np.asarray(accuracy, dtype=float)
    ok = np.isfinite(s) & np.isfinite(a)
    nan = {"kendall_tau": float("nan"), "weighted_tau": float("nan"), "spearman": float("nan"), "n": int(ok.sum())}
    if ok.sum() < MIN_LAYERS_FOR_RANKING or np.ptp(s[ok]) == 0 or np.ptp(a[ok]) == 0:
        return nan
    return {"kendall_tau": float(stats.kendalltau(s[ok], a[ok]).statistic),
            "weighted_tau": float(stats.weightedtau(s[ok], a[ok]).statistic),
            "spearman": float(stats.spearmanr(s[ok], a[ok]).statistic), "n": int(ok.sum())}


def score_agreement(scores: pd.DataFrame, accuracy: pd.DataFrame, *, by: str = "layer",
                    score_names: Sequence[str] = SCORES) -> pd.DataFrame:
    """Per task and score: rank agreement with validation and with test accuracy across `by` (layers or encoders).

    `accuracy` has columns task, <by>, val_accuracy, test_accuracy (the validation-selected head's).
    """
    merged = scores.merge(accuracy, on=["task", by])
    rows = []
    for task, g in merged.groupby("task", sort=True):
        for name in score_names:
            if name not in g:
                continue
            v, t = rank_agreement(g[name], g["val_accuracy"]), rank_agreement(g[name], g["test_accuracy"])
            rows.append({"task": task, "score": name, "kendall_tau_val": v["kendall_tau"],
                         "weighted_tau_val": v["weighted_tau"], "kendall_tau_test": t["kendall_tau"],
                         "weighted_tau_test": t["weighted_tau"], "spearman_test": t["spearman"], "n": v["n"]})
    return pd.DataFrame(rows)
