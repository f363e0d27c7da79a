"""Geometry of a layer: intrinsic dimension (TwoNN, Levina-Bickel MLE), PCA spectrum, cluster quality per task."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, davies_bouldin_score, silhouette_score
from sklearn.neighbors import NearestNeighbors

from ..labels import INDEX_COLUMNS, missing_labels
from .cka import CrossMoments, iter_blocks, layer_dim

log = logging.getLogger(__name__)

ID_SAMPLE = 2_000       # rows for the neighbour-based dimension estimates (O(n^2 d) distances)
CLUSTER_SAMPLE = 5_000  # rows for silhouette (O(n^2)) and k-means
PCA_LEVELS = (0.90, 0.95, 0.99)


@dataclass(frozen=True)
class IntrinsicDimension:
    twonn: float
    mle: float
    k: int        # neighbours used by the MLE
    n_used: int   # rows after subsampling and dropping duplicates


@dataclass(frozen=True)
class PCASpectrum:
    explained_ratio: tuple[float, ...]  # per component, descending, sums to 1
    n_components: dict[float, int]      # variance level -> components needed to reach it
    n_rows: int


@dataclass(frozen=True)
class ClusterQuality:
    task: str
    silhouette: float      # [-1, 1], higher = classes are compact and apart
    davies_bouldin: float  # >= 0, lower = better separated
    adjusted_rand: float   # k-means (k = classes) vs the labels; 0 = chance, 1 = identical
    n_classes: int
    n_used: int


@dataclass(frozen=True)
class LayerGeometry:
    layer: str
    dimension: IntrinsicDimension
    pca: PCASpectrum
    clusters: dict[str, ClusterQuality]


# -- sampling ------------------------------------------------------------------------------------
def sample_rows(source: Any, layer: str, n: int | None, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subsample of rows, read block by block: (image ids, (m, d) float32) in row order."""
    total = len(source.index())
    if n is None or n >= total:
        pos = np.arange(total)
    else:
        pos = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    out = np.empty((len(pos), layer_dim(source, layer)), np.float32)
    ids = np.empty(len(pos), dtype=object)
    start = 0
    for block_ids, block in iter_blocks(source, layer):
        lo, hi = np.searchsorted(pos, [start, start + len(block_ids)])
        out[lo:hi] = block[pos[lo:hi] - start]
        ids[lo:hi] = block_ids[pos[lo:hi] - start]
        start += len(block_ids)
    return ids, out


def labels_for(source: Any, ids: np.ndarray, task: str) -> np.ndarray:
    """The task's labels of these image ids (object array, None where missing: None, NaN or blank)."""
    index = source.index()
    labels = index[task].to_numpy(dtype=object)[pd.Index(index["image_id"]).get_indexer(ids)]
    labels[missing_labels(labels)] = None
    return labels


def task_columns(source: Any, tasks: Sequence[str] | None) -> list[str]:
    if tasks is not None:
        return list(tasks)
    if hasattr(source, "label_columns"):
        return list(source.label_columns)
    return [c for c in source.index().columns if c not in INDEX_COLUMNS]


def _subsample(X: np.ndarray, n: int | None, seed: int, labels: np.ndarray | None = None):
    if n is None or len(X) <= n:
        return X, labels
    sel = np.sort(np.random.default_rng(seed).choice(len(X), size=n, replace=False))
    return X[sel], (None if labels is None else labels[sel])


# -- intrinsic dimension -------------------------------------------------------------------------
def _knn_distances(X: np.ndarray, k: int) -> np.ndarray:
    """Distances to the k nearest other points, with exact duplicates dropped (their r1 is 0)."""
    X = np.unique(np.asarray(X, dtype=np.float64), axis=0)
    dist, _ = NearestNeighbors(n_neighbors=min(k + 1, len(X))).fit(X).kneighbors(X)
    return dist[:, 1:]


def twonn_dimension(X: np.ndarray, *, discard_fraction: float = 0.1) -> float:
    """TwoNN (Facco et al. 2017): the ratio mu = r2/r1 is Pareto(d); fit -log(1 - F(mu)) = d log mu.

    The largest `discard_fraction` of ratios are dropped, as in the paper, because they come from
    points in sparse regions where the local-uniformity assumption fails.
    """
    d = _knn_distances(X, 2)
    mu = np.sort(d[:, 1] / d[:, 0])
    n = len(mu)
    keep = max(int(np.floor(n * (1.0 - discard_fraction))), 2)
    x = np.log(mu[:keep])
    y = -np.log(1.0 - np.arange(1, keep + 1) / n)
    return float(np.dot(x, y) / np.dot(x, x))


