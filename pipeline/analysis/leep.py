"""LEEP (Nguyen et al. 2020): how well a source classifier's soft predictions explain the target labels."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import log_softmax, logsumexp

log = logging.getLogger(__name__)

EPS = 1e-12  # floor for P(z) so an (almost) never-predicted source class cannot divide by zero
_CHUNK = 8192


def _codes(labels: Sequence[Any]) -> tuple[np.ndarray, int]:
    labels = pd.Series(np.asarray(labels, dtype=object))
    if labels.isna().any():
        raise ValueError(f"{int(labels.isna().sum())} labels are missing; drop those rows first")
    codes, classes = pd.factorize(labels)
    return codes, len(classes)


def _log_theta(block: np.ndarray, from_probs: bool) -> np.ndarray:
    block = np.asarray(block, dtype=np.float64)
    if from_probs:
        with np.errstate(divide="ignore"):
            return np.log(block / block.sum(axis=1, keepdims=True))
    return log_softmax(block, axis=1)


def leep(logits: np.ndarray, labels: Sequence[Any], *, from_probs: bool = False) -> float:
    """LEEP = (1/n) sum_i log sum_z P(y_i | z) theta(x_i)_z, with theta = softmax(logits) over source classes.

    P(y, z) = (1/n) sum_i theta(x_i)_z [y_i = y] and P(y | z) = P(y, z) / P(z) are the empirical joint and
    conditional of target label y and source class z. Higher (closer to 0) = the source model's
    predictions explain the target labels better. Computed in log space, chunked over rows, in float64.
    Set `from_probs` when `logits` already holds probabilities.
    """
    logits = np.asarray(logits)
    codes, n_y = _codes(labels)
    if logits.ndim != 2 or len(logits) != len(codes) or len(codes) == 0:
        raise ValueError(f"logits must be (n, Z) with n = len(labels) > 0; got {logits.shape}, {len(codes)} labels")
    n, n_z = logits.shape
    joint = np.zeros((n_y, n_z))
    for lo in range(0, n, _CHUNK):
        theta = np.exp(_log_theta(logits[lo:lo + _CHUNK], from_probs))
        rows = codes[lo:lo + _CHUNK]
        joint += sparse.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(n_y, len(rows))) @ theta
    joint /= n
    with np.errstate(divide="ignore"):
        log_cond = np.log(joint) - np.log(np.maximum(joint.sum(axis=0, keepdims=True), EPS))  # log P(y|z)
    total = 0.0
    for lo in range(0, n, _CHUNK):
        log_theta = _log_theta(logits[lo:lo + _CHUNK], from_probs)
        total += float(logsumexp(log_cond[codes[lo:lo + _CHUNK]] + log_theta, axis=1).sum())
    return total / n


def leep_chance(labels: Sequence[Any]) -> float:
    """LEEP of an uninformative source (the same theta for every image): -H(Y), the label entropy in nats."""
    codes, _ = _codes(labels)
    p = np.bincount(codes) / len(codes)
    return float(np.sum(p * np.log(p)))


def relative_leep(logits: np.ndarray, labels: Sequence[Any], *, from_probs: bool = False) -> float:
    """LEEP on a 0..1 scale: the fraction of the label entropy it explains, 1 - LEEP / -H(Y).

    0 = no better than an uninformative source, 1 = the source classes determine the labels. Raw LEEP
    depends on the number and balance of target classes; this makes tasks comparable.
    """
    chance = leep_chance(labels)
    if chance == 0.0:
        return float("nan")  # a single class: nothing to explain
    return 1.0 - leep(logits, labels, from_probs=from_probs) / chance


def store_leep(store: Any, task: str, *, layer: str = "classifier") -> float:
    """LEEP of a stored source-classifier layer (logits) against a label column; unlabelled rows dropped."""
    labels = store.index()[task].to_numpy(dtype=object)
    keep = pd.notna(labels)
    logits = store.layer(layer) if hasattr(store, "layer") else store.features(layer)
    return leep(np.asarray(logits)[keep], labels[keep])
