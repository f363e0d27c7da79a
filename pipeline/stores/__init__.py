"""Feature stores: Zarr v3 + Parquet on any fsspec URI, immutable versions, conflict-safe commits, a reader.

Knows nothing of torch models or Ray.
"""
from .alloc import Allocation, allocate
from .compact import CompactResult, compact as compact_store
from .commit import CommitConflict, CommitResult, JobChange, commit_change
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
    "Allocation", "CommitConflict", "JobChange", "CommitResult", "CompactResult", "EncodedShard",
    "FeatureOverflowError", "FeatureStore", "FeatureStoreWriter", "ImageState", "ListingDiff", "LiveIndex",
    "NoCommittedVersionError", "Segment", "StoreTarget", "Version", "allocate", "check_feature_range",
    "chunk_records", "commit_change", "compact_store", "diff_listing", "featureset_name", "label_schema",
    "latest_version", "list_versions", "read_version", "shard_plan_hash", "torch_dataset",
]


def torch_dataset(store: FeatureStore, layer: str, *, label: str | None = None, iterable: bool = False, **kwargs):
    """A PyTorch dataset over one layer (pipeline.stores.torch_data; torch is imported here, not before)."""
    from .torch_data import torch_dataset as build

    return build(store, layer, label=label, iterable=iterable, **kwargs)