def mle_dimension(X: np.ndarray, *, k: int = 20) -> float:
    """Levina-Bickel MLE on k neighbours, pooled as in MacKay & Ghahramani (average the inverse).

    Per point, 1/m_k = mean_{j<k} log(T_k / T_j); averaging 1/m_k rather than m_k removes most of the
    upward bias of the original point-wise average.
    """
    if k < 3:
        raise ValueError(f"k must be >= 3 for the MLE; got {k}")
    d = _knn_distances(X, k)
    logs = np.log(d[:, -1:] / d[:, :-1])
    inv = logs.mean(axis=1)
    return float(1.0 / inv.mean())


def intrinsic_dimension(X: np.ndarray, *, sample: int | None = ID_SAMPLE, seed: int = 0,
                        k: int = 20) -> IntrinsicDimension:
    """Both estimates on one seeded subsample (they need all pairwise distances of the sample)."""
    Xs, _ = _subsample(np.asarray(X), sample, seed)
    n_used = len(np.unique(Xs, axis=0))
    return IntrinsicDimension(twonn=twonn_dimension(Xs), mle=mle_dimension(Xs, k=k), k=k, n_used=n_used)


# -- PCA -----------------------------------------------------------------------------------------
def _spectrum_from_cov(cov: np.ndarray, n_rows: int) -> PCASpectrum:
    eig = np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)
    total = eig.sum()
    ratio = eig / total if total > 0 else np.zeros_like(eig)
    cum = np.cumsum(ratio)
    needed = {lvl: int(min(np.searchsorted(cum, lvl - 1e-12) + 1, len(ratio))) for lvl in PCA_LEVELS}
    return PCASpectrum(explained_ratio=tuple(float(r) for r in ratio), n_components=needed, n_rows=n_rows)


def pca_spectrum(X: np.ndarray) -> PCASpectrum:
    """Explained-variance ratios of all components, and how many reach 90/95/99 % of the variance."""
    moments = CrossMoments([X.shape[1]])
    for lo in range(0, len(X), 8192):
        moments.update([X[lo:lo + 8192]])
    return _spectrum_from_cov(moments.covariance(), moments.n)


def store_pca_spectrum(source: Any, layer: str) -> PCASpectrum:
    """PCA spectrum over every row of a layer, streamed (a d x d float64 accumulator)."""
    moments = CrossMoments([layer_dim(source, layer)])
    for _, block in iter_blocks(source, layer):
        moments.update([block])
    return _spectrum_from_cov(moments.covariance(), moments.n)


# -- clusters ------------------------------------------------------------------------------------
def cluster_quality(X: np.ndarray, labels: Sequence[Any], *, task: str = "", sample: int | None = CLUSTER_SAMPLE,
                    seed: int = 0) -> ClusterQuality:
    """Silhouette and Davies-Bouldin of the labelled classes, and ARI of seeded k-means vs the labels.

    Rows with a missing label are dropped. Fewer than two classes gives NaN scores.
    """
    labels = pd.Series(np.asarray(labels, dtype=object))
    ok = ~missing_labels(labels)
    codes, classes = pd.factorize(labels[ok])
    Xs, ys = _subsample(np.asarray(X)[ok], sample, seed, codes)
    n_classes = len(np.unique(ys))
    if n_classes < 2 or n_classes >= len(Xs):
        log.warning("cluster_quality(%s): %d classes on %d rows; scores undefined", task, n_classes, len(Xs))
        return ClusterQuality(task, float("nan"), float("nan"), float("nan"), n_classes, len(Xs))
    Xs = Xs.astype(np.float64)
    pred = KMeans(n_clusters=n_classes, n_init=4, random_state=seed).fit_predict(Xs)
    return ClusterQuality(task=task, silhouette=float(silhouette_score(Xs, ys)),
                          davies_bouldin=float(davies_bouldin_score(Xs, ys)),
                          adjusted_rand=float(adjusted_rand_score(ys, pred)), n_classes=n_classes, n_used=len(Xs))


def layer_geometry(source: Any, layer: str, *, tasks: Sequence[str] | None = None, sample: int = ID_SAMPLE,
                   cluster_sample: int = CLUSTER_SAMPLE, seed: int = 0, k: int = 20) -> LayerGeometry:
    """Everything above for one layer of a feature set: PCA over all rows, the rest on seeded subsamples."""
    ids, X = sample_rows(source, layer, max(sample, cluster_sample), seed=seed)
    clusters = {}
    for task in task_columns(source, tasks):
        labels = labels_for(source, ids, task)
        clusters[task] = cluster_quality(X, labels, task=task, sample=cluster_sample, seed=seed)
    dim = intrinsic_dimension(X, sample=sample, seed=seed, k=k)
    return LayerGeometry(layer=layer, dimension=dim, pca=store_pca_spectrum(source, layer), clusters=clusters)
