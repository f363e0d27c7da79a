"""The Zarr side of a feature set: one (rows, dim) array per layer that only ever grows.

Arrays are created and grown under the store lease, by editing the ``shape`` in each array's ``zarr.json``
(grow-only: zarr-python's ``resize`` would delete chunks outside a smaller shape, and a stale shape must never
shrink anything). Rows are written by whole blocks, each block one Zarr shard, so writers never share a shard.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np

from .. import storage
from . import layout
from .lock import store_lease

log = logging.getLogger(__name__)


def _array_meta_path(base: str, layer: str) -> str:
    return f"{base}/{layout.ZARR_DIR}/{layer}/zarr.json"


def ensure_arrays(target, fs, base: str, *, n_rows: int, layer_dims: Mapping[str, int], attrs: Mapping) -> None:
    """Create the group and one array per layer if absent, and grow each to at least ``n_rows`` rows."""
    need = _missing_or_short(fs, base, layer_dims, n_rows)
    if not need:
        return
    with store_lease(fs, base, purpose=f"zarr arrays to {n_rows} rows"):
        need = _missing_or_short(fs, base, layer_dims, n_rows)
        missing = {layer for layer, shape in need.items() if shape is None}
        if missing:
            _create(target, n_rows, {k: layer_dims[k] for k in layer_dims if k in missing}, attrs)
        for layer, rows in need.items():
            if rows is not None:
                _grow(fs, base, layer, n_rows)


def _missing_or_short(fs, base: str, layer_dims: Mapping[str, int], n_rows: int) -> dict[str, int | None]:
    """Layers whose array is absent (None) or shorter than ``n_rows`` (its rows)."""
    out: dict[str, int | None] = {}
    for layer, dim in layer_dims.items():
        try:
            meta = json.loads(storage.cat_small(fs, _array_meta_path(base, layer)))
        except FileNotFoundError:
            out[layer] = None
            continue
        rows, have_dim = meta["shape"]
        if have_dim != dim:
            raise ValueError(f"zarr array {layer} has dim {have_dim}, expected {dim}")
        if rows < n_rows:
            out[layer] = rows
    return out


def _create(target, n_rows: int, layer_dims: Mapping[str, int], attrs: Mapping) -> None:
    import zarr

    store = storage.zarr_store(f"{target.uri}/{layout.ZARR_DIR}", target.storage_options, read_only=False)
    group = zarr.open_group(store, mode="a")
    if not group.attrs.get("featureset"):
        group.attrs.update(dict(attrs))
    sharded = target.shard_rows > target.chunk_rows
    for layer, dim in layer_dims.items():
        group.create_array(
            layer, shape=(n_rows, dim), dtype=target.dtype, chunks=(target.chunk_rows, dim),
            shards=(target.shard_rows, dim) if sharded else None, fill_value=np.nan,
            dimension_names=("row", f"feature_{layer}"), overwrite=False,  # layers differ in width: for
            # xr.open_zarr one shared "feature" dimension would conflict
        )


def _grow(fs, base: str, layer: str, n_rows: int) -> None:
    path = _array_meta_path(base, layer)
    meta = json.loads(storage.cat_small(fs, path))
    if meta["shape"][0] >= n_rows:
        return
    meta["shape"][0] = n_rows
    storage.atomic_write_bytes(fs, path, json.dumps(meta, indent=2).encode())
    log.debug("zarr array %s grown to %d rows", layer, n_rows)


def array_rows(fs, base: str, layer: str) -> int:
    return int(json.loads(storage.cat_small(fs, _array_meta_path(base, layer)))["shape"][0])
