"""Benchmark: streamed feature-space linear CKA and exact top-k cosine neighbours vs the n x n textbook forms.

Synthetic float16 features (two layers sharing a low-rank latent, generated chunk by chunk) stand in
for a large feature store. strata's versions never build an n x n matrix: CKA accumulates d x d
float64 moments over row chunks, neighbours keep a running top-k per query. The textbook versions
build the n x n Gram / similarity matrix, so they run only on as many rows as a few GB hold; both
sides run on those rows too and the table prints time and peak memory side by side with the ratio.
Each call runs twice: once timed, once under tracemalloc for its peak of Python and numpy
allocations (BLAS scratch buffers and the input arrays themselves are not counted).

    python benchmarks/bench_analysis.py           # 100,000 x 1,280; textbook on 10,000 rows (~1-3 min, 2 cores)
    python benchmarks/bench_analysis.py --quick   # 20,000 x 512; textbook on 3,000 rows (seconds)
"""
from __future__ import annotations

import argparse
import logging
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pipeline.analysis import linear_cka, nearest_neighbors
from pipeline.probes import InMemoryFeatureTable

CHUNK = 8192


def make_layers(n: int, d: int, *, rank: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two (n, d) float16 layers from a shared latent: X linear + noise, Y a non-linear view + noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rank, d)) / np.sqrt(rank)
    b = rng.normal(size=(rank, d)) / np.sqrt(rank)
    X, Y = np.empty((n, d), np.float16), np.empty((n, d), np.float16)
    for lo in range(0, n, CHUNK):
        r = np.random.default_rng([seed, lo])
        z = r.normal(size=(min(CHUNK, n - lo), rank)).astype(np.float32)
        X[lo:lo + len(z)] = z @ a + 0.5 * r.normal(size=(len(z), d)).astype(np.float32)
        h = z @ b
        Y[lo:lo + len(z)] = np.maximum(h, 0) + 0.1 * h + 0.5 * r.normal(size=(len(z), d)).astype(np.float32)
    return X, Y


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB allocated during the call): timed in one run, traced in a second one.

    tracemalloc slows Python-level allocations, so it would bias the timings of the side that makes
    more Python objects; the second run measures memory only.
    """
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    del out
    tracemalloc.start()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, dt, peak / 2**20


# -- textbook baselines --------------------------------------------------------------------------
def gram_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """HSIC of the centred n x n Gram matrices K = XX^T, L = YY^T (double-centred in O(n^2), not H K H)."""
    def centred_gram(A: np.ndarray) -> np.ndarray:
        A = A.astype(np.float64)
        K = A @ A.T
        rows = K.mean(axis=0)
        K -= rows[None, :]
        K -= rows[:, None]
        K += rows.mean()
        return K

    K = centred_gram(X)
    L = centred_gram(Y)
    hsic_kl = np.vdot(K, L)
    return float(hsic_kl / np.sqrt(np.vdot(K, K) * np.vdot(L, L)))


def brute_neighbors(X: np.ndarray, k: int) -> np.ndarray:
    """Full n x n cosine matrix, self excluded, then top-k per row: (n, k) row indices."""
    Xn = X.astype(np.float32)
    Xn /= np.maximum(np.linalg.norm(Xn, axis=1, keepdims=True), 1e-12)
    S = Xn @ Xn.T
    np.fill_diagonal(S, -np.inf)
    part = np.argpartition(-S, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(S, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


# -- report --------------------------------------------------------------------------------------
def row(op: str, n: int, method: str, t: float, mem: float, note: str = "") -> dict:
    return {"op": op, "rows": f"{n:,}", "method": method, "time_s": round(t, 2), "peak_MiB": round(mem, 1),
            "note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 x 512 rows; textbook on 3,000")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--small", type=int, default=None, help="rows for the n x n textbook versions")
    ap.add_argument("--queries", type=int, default=1_000, help="neighbour queries on the full rows")
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n = args.rows or (20_000 if args.quick else 100_000)
    d = args.dim or (512 if args.quick else 1_280)
    small = args.small or (3_000 if args.quick else 10_000)
    print(f"rows={n:,} dim={d} float16; textbook on {small:,} rows; cpus={os.cpu_count()}")

    t0 = time.perf_counter()
    X, Y = make_layers(n, d)
    ids = [f"img{i:07d}" for i in range(n)]
    full = InMemoryFeatureTable({"x": X}, pd.DataFrame({"image_id": ids}))
    part = InMemoryFeatureTable({"x": X[:small]}, pd.DataFrame({"image_id": ids[:small]}))
    print(f"generated {2 * X.nbytes / 2**20:,.0f} MiB of float16 features in {time.perf_counter() - t0:.1f}s")

    rows = []
    cka_full, t, m = measure(lambda: linear_cka(X, Y))
    rows.append(row("linear CKA", n, "strata streamed (d x d)", t, m, f"CKA={cka_full:.4f}"))
    cka_s, ts, ms = measure(lambda: linear_cka(X[:small], Y[:small]))
    rows.append(row("linear CKA", small, "strata streamed (d x d)", ts, ms, f"CKA={cka_s:.4f}"))
    cka_g, tg, mg = measure(lambda: gram_cka(X[:small], Y[:small]))
    rows.append(row("linear CKA", small, "textbook Gram (n x n)", tg, mg,
                    f"CKA={cka_g:.4f} |diff|={abs(cka_g - cka_s):.1e}; textbook/strata: {tg / ts:.1f}x time, "
                    f"{mg / ms:.1f}x memory"))

    rng = np.random.default_rng(1)
    queries = [ids[i] for i in np.sort(rng.choice(n, size=min(args.queries, n), replace=False))]
    _, t, m = measure(lambda: nearest_neighbors(full, "x", queries, k=args.k))
    rows.append(row(f"top-{args.k} cosine", n, f"strata exact, {len(queries):,} queries", t, m))
    got, ts, ms = measure(lambda: nearest_neighbors(part, "x", ids[:small], k=args.k))
    rows.append(row(f"top-{args.k} cosine", small, f"strata exact, all {small:,} queries", ts, ms))
    want, tb, mb = measure(lambda: brute_neighbors(X[:small], args.k))
    got_idx = [{int(i[3:]) for i, _ in nb} for _, nb in got]
    recall = np.mean([len(g & set(w.tolist())) / args.k for g, w in zip(got_idx, want)])
    rows.append(row(f"top-{args.k} cosine", small, "brute force (n x n)", tb, mb,
                    f"same top-{args.k}: {recall:.4f}; textbook/strata: {tb / ts:.1f}x time, {mb / ms:.1f}x memory"))

    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(pd.DataFrame(rows).to_string(index=False))
    est_gram = 2 * n * n * 8 / 2**30
    print(f"textbook CKA on all {n:,} rows would need two {n:,} x {n:,} float64 Grams: ~{est_gram:,.0f} GiB")


if __name__ == "__main__":
    main()
