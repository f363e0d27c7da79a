"""PyTorch datasets over one layer of a feature store: map-style in memory, or iterable and shard-aware.

Samples are dicts: `features` (float tensor of the layer's dim), `image_id` (str) and, with a label
column, `label` (int64 class index for categorical columns, see `classes`; float for numeric ones).
Imported on first use by `pipeline.stores.torch_dataset`, so that reading a store needs no torch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.utils.data

from ..labels import missing_labels
from .reader import FeatureStore

#: rows read per request by the iterable dataset (one Zarr chunk of the default store layout)
UNIT_ROWS = 256


def encode_labels(store, column: str) -> tuple[np.ndarray, list | None]:
    """(label per row aligned with the store's index, class names or None for a numeric column).

    Integer, boolean and string columns are classes, indexed in sorted order (like torchvision's
    ImageFolder); a missing label (null, or a blank string, as the probes read it) is -1. Float columns
    stay float (regression), missing as NaN.
    """
    if column not in store.label_columns:
        raise ValueError(f"unknown label column {column!r}; label columns: {store.label_columns}")
    values = store.index_table().column(column).combine_chunks()
    if pa.types.is_floating(values.type):
        return values.to_numpy(zero_copy_only=False).astype(np.float32), None
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        blank = pa.array(missing_labels(values.to_pylist()))
        values = pc.if_else(blank, pa.scalar(None, values.type), values)
    present = pc.drop_null(values)
    classes = sorted(pc.unique(present).to_pylist())
    lookup = pc.index_in(values, value_set=pa.array(classes, type=values.type))
    return pc.fill_null(lookup, -1).to_numpy(zero_copy_only=False).astype(np.int64), classes


class FeatureDataset(torch.utils.data.Dataset):
    """Map-style: the layer is read once into memory (rows in the store's order); any sampler works,
    DistributedSampler included."""

    def __init__(self, store: FeatureStore, layer: str, *, label: str | None = None, dtype=np.float32):
        self.layer = layer
        self.version = store.version
        self.image_ids = store.index_table().column("image_id").to_pylist()
        self.features = torch.from_numpy(np.ascontiguousarray(store.layer(layer, dtype=dtype)))
        self.labels, self.classes = encode_labels(store, label) if label else (None, None)
        self._label_tensor = torch.from_numpy(self.labels) if self.labels is not None else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = {"features": self.features[i], "image_id": self.image_ids[i]}
        if self._label_tensor is not None:
            sample["label"] = self._label_tensor[i]
        return sample


class IterableFeatureDataset(torch.utils.data.IterableDataset):
    """Streams the layer in units of rows that never cross a store shard; each (rank, DataLoader worker)
    takes every n-th unit, so each row is seen exactly once per epoch across all of them (ranks may get a
    few rows more or fewer than others: no row is repeated to even them out). Each worker opens the
    store itself and reads only its own rows. `shuffle` reorders units and the rows in them, the same
    way on every rank for a given `seed` and `set_epoch(epoch)`.
    """

    def __init__(self, store: FeatureStore, layer: str, *, label: str | None = None, shuffle: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, unit_rows: int = UNIT_ROWS,
                 dtype=np.float32):
        if layer not in store.layer_dims:
            raise ValueError(f"layer {layer!r} not in this feature set; layers: {store.layers}")
        if unit_rows < 1:
            raise ValueError(f"unit_rows must be >= 1, got {unit_rows}")
        self.layer, self.shuffle, self.seed, self.epoch, self.dtype = layer, shuffle, seed, 0, dtype
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        # what a worker needs to reopen the store: the same version, never a newer one
        self._uri, self._version = store.uri, store.version
        self._storage_options: Mapping[str, Any] = dict(getattr(store, "storage_options", {}) or {})
        index = store.index_table()
        self.image_ids = np.asarray(index.column("image_id").to_pylist(), dtype=object)
        self.labels, self.classes = encode_labels(store, label) if label else (None, None)
        self.units = _units(index.column("shard").to_numpy(), unit_rows)

    def set_epoch(self, epoch: int) -> None:
        """Like DistributedSampler.set_epoch: a new order each epoch when shuffling."""
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def my_units(self) -> list[np.ndarray]:
        """Positions (into the store's index) of the rows this rank and worker yield, unit by unit."""
        consumer, consumers = self._consumer()
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        mine = [self.units[u] for u in order[consumer::consumers]]
        return [rng.permutation(u) for u in mine] if self.shuffle else mine

    def __iter__(self) -> Iterator[dict[str, Any]]:
        units = self.my_units()
        if not units:
            return
        store = FeatureStore(self._uri, version=self._version, storage_options=self._storage_options)
        for unit in units:
            ids = self.image_ids[unit]
            block = torch.from_numpy(np.ascontiguousarray(store.get(list(ids), self.layer, dtype=self.dtype)))
            for j, image_id in enumerate(ids):
                sample = {"features": block[j], "image_id": image_id}
                if self.labels is not None:
                    sample["label"] = torch.as_tensor(self.labels[unit[j]])
                yield sample


def _units(shards: np.ndarray, unit_rows: int) -> list[np.ndarray]:
    """Index positions cut into runs of at most `unit_rows`, each within one shard."""
    units = []
    for shard in np.unique(shards):
        positions = np.flatnonzero(shards == shard)
        units += np.array_split(positions, math.ceil(len(positions) / unit_rows))
    return units


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if on else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    return rank, world_size


def torch_dataset(store: FeatureStore, layer: str, *, label: str | None = None, iterable: bool = False,
                  **kwargs) -> FeatureDataset | IterableFeatureDataset:
    """A PyTorch dataset over `layer` of `store`, with `label` (a label column) if given.

    `iterable=False`: FeatureDataset, map-style, the layer in memory. `iterable=True`:
    IterableFeatureDataset, streamed and split across DataLoader workers and DDP ranks (kwargs: shuffle,
    seed, rank, world_size, unit_rows).
    """
    if iterable:
        return IterableFeatureDataset(store, layer, label=label, **kwargs)
    return FeatureDataset(store, layer, label=label, **kwargs)
