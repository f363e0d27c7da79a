"""Linear CKA: textbook agreement, invariances, chunking, and the feature-store paths."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis import cka_matrix, cross_cka, linear_cka
from pipeline.probes import InMemoryFeatureTable
from pipeline.stores import FeatureStore
from storekit import write_store


def table(features: dict[str, np.ndarray], labels: dict[str, list] | None = None,
          ids: list[str] | None = None) -> InMemoryFeatureTable:
    n = len(next(iter(features.values())))
    index = pd.DataFrame({"image_id": ids or [f"img-{i:05d}" for i in range(n)], **(labels or {})})
    return InMemoryFeatureTable(features, index)


def gram_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Textbook: HSIC of centred Gram matrices K = XX^T, L = YY^T (H = I - 11^T/n)."""
    n = len(X)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = H @ (X @ X.T) @ H, H @ (Y @ Y.T) @ H
    return float(np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L)))


def _pair(n=300, d1=20, d2=12, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d1)) + 5.0  # a large mean: centring from sums must not cancel
    Y = np.tanh(X[:, :d2] @ rng.normal(size=(d2, d2))) + 0.3 * rng.normal(size=(n, d2))
    return X, Y


def test_self_similarity_is_one():
    X, _ = _pair()
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_matches_textbook_gram_formula_chunked_or_not():
    X, Y = _pair()
    expected = gram_cka(X, Y)
    assert 0.1 < expected < 0.95
    for chunk in (7, 64, 299, 300, 10_000):
        assert linear_cka(X, Y, chunk_rows=chunk) == pytest.approx(expected, rel=1e-10)


def test_invariant_to_orthogonal_transform_and_isotropic_scale():
    X, Y = _pair()
    Q = np.linalg.qr(np.random.default_rng(1).normal(size=(X.shape[1], X.shape[1])))[0]
    base = linear_cka(X, Y)
    assert linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * X, 0.01 * Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X + 100.0, Y) == pytest.approx(base, rel=1e-9)


def test_independent_features_have_low_cka():
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(20_000, 16)), rng.normal(size=(20_000, 16))
    assert linear_cka(X, Y) < 0.05


def test_float16_input_and_shape_errors():
    X, Y = _pair()
    assert linear_cka(X.astype(np.float16), Y.astype(np.float16)) == pytest.approx(gram_cka(X, Y), abs=1e-3)
    with pytest.raises(ValueError, match="same n"):
        linear_cka(X, Y[:-1])


def test_cka_matrix_over_a_real_store_matches_pairwise(tmp_path):
    X, Y = _pair(n=300)
    Z = np.random.default_rng(3).normal(size=(300, 5))
    feats = {"early": X.astype(np.float32), "mid": Y.astype(np.float32), "late": Z.astype(np.float32)}
    store = write_store(str(tmp_path / "s"), feats, {"digit": [i % 10 for i in range(300)]})
    layers, m = cka_matrix(store)  # 5 shards of 64 rows, the last one partial
    assert layers == ["early", "mid", "late"]
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-9)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    for i, a in enumerate(layers):
        for j, b in enumerate(layers):
            assert m[i, j] == pytest.approx(gram_cka(feats[a].astype(np.float64), feats[b].astype(np.float64)),
                                            rel=1e-6)
    # the in-memory table path gives the same matrix, with chunks that cut across the store's shards
    _, m2 = cka_matrix(table(feats), ["early", "mid", "late"], chunk_rows=50)
    np.testing.assert_allclose(m2, m, rtol=1e-9)
    with pytest.raises(ValueError, match="valid|layers"):
        cka_matrix(store, ["nope"])


def test_cross_cka_aligns_rows_by_image_id(tmp_path):
    X, Y = _pair(n=200)
    ids = [f"img-{i:05d}" for i in range(200)]
    a = write_store(str(tmp_path / "a"), {"x": X.astype(np.float32)}, {"c": [0] * 200}, ids=ids)
    perm = np.random.default_rng(4).permutation(200)[:180]  # B: shuffled, and 20 images missing
    b = table({"y": Y[perm].astype(np.float32)}, ids=[ids[p] for p in perm])
    res = cross_cka(a, b, ["x"], ["y"], chunk_rows=33)
    keep = np.sort(perm)
    assert res.matrix.shape == (1, 1)
    assert res.matrix[0, 0] == pytest.approx(gram_cka(X[keep], Y[keep]), rel=1e-6)
    # same ids in the same order: streamed side by side
    same = cross_cka(a, table({"x": X.astype(np.float32), "y": Y.astype(np.float32)}, ids=ids))
    assert same.layers_b == ["x", "y"]
    assert same.matrix[0, 0] == pytest.approx(1.0, abs=1e-9)
    assert same.matrix[0, 1] == pytest.approx(gram_cka(X, Y), rel=1e-6)
