"""Feature stores: Zarr v3 + Parquet on any fsspec URI, a commit protocol, versions, a reader.

Knows nothing of torch models or Ray.
"""
from .layout import featureset_name
from .reader import FeatureStore, NoCommittedVersionError, list_versions
from .writer import EncodedShard, FeatureStoreWriter, StoreTarget, label_schema, shard_plan_hash

__all__ = [
    "EncodedShard", "FeatureStore", "FeatureStoreWriter", "NoCommittedVersionError", "StoreTarget",
    "featureset_name", "label_schema", "list_versions", "shard_plan_hash",
]
