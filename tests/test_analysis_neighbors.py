"""Exact cosine neighbours vs a brute-force full similarity matrix; chunk boundaries, exclude_self, stores."""
from __future__ import annotations

import numpy as np
import pytest
from test_analysis_cka import table, write_store

from pipeline.analysis import ann_backend, nearest_neighbors

N, D = 257, 12
IDS = [f"img-{i:05d}" for i in range(N)]


def _data(seed=0):
    x = np.random.default_rng(seed).normal(size=(N, D)).astype(np.float32)
    x[10] = x[3] * 2.5  # same direction as row 3: cosine 1 with it, under another id
    x[20] = 0.0  # a zero vector: cosine 0 with everything
    return x


def _brute(x, q_rows, k, exclude_self):
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    s = xn[q_rows] @ xn.T
    if exclude_self:
        s[np.arange(len(q_rows)), q_rows] = -np.inf
    out = []
    for row in s:
        order = np.argsort(-row, kind="stable")[:k]
        out.append([(IDS[j], float(row[j])) for j in order if np.isfinite(row[j])])
    return out


def _check(got, want):
    """Same neighbours and cosines, most similar first; exact ties (row 3 and its multiple 10) in any order."""
    assert len(got) == len(want)
    for (qid, nbrs), exp in zip(got, want):
        np.testing.assert_allclose([c for _, c in nbrs], [c for _, c in exp], atol=1e-5)
        assert sorted((round(c, 4), i) for i, c in nbrs) == sorted((round(c, 4), i) for i, c in exp), qid


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 256, 257, 10_000])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_matches_brute_force_across_chunk_boundaries(chunk_rows, exclude_self):
    x = _data()
    q_rows = [0, 3, 6, 7, 63, 64, 255, 256, 3]  # chunk edges, and a repeated query
    got = nearest_neighbors(table({"f": x}, ids=IDS), "f", [IDS[r] for r in q_rows], k=5,
                            exclude_self=exclude_self, chunk_rows=chunk_rows)
    _check(got, _brute(x, q_rows, 5, exclude_self))
    assert got[0].query_id == IDS[0] and got[1].query_id == IDS[3]
    by_query = dict(got)
    if exclude_self:
        assert all(IDS[r] not in [i for i, _ in by_query[IDS[r]]] for r in q_rows)
        assert by_query[IDS[3]][0] == (IDS[10], pytest.approx(1.0, abs=1e-6))  # a duplicate is still found
    else:
        assert by_query[IDS[7]][0] == (IDS[7], pytest.approx(1.0, abs=1e-6))


def test_k_larger_than_the_data_and_zero_vectors():
    x = _data()[:6]
    got = nearest_neighbors(table({"f": x}, ids=IDS[:6]), "f", [IDS[0], IDS[5]], k=50, chunk_rows=4)
    assert [len(n) for _, n in got] == [5, 5]
    x = _data()
    (_, nbrs), = nearest_neighbors(table({"f": x}, ids=IDS), "f", [IDS[20]], k=3)
    assert all(c == 0.0 for _, c in nbrs)
    with pytest.raises(KeyError):
        nearest_neighbors(table({"f": x}, ids=IDS), "f", ["nope"])
    assert nearest_neighbors(table({"f": x}, ids=IDS), "f", []) == []


def test_on_a_real_store_with_float16_shards(tmp_path):
    x = _data(1)
    store = write_store(str(tmp_path / "s"), {"f": x}, {"c": [0] * N}, dtype="float16")  # 5 shards of 64 rows
    q_rows = [0, 64, 200]
    got = nearest_neighbors(store, "f", [IDS[r] for r in q_rows], k=10, chunk_rows=50)
    _check(got, _brute(x.astype(np.float16).astype(np.float32), q_rows, 10, True))


def test_approximate_falls_back_to_exact_or_agrees():
    x = _data(2)
    src = table({"f": x}, ids=IDS)
    exact = nearest_neighbors(src, "f", IDS[:20], k=5)
    approx = nearest_neighbors(src, "f", IDS[:20], k=5, approximate=True)
    if ann_backend() is None:
        assert approx == exact
    else:  # HNSW on 257 points with a wide beam is effectively exact
        recall = np.mean([len({i for i, _ in a} & {i for i, _ in e}) / 5 for (_, a), (_, e) in zip(approx, exact)])
        assert recall > 0.95
