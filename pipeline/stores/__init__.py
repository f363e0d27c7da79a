"""Feature stores: Zarr v3 + Parquet on any fsspec URI, immutable versions, conflict-safe commits, a reader.

Knows nothing of torch models or Ray.
"""
from .alloc import Allocation, allocate
from .compact import CompactResult, compact as compact_store
from .commit import ChangeSet, CommitConflict, CommitResult, Upsert, commit_change
from .diff import ListingDiff, chunk_records, diff_listing
from .layout import featureset_name
from .live import ImageState, LiveIndex
from .manifest import NoCommittedVersionError, Segment, Version, latest_version, list_versions, read_version
from .reader import FeatureStore
from .writer import (
    EncodedShard,
    FeatureOverflowError,
    FeatureStoreWriter,
    StoreTarget,
    check_feature_range,
    label_schema,
    shard_plan_hash,
)

__all__ = [
    "Allocation", "ChangeSet", "CompactResult", "compact_store", "CommitConflict", "CommitResult", "EncodedShard", "FeatureOverflowError",
    "FeatureStore", "FeatureStoreWriter", "ImageState", "LiveIndex", "NoCommittedVersionError", "Segment",
    "ListingDiff", "StoreTarget", "Upsert", "Version", "allocate", "check_feature_range", "chunk_records", "commit_change",
    "diff_listing", "featureset_name",
    "label_schema", "latest_version", "list_versions", "read_version", "shard_plan_hash",
]
