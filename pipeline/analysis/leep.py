"""LEEP (Nguyen et al. 2020): how well a source classifier's soft predictions explain the target labels."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.special import log_softmax, logsumexp

from ..labels import missing_labels
from .cka import iter_blocks, layer_dim

log = logging.getLogger(__name__)

EPS = 1e-12  # floor for P(z) so an (almost) never-predicted source class cannot divide by zero
_CHUNK = 8192


def _codes(labels: Sequence[Any]) -> tuple[np.ndarray, int]:
    labels = pd.Series(np.asarray(labels, dtype=object))
    if missing_labels(labels).any():
        raise ValueError(f"{int(missing_labels(labels).sum())} labels are missing (None, NaN or blank); drop those "
                         f"rows first")
    codes, classes = pd.factorize(labels)
    return codes, len(classes)


def _log_theta(block: np.ndarray, from_probs: bool) -> np.ndarray:
    block = np.asarray(block, dtype=np.float64)
    if from_probs:
        with np.errstate(divide="ignore"):
            return np.log(block / block.sum(axis=1, keepdims=True))
    return log_softmax(block, axis=1)


def _leep_two_pass(blocks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], n_y: int, n_z: int,
                   from_probs: bool) -> float:
    """LEEP from a re-iterable source of (label codes, logits) chunks: pass 1 builds P(y, z), pass 2 scores."""
    joint, n = np.zeros((n_y, n_z)), 0
    for codes, block in blocks():
        theta = np.exp(_log_theta(block, from_probs))
        onehot = sparse.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(n_y, len(codes)))
        joint += onehot @ theta
        n += len(codes)
    if n == 0:
        raise ValueError("no labelled rows to compute LEEP on")
    joint /= n
    with np.errstate(divide="ignore"):
        log_cond = np.log(joint) - np.log(np.maximum(joint.sum(axis=0, keepdims=True), EPS))  # log P(y|z)
    total = 0.0
    for codes, block in blocks():
        total += float(logsumexp(log_cond[codes] + _log_theta(block, from_probs), axis=1).sum())
    return total / n


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

    def blocks():
        for lo in range(0, len(codes), _CHUNK):
            yield codes[lo:lo + _CHUNK], logits[lo:lo + _CHUNK]

    return _leep_two_pass(blocks, n_y, logits.shape[1], from_probs)


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


def store_leep(store: Any, task: str, *, layer: str = "classifier", from_probs: bool = False) -> float:
    """LEEP of a stored source-classifier layer (logits) against a label column, streamed in two passes.

    Rows without a label are left out.
    """
    index = store.index()
    labels = pd.Series(index[task].to_numpy(dtype=object))
    keep = ~missing_labels(labels)
    codes = np.full(len(labels), -1)
    codes[keep], classes = pd.factorize(labels[keep])
    code_of = dict(zip(index["image_id"].tolist(), codes.tolist()))

    def blocks():
        for ids, block in iter_blocks(store, layer):
            c = np.array([code_of[i] for i in ids], dtype=np.int64)
            yield c[c >= 0], block[c >= 0]

    return _leep_two_pass(blocks, len(classes), layer_dim(store, layer), from_probs)
