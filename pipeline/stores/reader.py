"""Reads a committed version of a feature set: layers, index, errors; lazily, chunk by chunk."""
from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from . import layout
from .live import LiveIndex, read_tables
from .manifest import NoCommittedVersionError, VersionNotFoundError, list_versions, read_version
from .writer import ERRORS_SCHEMA, schema_from_json

log = logging.getLogger(__name__)


class ImageNotFoundError(FileNotFoundError, KeyError):
    """Image ids the opened version does not hold: a KeyError for callers, "not found" (exit 3) for the CLI."""

__all__ = ["FeatureStore", "NoCommittedVersionError", "list_versions"]


def _nullable_int(t: pa.DataType):
    """pandas' nullable integer dtype of an Arrow integer type (None: the default conversion)."""
    if not pa.types.is_integer(t):
        return None
    import pandas as pd

    return pd.api.types.pandas_dtype(f"{'U' if pa.types.is_unsigned_integer(t) else ''}Int{t.bit_width}")


class FeatureStore:
    """One version of a feature set (the latest committed one unless pinned).

    Rows are the images encoded without error, in row order; `layer()` and `index()` align.
    Everything read belongs to the one version opened: its files are never rewritten, so a reader never
    sees another version's rows, however many jobs commit meanwhile.
    Also satisfies the probes' FeatureTable protocol (`layers`, `features`, `index`).
    """

    def __init__(self, uri: str, *, version: int | None = None, storage_options: Mapping[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.base = storage.resolve(self.uri, self.storage_options)
        try:
            self.meta = storage.read_json(self.fs, layout.featureset_json(self.base))
        except FileNotFoundError:
            raise FileNotFoundError(f"no strata feature set at {storage.redact_uri(uri)} "
                                    f"(missing {layout.MANIFEST_DIR}/featureset.json)") from None
        versions = list_versions(self.fs, self.base)
        if not versions:
            raise NoCommittedVersionError(f"feature set {storage.redact_uri(uri)} has no committed version yet")
        if version is not None and (isinstance(version, bool) or not isinstance(version, numbers.Integral)):
            raise TypeError(f"version must be a committed version number (int), got {version!r}; committed "
                            f"versions: {versions}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise VersionNotFoundError(f"version {version} not found; committed versions: {versions}")
        self.version = version
        self.info = read_version(self.fs, self.base, version, meta=self.meta)
        self.manifest = self.info.to_json()
        self._live: LiveIndex | None = None
        self._zarr_group = None

    @classmethod
    def open(cls, uri: str, **kw) -> "FeatureStore":
        return cls(uri, **kw)

    def versions(self) -> list[int]:
        return list_versions(self.fs, self.base)

    @property
    def layers(self) -> list[str]:
        """Layer names in network order (early -> late), as the encoder recorded them."""
        dims = self.meta["layer_dims"]
        order = [layer for layer in self.meta["provenance"].get("layers", []) if layer in dims]
        return order + [layer for layer in dims if layer not in order]

    @property
    def layer_dims(self) -> dict[str, int]:
        return {layer: int(self.meta["layer_dims"][layer]) for layer in self.layers}

    @property
    def provenance(self) -> dict:
        return dict(self.meta["provenance"])

    @property
    def label_columns(self) -> list[str]:
        return [f["name"] for f in self.meta["label_schema"]]

    @property
    def class_names(self) -> dict[str, list[str]]:
        """label -> its class names, for integer labels that index them (a ``datasets`` ``ClassLabel``), as this
        version's source named them: ``store.class_names["label"][3]`` is class 3's name."""
        return {k: list(v) for k, v in self.info.class_names.items()}

    def __len__(self) -> int:
        return self.index_table().num_rows

    # -- tables ------------------------------------------------------------------------------
    def live_index(self) -> LiveIndex:
        if self._live is None:
            labels = [f.name for f in schema_from_json(self.meta["label_schema"])]
            self._live = LiveIndex.of(self.fs, self.base, self.info, labels)
        return self._live

    def index_table(self, *, include_errors: bool = False) -> pa.Table:
        """Index rows of this version (image_id, uri, fingerprint, row, shard, status, split, labels), by row."""
        table = self.live_index().table
        if include_errors:
            return table
        return table.filter(pc.equal(table.column("status"), "ok"))

    def index(self):
        """The index as a pandas DataFrame (probes' FeatureTable protocol).

        An all-empty `split` column is dropped: no split was recorded, so probes generate one. An integer label
        with missing values stays integer (pandas ``Int64``), not float: class 3 is never read as ``3.0``. A
        ClassLabel's names ride in ``df.attrs["class_names"]``, so the probes' messages name its classes.
        """
        table = self.index_table()
        df = table.to_pandas()
        nullable = [f.name for f in table.schema
                    if f.name in self.label_columns and pa.types.is_integer(f.type) and table.column(f.name).null_count]
        if nullable:
            exact = table.select(nullable).to_pandas(types_mapper=_nullable_int)
            for name in nullable:
                df[name] = exact[name]
        if "split" in df.columns and df["split"].isna().all():
            df = df.drop(columns="split")
        df.attrs["class_names"] = self.class_names
        return df

    def errors(self) -> pa.Table:
        """Images of this version that failed (image_id, uri, stage, reason)."""
        segments = [seg for seg in self.info.segments if seg.n_ok < seg.n_rows]
        tables = read_tables(self.fs, self.base, [seg.errors for seg in segments], ERRORS_SCHEMA)
        if not tables:
            return ERRORS_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        live = self.index_table(include_errors=True)
        failed = live.filter(pc.equal(live.column("status"), "error")).column("image_id")
        return table.filter(pc.is_in(table.column("image_id"), failed))

    def labels(self, column: str) -> np.ndarray:
        if column not in self.label_columns:
            raise ValueError(f"unknown label column {column!r}; label columns: {self.label_columns}")
        return self.index_table().column(column).to_numpy(zero_copy_only=False)

    # -- features ----------------------------------------------------------------------------
    def _check_layer(self, layer: str) -> None:
        if layer not in self.layer_dims:
            raise ValueError(f"layer {layer!r} not in this feature set; layers: {self.layers}")

    def _zarr(self, layer: str):
        import zarr

        if self._zarr_group is None:
            store = storage.zarr_store(f"{self.uri}/{layout.ZARR_DIR}", self.storage_options, read_only=True)
            self._zarr_group = zarr.open_group(store, mode="r")
        return self._zarr_group[layer]

    def iter_layer(self, layer: str, *, dtype=np.float32) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """(index rows, features) one segment at a time, so a layer never has to fit in memory."""
        self._check_layer(layer)
        index = self.index_table()
        shards = index.column("shard").to_numpy()
        rows = index.column("row").to_numpy()
        use_zarr = "zarr" in self.meta["formats"]
        segments = self.info.segment_map()
        for shard_id in np.unique(shards):
            sel = np.flatnonzero(shards == shard_id)
            shard_rows = rows[sel]
            if use_zarr:
                lo, hi = int(shard_rows.min()), int(shard_rows.max()) + 1
                block = self._zarr(layer)[lo:hi][shard_rows - lo]
            else:
                block = self._parquet_rows(layer, segments[int(shard_id)].parquet[layer], shard_rows)
            yield index.take(pa.array(sel)), block.astype(dtype, copy=False)

    def _parquet_rows(self, layer: str, path: str, rows: np.ndarray) -> np.ndarray:
        (t,) = read_tables(self.fs, self.base, [path])
        pos = {int(r): i for i, r in enumerate(t.column("row").to_numpy())}
        flat = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vecs = flat.reshape(t.num_rows, self.layer_dims[layer])
        return vecs[[pos[int(r)] for r in rows]]

    def layer(self, layer: str, *, dtype=np.float32) -> np.ndarray:
        """(n, dim) features aligned with `index()`."""
        parts = [block for _, block in self.iter_layer(layer, dtype=dtype)]
        if not parts:
            return np.zeros((0, self.layer_dims[layer]), dtype=dtype)
        return np.concatenate(parts)

    features = layer  # probes' FeatureTable protocol

    def to_xarray(self, layer: str, *, dtype=np.float32):
        """The layer as an xarray DataArray with image_id and label coordinates (pipeline.stores.xarray_view)."""
        from .xarray_view import to_xarray

        return to_xarray(self, layer, dtype=dtype)

    def torch(self, layer: str):
        import torch

        return torch.from_numpy(self.layer(layer))

    def get(self, image_ids: Sequence[str], layer: str, *, dtype=np.float32) -> np.ndarray:
        """Rows for the given image ids, in the order given."""
        self._check_layer(layer)
        index = self.index_table()
        where = {i: k for k, i in enumerate(index.column("image_id").to_pylist())}
        missing = [i for i in image_ids if i not in where]
        if missing:
            raise ImageNotFoundError(f"{len(missing)} image ids not in version {self.version}: {missing[:5]}")
        rows = index.column("row").to_numpy()[[where[i] for i in image_ids]]
        if "zarr" in self.meta["formats"]:
            return self._zarr(layer).get_orthogonal_selection((rows, slice(None))).astype(dtype)
        full = self.layer(layer, dtype=dtype)
        return full[[where[i] for i in image_ids]]

    def summary(self) -> dict:
        p = self.provenance
        return {
            "uri": storage.redact_uri(storage.absolute_uri(self.uri)),
            "featureset": self.meta["featureset"],
            "version": self.version,
            "versions": self.versions(),
            "encoder": p.get("encoder"),
            "weights": p.get("weights_source"),
            "weights_sha256": p.get("weights_sha256"),
            "preprocessing": p.get("preprocessing"),
            "pooling": p.get("pooling"),
            "dtype": self.meta["dtype"],
            "layers": self.layer_dims,
            "rows": len(self),
            "errors": self.index_table(include_errors=True).num_rows - len(self),
            "labels": self.label_columns,
            "class_names": self.class_names,
            "dataset_fingerprint": self.info.dataset_fingerprint,
            "created_at": self.info.created_at,
            "parent": self.info.parent,
            "operation": self.info.operation,
            "library": self.meta.get("library"),
        }
