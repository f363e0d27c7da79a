"""Cosine nearest neighbours of query images in one layer: exact and chunked, or an ANN index when installed."""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from .cka import DEFAULT_CHUNK_ROWS, iter_blocks, layer_dim, rows_by_id

log = logging.getLogger(__name__)

QUERY_CHUNK = 1024  # queries scored together: a (QUERY_CHUNK x chunk_rows) float32 score block


class NeighborList(NamedTuple):
    query_id: Any
    neighbors: list[tuple[Any, float]]  # (image_id, cosine), most similar first


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)  # a zero vector has cosine 0 with everything


def _merge_topk(best_s: np.ndarray, best_i: np.ndarray, s: np.ndarray, i: np.ndarray, k: int):
    """Keep the k largest of the running (q, k) best and a new (q, m) candidate block."""
    m = s.shape[1]
    if m > k:
        part = np.argpartition(s, m - k, axis=1)[:, m - k:]  # the k largest sit at the end: no negated copy
        s, i = np.take_along_axis(s, part, 1), np.take_along_axis(i, part, 1)
    all_s, all_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
    part = np.argpartition(all_s, all_s.shape[1] - k, axis=1)[:, -k:]
    return np.take_along_axis(all_s, part, 1), np.take_along_axis(all_i, part, 1)


def _exact(source: Any, layer: str, queries: list[Any], q: np.ndarray, k: int, exclude_self: bool,
           chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, k) cosines and row positions, plus all ids; one pass over the layer, O(q k + q chunk) memory."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    slots: dict[Any, list[int]] = {}
    for j, qid in enumerate(queries):
        slots.setdefault(qid, []).append(j)
    all_ids, start = [], 0
    for ids, block in iter_blocks(source, layer, chunk_rows=chunk_rows):
        b = _normalise(block)
        pos = np.arange(start, start + len(ids))
        # (query slot, block column) of every query's own row in this block
        hits = [(j, r) for r, i in enumerate(ids) if i in slots for j in slots[i]] if exclude_self else []
        hits = np.array(hits, dtype=np.int64).reshape(-1, 2)
        hit_q, hit_r = hits[:, 0], hits[:, 1]
        for lo in range(0, len(q), QUERY_CHUNK):
            hi = min(lo + QUERY_CHUNK, len(q))
            s = q[lo:hi] @ b.T
            sel = (hit_q >= lo) & (hit_q < hi)
            s[hit_q[sel] - lo, hit_r[sel]] = -np.inf
            best_s[lo:hi], best_i[lo:hi] = _merge_topk(best_s[lo:hi], best_i[lo:hi], s,
                                                       np.broadcast_to(pos, s.shape), k)
        all_ids.append(ids)
        start += len(ids)
    return best_s, best_i, np.concatenate(all_ids) if all_ids else np.array([], object)


def ann_backend() -> str | None:
    """The approximate-index package available here, if any (nothing is installed on demand)."""
    for name in ("hnswlib", "faiss"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def _approximate(source: Any, layer: str, q: np.ndarray, k: int, backend: str,
                 chunk_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An HNSW index built block by block over unit vectors (inner product = cosine)."""
    n, dim = len(source.index()), layer_dim(source, layer)
    k_eff = min(k, n)
    all_ids, start = [], 0
    if backend == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=dim)
        index.init_index(max_elements=n, ef_construction=200, M=16, random_seed=0)
        for ids, block in iter_blocks(source, layer, chunk_rows=chunk_rows):
            index.add_items(_normalise(block), np.arange(start, start + len(ids)))
            all_ids.append(ids)
            start += len(ids)
        index.set_ef(max(64, 2 * k_eff))
        labels, dist = index.knn_query(q, k=k_eff)
        return (1.0 - dist).astype(np.float32), labels.astype(np.int64), np.concatenate(all_ids)
    import faiss

    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    for ids, block in iter_blocks(source, layer, chunk_rows=chunk_rows):
        index.add(np.ascontiguousarray(_normalise(block)))
        all_ids.append(ids)
    index.hnsw.efSearch = max(64, 2 * k_eff)
    sims, labels = index.search(np.ascontiguousarray(q), k_eff)
    return sims.astype(np.float32), labels.astype(np.int64), np.concatenate(all_ids)


def nearest_neighbors(store: Any, layer: str, image_ids: Sequence[str], k: int = 10, *, exclude_self: bool = True,
                      approximate: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> list[NeighborList]:
    """Top-k cosine neighbours of each query image among all rows of `layer`, most similar first.

    Exact by default: rows are normalised and scored block by block against the queries, keeping a
    running top-k (never the full n x n matrix). `approximate=True` uses an HNSW index when hnswlib or
    faiss is importable and falls back to exact otherwise. `exclude_self` drops a query's own row by
    image id (a duplicate image under another id is still a neighbour).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    queries = list(image_ids)
    if not queries:
        return []
    q = _normalise(rows_by_id(store, layer, queries))
    backend = ann_backend() if approximate else None
    if approximate and backend is None:
        log.info("nearest_neighbors: no hnswlib/faiss installed; using the exact search")
    if backend is not None:
        # ask for one more so the query itself can be dropped afterwards
        sims, pos, ids = _approximate(store, layer, q, k + int(exclude_self), backend, chunk_rows)
    else:
        sims, pos, ids = _exact(store, layer, queries, q, k, exclude_self, chunk_rows)
    order = np.argsort(-sims, axis=1, kind="stable")
    sims, pos = np.take_along_axis(sims, order, 1), np.take_along_axis(pos, order, 1)
    out = []
    for qid, s_row, p_row in zip(queries, sims.tolist(), pos.tolist()):
        found = [(ids[p], c) for c, p in zip(s_row, p_row)
                 if p >= 0 and c != -np.inf and not (exclude_self and ids[p] == qid)]
        out.append(NeighborList(qid, found[:k]))
    return out
