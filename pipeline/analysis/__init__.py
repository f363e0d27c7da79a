"""Analysis of feature sets: layer similarity (CKA), geometry, transferability (LEEP, LogME, NLEEP, H-score, kNN),
neighbours, maps, advice.

Functions taking a `store` accept a `FeatureStore` (streamed shard by shard) or any probes `FeatureTable`
(e.g. `InMemoryFeatureTable` over plain arrays). Plain numpy / scikit-learn; no Ray.
"""
from .cka import CKAMatrix, CrossCKA, CrossMoments, cka_matrix, cross_cka, linear_cka
from .geometry import (ClusterQuality, IntrinsicDimension, LayerGeometry, PCASpectrum, cluster_quality,
                       intrinsic_dimension, layer_geometry, mle_dimension, pca_spectrum, store_pca_spectrum,
                       twonn_dimension)
from .leep import leep, leep_chance, relative_leep, store_leep
from .maps import LayerMap, draw_map, embed_2d, layer_map
from .neighbors import NeighborList, ann_backend, nearest_neighbors
from .recommend import FROZEN, FULL, PARTIAL, Recommendation, describe, recommend, recommend_from_results
from .score_table import SCORE_LABELS, SCORES, layer_scores, rank_agreement, score_agreement
from .transferability import FeatureBasis, feature_basis, h_score, knn_accuracy, leep_from_posteriors, logme, nleep

__all__ = [
    "CKAMatrix", "ClusterQuality", "FeatureBasis", "SCORES", "SCORE_LABELS", "feature_basis", "h_score",
    "knn_accuracy", "layer_scores", "leep_from_posteriors", "logme", "nleep", "rank_agreement", "score_agreement", "CrossCKA", "CrossMoments", "FROZEN", "FULL", "IntrinsicDimension",
    "LayerGeometry", "LayerMap", "NeighborList", "PARTIAL", "PCASpectrum", "Recommendation", "ann_backend",
    "cka_matrix", "cluster_quality", "cross_cka", "describe", "draw_map", "embed_2d", "intrinsic_dimension",
    "layer_geometry", "layer_map", "leep", "leep_chance", "linear_cka", "mle_dimension", "nearest_neighbors",
    "pca_spectrum", "recommend", "recommend_from_results", "relative_leep", "store_leep", "store_pca_spectrum",
    "twonn_dimension",
]
