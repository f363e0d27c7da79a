"""Writes a feature set: arrays prepared by the driver, whole shards by workers, versions committed last.

Commit protocol (the Datasink lifecycle, without Ray): `prepare` creates the Zarr group and
arrays; each worker owns whole shards (row ranges aligned to Zarr shards, so no two writers
ever touch one Zarr shard) and writes data files first and the shard record last; the
driver commits a version that lists committed shards. Re-writing a shard writes the same
bytes, so retries and re-runs are harmless; readers only follow versions.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from . import layout

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
RESERVED_COLUMNS = ("image_id", "uri", "fingerprint", "row", "shard", "status", "split")


@dataclass(frozen=True)
class StoreTarget:
    root: str
    featureset: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)
    dtype: str = "float16"
    shard_rows: int = 1024
    chunk_rows: int = 256
    formats: tuple[str, ...] = ("zarr", "parquet")

    @property
    def uri(self) -> str:
        return f"{self.root.rstrip('/')}/{self.featureset}"


@dataclass
class EncodedShard:
    """One shard's worth of results, as the encoder stage hands it to the writer."""

    shard_id: int
    row_start: int
    records: list[dict]  # image_id, uri, fingerprint, split, labels per row, in row order
    ok: np.ndarray  # (n_rows,) bool
    features: dict[str, np.ndarray]  # layer -> (n_ok, dim), rows of ok records in order
    errors: list[dict]  # image_id, uri, stage, reason
    plan_hash: str


def shard_plan_hash(records: Sequence[Mapping]) -> str:
    """Identity of a shard's input: same ids and fingerprints in the same rows -> same hash."""
    return layout.stable_hash([(r["image_id"], r["fingerprint"]) for r in records])


def label_schema(records: Sequence[Mapping]) -> pa.Schema:
    """Arrow types of the label columns, inferred once over the whole listing so every shard agrees."""
    names = sorted({k for r in records for k in r.get("labels", {})})
    clash = sorted(set(names) & set(RESERVED_COLUMNS))
    if clash:
        raise ValueError(f"label column(s) {clash} collide with index columns {list(RESERVED_COLUMNS)}; rename them")
    fields = []
    for name in names:
        arr = pa.array([r.get("labels", {}).get(name) for r in records])
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.string())
        fields.append(pa.field(name, arr.type))
    return pa.schema(fields)


