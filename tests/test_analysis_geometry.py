"""Intrinsic dimension on known manifolds, PCA spectrum, cluster quality, and the store path; 2-D maps."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import make_swiss_roll
from test_analysis_cka import table, write_store

from pipeline.analysis import (cluster_quality, draw_map, intrinsic_dimension, layer_geometry, layer_map,
                               mle_dimension, pca_spectrum, twonn_dimension)


def _gaussian_5d_in_100d(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(100, 5)))[0].T  # 5 orthonormal directions in R^100
    return rng.normal(size=(n, 5)) @ (basis * np.array([[3], [2], [2], [1.5], [1]])) + 7.0


def test_intrinsic_dimension_of_a_linearly_embedded_5d_gaussian():
    est = intrinsic_dimension(_gaussian_5d_in_100d(3000), sample=2000, seed=0)
    assert est.n_used == 2000
    assert est.twonn == pytest.approx(5.0, abs=0.7)
    assert est.mle == pytest.approx(5.0, abs=0.7)


def test_intrinsic_dimension_of_a_swiss_roll_is_two():
    X, _ = make_swiss_roll(2000, random_state=0)
    assert twonn_dimension(X) == pytest.approx(2.0, abs=0.3)
    assert mle_dimension(X, k=20) == pytest.approx(2.0, abs=0.3)


def test_duplicates_do_not_break_the_estimates():
    X, _ = make_swiss_roll(1000, random_state=1)
    est = intrinsic_dimension(np.concatenate([X, X[:100]]), sample=None)
    assert est.n_used == 1000
    assert np.isfinite(est.twonn) and np.isfinite(est.mle)


def test_pca_spectrum_counts_components():
    rng = np.random.default_rng(0)
    # variances 50, 30, 12, 6, 2 (sum 100; cumulative 0.5, 0.8, 0.92, 0.98, 1) + nothing else
    X = rng.normal(size=(20_000, 5)) * np.sqrt([50, 30, 12, 6, 2])
    X = np.concatenate([X, np.zeros((20_000, 3))], axis=1) @ np.linalg.qr(rng.normal(size=(8, 8)))[0]
    p = pca_spectrum(X)
    assert len(p.explained_ratio) == 8 and sum(p.explained_ratio) == pytest.approx(1.0)
    np.testing.assert_allclose(p.explained_ratio[:5], [0.5, 0.3, 0.12, 0.06, 0.02], atol=0.01)
    assert p.n_components == {0.90: 3, 0.95: 4, 0.99: 5}


def _blobs(n=600, k=4, d=10, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(size=(k, d)) * 5
    return centres[y] + spread * rng.normal(size=(n, d)), y


def test_cluster_quality_separates_good_from_shuffled_labels():
    X, y = _blobs()
    good = cluster_quality(X, [f"c{v}" for v in y], task="t")
    bad = cluster_quality(X, np.random.default_rng(1).permutation(y), task="t")
    assert good.n_classes == 4 and good.n_used == 600
    assert good.silhouette > 0.7 and good.adjusted_rand > 0.95 and good.davies_bouldin < 0.5
    assert bad.silhouette < 0.05 and bad.davies_bouldin > 5
    assert bad.adjusted_rand == pytest.approx(0.0, abs=0.05)  # k-means is label-blind: ARI vs shuffled is ~0


def test_cluster_quality_subsamples_drops_missing_and_handles_one_class():
    X, y = _blobs()
    labels = y.astype(object)
    labels[:50] = None
    q = cluster_quality(X, labels, sample=300, seed=3)
    assert q.n_used == 300
    one = cluster_quality(X, np.zeros(len(X)))
    assert one.n_classes == 1 and np.isnan(one.silhouette)


def test_layer_geometry_and_map_on_a_real_store(tmp_path):
    X, y = _blobs(n=300, d=12)
    store = write_store(str(tmp_path / "s"), {"feat": X.astype(np.float32)},
                        {"blob": [int(v) for v in y], "half": ["a" if i < 150 else "b" for i in range(300)]})
    g = layer_geometry(store, "feat", sample=200, cluster_sample=250, seed=0)
    assert set(g.clusters) == {"blob", "half"}
    assert g.clusters["blob"].adjusted_rand > 0.9 and g.clusters["blob"].n_used == 250
    assert g.pca.n_rows == 300  # PCA streams every row
    assert g.dimension.n_used == 200
    # the same arrays through the in-memory table give the same spectrum
    p2 = layer_geometry(table({"feat": X.astype(np.float32)}, {"blob": list(y)}), "feat", sample=200,
                        cluster_sample=250).pca
    np.testing.assert_allclose(p2.explained_ratio, g.pca.explained_ratio, atol=1e-6)

    m = layer_map(store, "feat", sample=120, seed=0, method="tsne", threads=1)
    assert m.coords.shape == (120, 2) and m.method == "tsne" and len(m.image_ids) == 120
    assert set(m.labels) == {"blob", "half"}
    assert [v for v in m.labels["half"]] == ["a" if int(i[4:]) < 150 else "b" for i in m.image_ids]
    png = draw_map(m, "blob")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="tasks"):
        draw_map(m, "nope")
