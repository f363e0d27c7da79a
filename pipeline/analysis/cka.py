"""Linear CKA between layers, computed in feature space from streamed float64 moments (never an n x n Gram)."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy.linalg import blas

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 8192


# -- feature sources -----------------------------------------------------------------------------
# Every store-taking function here accepts a `FeatureStore` (streamed shard by shard through
# `iter_layer`) or any probes `FeatureTable` (`layers`, `features(layer)`, `index()`), e.g.
# `InMemoryFeatureTable`, which is how tests and notebooks pass plain arrays.

def iter_blocks(source: Any, layer: str, *, chunk_rows: int = DEFAULT_CHUNK_ROWS
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image ids, (m, d) block) in index order, at most `chunk_rows` rows at a time."""
    if hasattr(source, "iter_layer"):
        for rows, block in source.iter_layer(layer):
            ids = np.asarray(rows.column("image_id").to_pylist(), dtype=object)
            for lo in range(0, len(ids), chunk_rows):
                yield ids[lo:lo + chunk_rows], block[lo:lo + chunk_rows]
        return
    features = source.features(layer)
    ids = np.asarray(source.index()["image_id"].tolist(), dtype=object)
    for lo in range(0, len(ids), chunk_rows):
        yield ids[lo:lo + chunk_rows], features[lo:lo + chunk_rows]


def image_ids(source: Any) -> np.ndarray:
    """All image ids of a source, in row order."""
    return np.asarray(source.index()["image_id"].tolist(), dtype=object)


def rows_by_id(source: Any, layer: str, ids: Sequence[str]) -> np.ndarray:
    """(len(ids), d) float32 rows for the given ids, in the order given."""
    if hasattr(source, "get"):
        return np.asarray(source.get(list(ids), layer), dtype=np.float32)
    where = {i: k for k, i in enumerate(image_ids(source))}
    missing = [i for i in ids if i not in where]
    if missing:
        raise KeyError(f"{len(missing)} image ids not in the feature table: {missing[:5]}")
    return np.asarray(source.features(layer)[[where[i] for i in ids]], dtype=np.float32)


def layer_dim(source: Any, layer: str) -> int:
    if hasattr(source, "layer_dims"):
        return int(source.layer_dims[layer])
    return int(source.features(layer).shape[1])


def ordered_layers(source: Any) -> list[str]:
    """Layers early to late: the encoder's order from the provenance when recorded.

    (`FeatureStore.layers` comes from a JSON object written with sorted keys, so it is alphabetical.)
    """
    names = list(source.layers)
    recorded = (getattr(source, "provenance", None) or {}).get("layers")
    if not recorded:
        return names
    order = [n for n in recorded if n in names]
    return order + [n for n in names if n not in order]


def iter_aligned(streams: Sequence[Iterator[tuple[np.ndarray, np.ndarray]]]) -> Iterator[list[np.ndarray]]:
    """Re-cut several (ids, block) streams over the same rows into equal-length, id-checked blocks."""
    empty = (np.empty(0, object), np.empty((0, 0)))
    bufs = [empty] * len(streams)
    while True:
        for k, stream in enumerate(streams):
            while len(bufs[k][0]) == 0:
                nxt = next(stream, None)
                if nxt is None:
                    break
                bufs[k] = nxt
        sizes = [len(ids) for ids, _ in bufs]
        if min(sizes) == 0:
            if max(sizes) > 0:
                raise ValueError("feature streams have different numbers of rows")
            return
        m = min(sizes)
        ids0 = bufs[0][0][:m]
        if any(not np.array_equal(ids[:m], ids0) for ids, _ in bufs[1:]):
            raise ValueError("feature streams list different image ids at the same row")
        yield [block[:m] for _, block in bufs]
        bufs = [(ids[m:], block[m:]) for ids, block in bufs]