class FeatureStoreWriter:
    def __init__(self, target: StoreTarget) -> None:
        self.target = target
        self.fs, self.base = storage.resolve(target.uri, target.storage_options)
        self._layer_names: list[str] | None = None

    # -- driver side -------------------------------------------------------------------------
    def prepare(self, *, n_rows: int, layer_dims: Mapping[str, int], provenance: Mapping[str, Any],
                labels: pa.Schema) -> None:
        """Create (or reopen, if compatible) the feature set; refuses to mix another encoder's features."""
        meta = {
            "format_version": FORMAT_VERSION,
            "featureset": self.target.featureset,
            "dtype": self.target.dtype,
            "shard_rows": self.target.shard_rows,
            "chunk_rows": self.target.chunk_rows,
            "formats": list(self.target.formats),
            "layer_dims": dict(layer_dims),
            "label_schema": [{"name": f.name, "type": str(f.type)} for f in labels],
            "provenance": dict(provenance),
            "library": _library_version(),
        }
        meta = json.loads(json.dumps(meta))  # tuples -> lists, as it will read back
        self._layer_names = list(meta["layer_dims"])
        path = layout.featureset_json(self.base)
        if self.fs.exists(path):
            old = storage.read_json(self.fs, path)
            for key in ("dtype", "shard_rows", "chunk_rows", "layer_dims", "provenance"):
                if old.get(key) != meta[key]:
                    raise ValueError(
                        f"feature set {storage.redact_uri(self.target.uri)} already holds other features "
                        f"({key} differs: {old.get(key)!r} vs {meta[key]!r}); choose another store.featureset"
                    )
        else:
            storage.write_json_atomic(self.fs, path, meta)
        self.labels = labels
        if "zarr" in self.target.formats:
            self._prepare_zarr(n_rows, layer_dims, meta)

    def _prepare_zarr(self, n_rows: int, layer_dims: Mapping[str, int], meta: dict) -> None:
        import zarr

        store = storage.zarr_store(f"{self.target.uri}/{layout.ZARR_DIR}", self.target.storage_options,
                                   read_only=False)
        group = zarr.open_group(store, mode="a")
        shards = self.target.shard_rows if self.target.shard_rows > self.target.chunk_rows else None
        for layer, dim in layer_dims.items():
            if layer in group:
                arr = group[layer]
                if arr.shape[1] != dim:
                    raise ValueError(f"zarr array {layer} has dim {arr.shape[1]}, expected {dim}")
                if arr.shape[0] < n_rows:
                    arr.resize((n_rows, dim))
                continue
            group.create_array(
                layer, shape=(n_rows, dim), dtype=self.target.dtype,
                chunks=(self.target.chunk_rows, dim),
                shards=(shards, dim) if shards else None,
                fill_value=np.nan, dimension_names=("row", "feature"),
            )
        group.attrs.update({k: meta[k] for k in ("featureset", "dtype", "layer_dims", "provenance", "library")})

    def committed_shards(self) -> dict[int, dict]:
        """Shard records already written, by shard id (what a re-run may skip). One batched read."""
        paths = [p for p in _ls(self.fs, f"{self.base}/{layout.MANIFEST_DIR}/shards") if p.endswith(".json")]
        if not paths:
            return {}
        blobs = storage.retrying(lambda: self.fs.cat(paths), what="read shard records")  # concurrent on S3
        return {int(rec["shard_id"]): rec for rec in (json.loads(b) for b in blobs.values())}

    def shard_files(self, record: Mapping) -> list[str]:
        """Every object a committed shard needs, its record included."""
        sid = int(record["shard_id"])
        paths = [layout.shard_record_path(self.base, sid), layout.index_path(self.base, sid),
                 layout.errors_path(self.base, sid),
                 *(f"{self.base}/{p}" for p in record.get("files", {}).get("parquet", {}).values())]
        if "zarr" in self.target.formats:
            zarr_key = record["row_start"] // self.target.shard_rows
            paths += [f"{self.base}/{layout.ZARR_DIR}/{layer}/c/{zarr_key}/0" for layer in self._layers()]
        return paths

    def _layers(self) -> list[str]:
        if self._layer_names is None:
            meta = storage.read_json(self.fs, layout.featureset_json(self.base))
            self._layer_names = list(meta["layer_dims"])
        return self._layer_names

    def check_shard(self, record: Mapping) -> tuple[list[str], int]:
        """(files of a committed shard the store does not have, bytes of those it has): one HEAD per file."""
        self.fs.invalidate_cache()
        missing, size = [], 0
        for path in self.shard_files(record):
            try:
                size += int(self.fs.info(path).get("size") or 0)
            except FileNotFoundError:
                missing.append(path)
        return missing, size

    def uncommit_shard(self, shard_id: int) -> None:
        """Drop a shard's record so the next run writes it again."""
        path = layout.shard_record_path(self.base, shard_id)
        if self.fs.exists(path):
            self.fs.rm(path)

    def commit_version(self, shard_ids: Sequence[int], *, dataset_fingerprint: str, config: Mapping,
                       tombstone_rows: Sequence[int] = (), stats: Mapping | None = None,
                       records: Mapping[int, Mapping] | None = None) -> int:
        """Publish a new version listing `shard_ids`; readers switch to it atomically.

        `tombstone_rows` hides rows of those shards (deleted images, and old rows of changed ones).
        `records`: the shard records the caller has just read and verified (else read here).
        """
        records = self.committed_shards() if records is None else records
        missing = sorted(set(shard_ids) - set(records))
        if missing:
            raise RuntimeError(f"cannot commit: shards {missing[:10]} have no commit record")
        vdir = layout.versions_dir(self.base)
        while True:
            existing = [v for v in (layout.parse_version_name(p) for p in _ls(self.fs, vdir)) if v]
            version = max(existing, default=0) + 1
            doc = {
                "version": version,
                "parent": max(existing, default=None),
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                "shards": sorted(int(s) for s in shard_ids),
                "tombstone_rows": sorted(int(r) for r in tombstone_rows),
                "n_rows": sum(records[s]["n_rows"] for s in shard_ids) - len(tombstone_rows),
                "dataset_fingerprint": dataset_fingerprint,
                "config_hash": layout.stable_hash(config),
                "config": dict(config),
                "stats": dict(stats or {}),
            }
            data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
            if storage.put_if_absent(self.fs, f"{vdir}/{layout.version_name(version)}", data):
                log.info("committed version %d of %s (%d shards)", version, self.target.featureset, len(shard_ids))
                return version

    # -- worker side -------------------------------------------------------------------------
    def write_shard(self, shard: EncodedShard) -> dict:
        """Write one whole shard's files, then its record. Idempotent."""
        t = self.target
        n = len(shard.records)
        if shard.row_start % t.shard_rows:
            raise ValueError(f"shard {shard.shard_id} starts at row {shard.row_start}, not on a shard boundary")
        ok_rows = np.flatnonzero(shard.ok)
        rows = shard.row_start + np.arange(n, dtype=np.int64)
        ids = [r["image_id"] for r in shard.records]
        files: dict[str, Any] = {}
        if "zarr" in t.formats:
            self._write_zarr(shard, n, ok_rows)
        if "parquet" in t.formats:
            files["parquet"] = {}
            for layer, feats in shard.features.items():
                table = pa.table({
                    "image_id": pa.array([ids[i] for i in ok_rows], pa.string()),
                    "row": pa.array(rows[ok_rows]),
                    "vector": _vectors(feats.astype(t.dtype)),
                })
                path = layout.parquet_path(self.base, layer, shard.shard_id)
                self._put_parquet(path, table)
                files["parquet"][layer] = path.removeprefix(self.base + "/")
        index = self._index_table(shard, rows)
        self._put_parquet(layout.index_path(self.base, shard.shard_id), index)
        errors = pa.Table.from_pylist(
            [{"image_id": e["image_id"], "uri": e["uri"], "stage": e["stage"], "reason": e["reason"]}
             for e in shard.errors],
            schema=ERRORS_SCHEMA,
        )
        self._put_parquet(layout.errors_path(self.base, shard.shard_id), errors)
        record = {
            "shard_id": shard.shard_id,
            "row_start": shard.row_start,
            "n_rows": n,
            "n_ok": int(len(ok_rows)),
            "n_errors": n - int(len(ok_rows)),
            "plan_hash": shard.plan_hash,
            "files": files,
            "written_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        path = layout.shard_record_path(self.base, shard.shard_id)
        storage.retrying(lambda: storage.write_json_atomic(self.fs, path, record), what=f"commit {path}")
        return record

    def _write_zarr(self, shard: EncodedShard, n: int, ok_rows: np.ndarray) -> None:
        import zarr

        store = storage.zarr_store(f"{self.target.uri}/{layout.ZARR_DIR}", self.target.storage_options,
                                   read_only=False)
        group = zarr.open_group(store, mode="r+")
        for layer, feats in shard.features.items():
            block = np.full((n, feats.shape[1]), np.nan, dtype=self.target.dtype)
            block[ok_rows] = feats
            region = slice(shard.row_start, shard.row_start + n)
            storage.retrying(lambda: group[layer].__setitem__(region, block), what=f"zarr {layer} rows {region}")

    def _index_table(self, shard: EncodedShard, rows: np.ndarray) -> pa.Table:
        recs = shard.records
        cols = {
            "image_id": pa.array([r["image_id"] for r in recs], pa.string()),
            "uri": pa.array([r["uri"] for r in recs], pa.string()),
            "fingerprint": pa.array([r["fingerprint"] for r in recs], pa.string()),
            "row": pa.array(rows),
            "shard": pa.array(np.full(len(recs), shard.shard_id, dtype=np.int32)),
            "status": pa.array(["ok" if o else "error" for o in shard.ok], pa.string()),
            "split": pa.array([r.get("split") for r in recs], pa.string()),
        }
        for f in self.label_schema:
            cols[f.name] = pa.array([r.get("labels", {}).get(f.name) for r in recs], f.type)
        return pa.table(cols)

    @property
    def label_schema(self) -> pa.Schema:
        if not hasattr(self, "labels"):
            meta = storage.read_json(self.fs, layout.featureset_json(self.base))
            self.labels = schema_from_json(meta["label_schema"])
        return self.labels

    def _put_parquet(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        storage.retrying(lambda: storage.atomic_write_bytes(self.fs, path, data), what=f"write {path}")


ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string())])


def schema_from_json(fields: Sequence[Mapping]) -> pa.Schema:
    return pa.schema([pa.field(f["name"], _type_from_str(f["type"])) for f in fields])


def _type_from_str(name: str) -> pa.DataType:
    simple = {"string": pa.string(), "large_string": pa.large_string(), "int64": pa.int64(), "int32": pa.int32(),
              "double": pa.float64(), "float": pa.float32(), "bool": pa.bool_()}
    if name not in simple:
        raise ValueError(f"label type {name!r} is not supported; valid: {sorted(simple)}")
    return simple[name]


def _vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    arrow_type = pa.float16() if x.dtype == np.float16 else pa.float32()
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1), arrow_type), x.shape[1])


def _ls(fs, path: str) -> list[str]:
    fs.invalidate_cache(path)  # object-store listings are cached; a commit must see the latest
    try:
        return fs.ls(path, detail=False)
    except FileNotFoundError:
        return []


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"strata {version('strata')}"
    except PackageNotFoundError:
        return "strata (source)"
