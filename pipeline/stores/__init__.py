"""Feature stores: Zarr v3 + Parquet on any fsspec URI, a commit protocol, versions, a reader.

Knows nothing of torch models or Ray.
"""
from .layout import featureset_name
from .reader import FeatureStore, NoCommittedVersionError, list_versions
from .writer import EncodedShard, FeatureStoreWriter, StoreTarget, label_schema, shard_plan_hash

__all__ = [
    "EncodedShard", "FeatureStore", "FeatureStoreWriter", "NoCommittedVersionError", "StoreTarget",
    "featureset_name", "label_schema", "list_versions", "shard_plan_hash", "torch_dataset",
]


def torch_dataset(store: FeatureStore, layer: str, *, label: str | None = None, iterable: bool = False, **kwargs):
    """A PyTorch dataset over one layer (pipeline.stores.torch_data; torch is imported here, not before)."""
    from .torch_data import torch_dataset as build

    return build(store, layer, label=label, iterable=iterable, **kwargs)