def _check_layers(source: Any, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return ordered_layers(source)
    unknown = [name for name in layers if name not in source.layers]
    if unknown:
        raise ValueError(f"layer(s) {unknown} not in the feature set; layers: {list(source.layers)}")
    return list(layers)


# -- moments -------------------------------------------------------------------------------------
class CrossMoments:
    """Running n, column sums and upper-triangular Z^T Z of column-concatenated blocks, in float64.

    Rows are shifted by the first chunk's mean before accumulating (covariances are shift-invariant),
    so centring from sums, S = sum z z^T - n mu mu^T, does not cancel catastrophically when features
    have large means. Memory is (sum of dims)^2 float64, independent of the number of rows.
    """

    def __init__(self, dims: Sequence[int]) -> None:
        self.dims = list(dims)
        self.offsets = np.concatenate([[0], np.cumsum(self.dims)]).astype(int)
        total = int(self.offsets[-1])
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sums = np.zeros(total)
        self.gram = np.zeros((total, total), order="F")

    def update(self, blocks: Sequence[np.ndarray]) -> None:
        m = len(blocks[0])
        if any(len(b) != m for b in blocks):
            raise ValueError(f"blocks of one update must share their rows; got {[len(b) for b in blocks]}")
        if m == 0:
            return
        z = np.empty((m, int(self.offsets[-1])))
        for b, lo, hi in zip(blocks, self.offsets[:-1], self.offsets[1:]):
            z[:, lo:hi] = b
        if self.shift is None:
            self.shift = z.mean(axis=0)
        z -= self.shift
        self.n += m
        self.sums += z.sum(axis=0)
        # z.T is Fortran-ordered, so BLAS reads it without a copy and updates gram in place
        self.gram = blas.dsyrk(1.0, z.T, beta=1.0, c=self.gram, trans=0, overwrite_c=1)

    def covariance(self) -> np.ndarray:
        """Centred scatter matrix sum (z - mean)(z - mean)^T (unnormalised), symmetric."""
        upper = np.triu(self.gram)
        full = upper + np.triu(upper, 1).T
        mu = self.sums / max(self.n, 1)
        return full - self.n * np.outer(mu, mu)

    def block(self, cov: np.ndarray, i: int, j: int) -> np.ndarray:
        return cov[self.offsets[i]:self.offsets[i + 1], self.offsets[j]:self.offsets[j + 1]]


def _cka_from_cov(moments: CrossMoments, cov: np.ndarray, i: int, j: int) -> float:
    cross = np.sum(moments.block(cov, i, j) ** 2)
    norm = np.linalg.norm(moments.block(cov, i, i)) * np.linalg.norm(moments.block(cov, j, j))
    if norm == 0.0:
        return float("nan")  # a constant layer has no similarity structure
    return float(cross / norm)


def _cka_table(moments: CrossMoments, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
    cov = moments.covariance()
    return np.array([[_cka_from_cov(moments, cov, i, j) for j in cols] for i in rows])


# -- public API ----------------------------------------------------------------------------------
def linear_cka(X: np.ndarray, Y: np.ndarray, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> float:
    """Linear CKA of two representations of the same n rows: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).

    Computed over row chunks from float64 moments, so memory is O((d1 + d2)^2), not O(n^2).
    """
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y):
        raise ValueError(f"X and Y must be (n, d) with the same n; got {X.shape} and {Y.shape}")
    moments = CrossMoments([X.shape[1], Y.shape[1]])
    for lo in range(0, len(X), chunk_rows):
        moments.update([X[lo:lo + chunk_rows], Y[lo:lo + chunk_rows]])
    return float(_cka_table(moments, [0], [1])[0, 0])


class CKAMatrix(NamedTuple):
    layers: list[str]
    matrix: np.ndarray  # (L, L), symmetric, ones on the diagonal


class CrossCKA(NamedTuple):
    layers_a: list[str]
    layers_b: list[str]
    matrix: np.ndarray  # (len(layers_a), len(layers_b))


def cka_matrix(store: Any, layers: Sequence[str] | None = None, *,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> CKAMatrix:
    """Linear CKA between every pair of layers of one feature set, in one pass over its shards."""
    layers = _check_layers(store, layers)
    moments = CrossMoments([layer_dim(store, name) for name in layers])
    for blocks in iter_aligned([iter_blocks(store, name, chunk_rows=chunk_rows) for name in layers]):
        moments.update(blocks)
    log.info("cka_matrix: %d layers over %d rows", len(layers), moments.n)
    idx = list(range(len(layers)))
    return CKAMatrix(layers, _cka_table(moments, idx, idx))


def cross_cka(store_a: Any, store_b: Any, layers_a: Sequence[str] | None = None,
              layers_b: Sequence[str] | None = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> CrossCKA:
    """Linear CKA between layers of two feature sets of the same images, rows aligned by image_id.

    Only the image ids present in both are used. When both list the same ids in the same order they
    are streamed side by side; otherwise both are read by id (`get`), one chunk of common ids at a time.
    """
    layers_a, layers_b = _check_layers(store_a, layers_a), _check_layers(store_b, layers_b)
    ids_a, ids_b = image_ids(store_a), image_ids(store_b)
    in_b = set(ids_b.tolist())
    common = [i for i in ids_a.tolist() if i in in_b]
    if len(common) < 2:
        raise ValueError(f"the two feature sets share {len(common)} image ids; need at least 2")
    if len(common) < max(len(ids_a), len(ids_b)):
        log.warning("cross_cka: using the %d image ids common to both (A has %d, B has %d)",
                    len(common), len(ids_a), len(ids_b))
    moments = CrossMoments([layer_dim(store_a, n) for n in layers_a] + [layer_dim(store_b, n) for n in layers_b])
    if len(ids_a) == len(ids_b) and np.array_equal(ids_a, ids_b):
        streams = [iter_blocks(store_a, n, chunk_rows=chunk_rows) for n in layers_a]
        streams += [iter_blocks(store_b, n, chunk_rows=chunk_rows) for n in layers_b]
        for blocks in iter_aligned(streams):
            moments.update(blocks)
    else:
        for lo in range(0, len(common), chunk_rows):
            chunk = common[lo:lo + chunk_rows]
            moments.update([rows_by_id(store_a, n, chunk) for n in layers_a]
                           + [rows_by_id(store_b, n, chunk) for n in layers_b])
    rows = list(range(len(layers_a)))
    cols = list(range(len(layers_a), len(layers_a) + len(layers_b)))
    return CrossCKA(layers_a, layers_b, _cka_table(moments, rows, cols))
