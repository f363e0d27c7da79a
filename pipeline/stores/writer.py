"""Writes a feature set's blocks: arrays prepared by the driver, whole blocks by workers, records last.

Each worker owns whole blocks (row ranges aligned to Zarr shards, allocated to its job and never to another),
writes the block's data files first and its shard record last. Files are named by block and content, so a retry
writes the same bytes to the same paths and different content never lands on a path a version references.
Versions are published by ``commit``; this module never touches them.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from . import layout
from .label_types import (LABEL_TYPES, RESERVED_COLUMNS, check_label_types, check_labels, label_array,  # noqa: F401
                          label_schema, schema_from_json, type_from_str)
from .manifest import Segment
from .zarr_arrays import ensure_arrays

log = logging.getLogger(__name__)

#: Provenance keys that say where weights were found, not what they are: never a reason to refuse a store.
NON_FEATURE_KEYS = frozenset({"weights_source"})
FLOAT16_MAX = float(np.finfo(np.float16).max)


class FeatureOverflowError(ValueError):
    """Features that the store's dtype cannot hold: stopped before anything of the block is written."""


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
    """One block's worth of results, as the encoder stage hands it to the writer."""

    shard_id: int  # the block number
    row_start: int
    records: list[dict]  # image_id, uri, fingerprint, split, labels per row, in row order
    ok: np.ndarray  # (n_rows,) bool
    features: dict[str, np.ndarray]  # layer -> (n_ok, dim), rows of ok records in order
    errors: list[dict]  # image_id, uri, stage, reason
    plan_hash: str
    unit: str = ""  # the source unit the block's images come from
    copied: bool = False  # vectors copied from stored rows of the same images, not encoded (stores.copy)


def shard_plan_hash(records: Sequence[Mapping]) -> str:
    """Identity of a block's input: everything its files are made from (ids, fingerprints, URIs, labels)."""
    return layout.stable_hash([(r["image_id"], r["fingerprint"], r.get("uri"), r.get("split"),
                                sorted((r.get("labels") or {}).items())) for r in records])


def check_feature_range(layer: str, features: np.ndarray, dtype: str) -> None:
    """Refuse values the store cannot hold: float16 turns anything beyond +-65504 into inf, silently."""
    if features.size == 0:
        return
    values = np.asarray(features)
    if not np.isfinite(values).all():
        raise FeatureOverflowError(f"layer {layer!r} produced non-finite features (inf or NaN); nothing of this "
                                   f"block was written")
    if dtype == "float16":
        peak = float(np.abs(values).max())
        if peak > FLOAT16_MAX:
            raise FeatureOverflowError(
                f"layer {layer!r} has activations up to {peak:.4g}, beyond float16's range (+-{FLOAT16_MAX:g}); "
                f"they would be stored as inf. Set store.dtype=float32 (a new feature set), or leave this layer "
                f"out (encoder.layers)")


def feature_keys(provenance: Mapping) -> dict:
    """The part of a provenance that determines features: what compatibility is decided on."""
    return {k: v for k, v in provenance.items() if k not in NON_FEATURE_KEYS}


class FeatureStoreWriter:
    def __init__(self, target: StoreTarget) -> None:
        self.target = target
        self.fs, self.base = storage.resolve(target.uri, target.storage_options)
        self._meta: dict | None = None

    # -- driver side -------------------------------------------------------------------------
    def prepare(self, *, n_rows: int, layer_dims: Mapping[str, int], provenance: Mapping[str, Any],
                labels: pa.Schema) -> dict:
        """Create (or reopen, if compatible) the feature set and grow its arrays to ``n_rows``.

        Refuses a feature set that holds other features: compatibility is decided by what determines the
        features (weights sha256, architecture, layers, pooling, preprocessing, dtype, geometry), never by
        where the weights were found. Returns the feature set's metadata (its label schema wins over
        ``labels``).
        """
        meta = {
            "format_version": layout.FORMAT_VERSION,
            "featureset": self.target.featureset,
            "dtype": self.target.dtype,
            "shard_rows": self.target.shard_rows,
            "chunk_rows": self.target.chunk_rows,
            "formats": list(self.target.formats),
            "layer_dims": dict(layer_dims),
            "label_schema": [{"name": f.name, "type": str(f.type)} for f in labels],
            "provenance": storage.redact(dict(provenance)),
            "library": _library_version(),
        }
        meta = json_round_trip(meta)
        check_labels(labels)
        path = layout.featureset_json(self.base)
        if not storage.put_if_absent(self.fs, path, storage.json_bytes(meta)):
            old = storage.read_json(self.fs, path)
            if old != meta and self._orphan():
                log.info("feature set %s: replacing the metadata of a first run that wrote nothing",
                         self.target.featureset)
                storage.atomic_write_bytes(self.fs, path, storage.json_bytes(meta))
                geometry = ("layer_dims", "dtype", "shard_rows", "chunk_rows")
                stale = any(old.get(k) != meta.get(k) for k in geometry)
                if stale and self.fs.exists(f"{self.base}/{layout.ZARR_DIR}"):  # empty arrays of another geometry
                    self.fs.rm(f"{self.base}/{layout.ZARR_DIR}", recursive=True)
                old = meta
            self._check_compatible(old, meta)
            check_label_types(old["label_schema"], meta["label_schema"], self.target.featureset)
            dropped = sorted({f["name"] for f in meta["label_schema"]} - {f["name"] for f in old["label_schema"]})
            if dropped:
                log.warning("label column(s) %s are not in feature set %s (its labels: %s); they are not stored",
                            dropped, self.target.featureset, [f["name"] for f in old["label_schema"]])
            meta = old
        self._meta = meta
        if "zarr" in self.target.formats:
            attrs = {k: meta[k] for k in ("featureset", "dtype", "layer_dims", "provenance", "library")}
            ensure_arrays(self.target, self.fs, self.base, n_rows=n_rows, layer_dims=layer_dims, attrs=attrs)
        return meta

    def _orphan(self) -> bool:
        """No committed version and no written block: the metadata of a first run that failed early (a bad
        source option, say) binds nothing, and a corrected run may replace it."""
        from .manifest import list_versions

        return not list_versions(self.fs, self.base) and not self.fs.glob(f"{layout.shards_dir(self.base)}/*.json")

    def _check_compatible(self, old: Mapping, new: Mapping) -> None:
        if int(old.get("format_version", 1)) < layout.FORMAT_VERSION:
            raise ValueError(
                f"feature set {storage.redact_uri(self.target.uri)} was written by an older strata (store format "
                f"{old.get('format_version', 1)}); it stays readable, but new rows go to a new feature set: "
                f"choose another store.featureset or store.root")
        for key in ("dtype", "shard_rows", "chunk_rows", "formats", "layer_dims"):
            if old.get(key) != new[key]:
                raise ValueError(
                    f"feature set {storage.redact_uri(self.target.uri)} already holds other features "
                    f"({key} differs: {old.get(key)!r} vs {new[key]!r}); choose another store.featureset")
        a, b = feature_keys(old["provenance"]), feature_keys(new["provenance"])
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                raise ValueError(
                    f"feature set {storage.redact_uri(self.target.uri)} already holds other features "
                    f"(provenance {key} differs: {a.get(key)!r} vs {b.get(key)!r}); choose another store.featureset")

    def grow(self, n_rows: int) -> None:
        """Make the Zarr arrays hold at least ``n_rows`` rows (the blocks this job was given)."""
        if "zarr" in self.target.formats:
            ensure_arrays(self.target, self.fs, self.base, n_rows=n_rows, layer_dims=self.meta["layer_dims"],
                          attrs={})

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = storage.read_json(self.fs, layout.featureset_json(self.base))
        return self._meta

    @property
    def label_schema(self) -> pa.Schema:
        return schema_from_json(self.meta["label_schema"])

    def read_record(self, block: int) -> dict | None:
        try:
            return storage.read_json(self.fs, layout.shard_record_path(self.base, block))
        except FileNotFoundError:
            return None

    def written_records(self, blocks: Sequence[int]) -> dict[int, dict]:
        """Shard records of ``blocks`` that exist (what a re-run may skip): one batched read."""
        paths = [layout.shard_record_path(self.base, b) for b in blocks]
        if not paths:
            return {}
        self.fs.invalidate_cache()
        blobs = storage.cat_small(self.fs, paths, on_error="omit")
        return {int(rec["shard_id"]): rec for rec in (json.loads(b) for b in blobs.values())}

    def segment_files(self, segment: Segment) -> list[str]:
        """Every object a written block needs: its tables, its Zarr shard per layer, its record."""
        paths = [layout.shard_record_path(self.base, segment.block),
                 *(f"{self.base}/{p}" for p in segment.files())]
        if "zarr" in self.target.formats:
            paths += [f"{self.base}/{layout.zarr_chunk_file(layer, segment.block)}" for layer in self._layers()
                      if segment.n_ok]
        return paths

    def _layers(self) -> list[str]:
        return list(self.meta["layer_dims"])

    def check_segment(self, segment: Segment) -> tuple[list[str], int]:
        """(files of a written block the store does not have, bytes of those it has): one HEAD per file."""
        self.fs.invalidate_cache()
        missing, size = [], 0
        for path in self.segment_files(segment):
            try:
                size += int(self.fs.info(path).get("size") or 0)
            except FileNotFoundError:
                missing.append(path)
        return missing, size

    def forget_block(self, block: int) -> None:
        """Drop a block's record so that it is written again (its files went missing)."""
        path = layout.shard_record_path(self.base, block)
        if self.fs.exists(path):
            self.fs.rm(path)

    def write_index_revision(self, segment: Segment, table: pa.Table) -> Segment:
        """A label edit of ``segment``: its index with new labels/splits/URIs, as a new file beside the old."""
        revision = layout.stable_hash(table.to_pylist())
        rel = layout.index_file(segment.block, segment.content, revision)
        self._put_parquet(f"{self.base}/{rel}", table)
        return replace(segment, index=rel)

    # -- worker side -------------------------------------------------------------------------
    def write_shard(self, shard: EncodedShard) -> dict:
        """Write one whole block's files, then its record. Idempotent: a retry writes the same bytes."""
        t = self.target
        n = len(shard.records)
        if shard.row_start != shard.shard_id * t.shard_rows or n > t.shard_rows:
            raise ValueError(f"block {shard.shard_id} must start at row {shard.shard_id * t.shard_rows} and hold at "
                             f"most {t.shard_rows} rows; got row {shard.row_start}, {n} rows")
        for layer, feats in shard.features.items():
            check_feature_range(layer, feats, t.dtype)
        ok_rows = np.flatnonzero(shard.ok)
        rows = shard.row_start + np.arange(n, dtype=np.int64)
        ids = [r["image_id"] for r in shard.records]
        files: dict[str, Any] = {"parquet": {}}
        if "zarr" in t.formats:
            self._write_zarr(shard, n, ok_rows)
        if "parquet" in t.formats:
            for layer, feats in shard.features.items():
                table = pa.table({
                    "image_id": pa.array([ids[i] for i in ok_rows], pa.string()),
                    "row": pa.array(rows[ok_rows]),
                    "vector": _vectors(feats.astype(t.dtype)),
                })
                rel = layout.parquet_file(layer, shard.shard_id, shard.plan_hash)
                self._put_parquet(f"{self.base}/{rel}", table)
                files["parquet"][layer] = rel
        files["index"] = layout.index_file(shard.shard_id, shard.plan_hash)
        self._put_parquet(f"{self.base}/{files['index']}", self._index_table(shard, rows))
        errors = pa.Table.from_pylist(
            [{"image_id": e["image_id"], "uri": storage.redact_uri(e["uri"]), "stage": e["stage"],
              "reason": storage.scrub(e["reason"])} for e in shard.errors],
            schema=ERRORS_SCHEMA,
        )
        files["errors"] = layout.errors_file(shard.shard_id, shard.plan_hash)
        self._put_parquet(f"{self.base}/{files['errors']}", errors)
        record = {
            "shard_id": shard.shard_id,
            "row_start": shard.row_start,
            "n_rows": n,
            "n_ok": int(len(ok_rows)),
            "n_errors": n - int(len(ok_rows)),
            "error_rows": [int(i) for i in np.flatnonzero(~np.asarray(shard.ok, dtype=bool))],
            "plan_hash": shard.plan_hash,
            "unit": shard.unit,
            "files": files,
            "written_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        if shard.copied:
            record["copied"] = True
        path = layout.shard_record_path(self.base, shard.shard_id)
        storage.write_json_atomic(self.fs, path, record)
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
            group[layer][region] = block

    def _index_table(self, shard: EncodedShard, rows: np.ndarray) -> pa.Table:
        recs = shard.records
        cols = {
            "image_id": pa.array([r["image_id"] for r in recs], pa.string()),
            "uri": pa.array([storage.redact_uri(r["uri"]) for r in recs], pa.string()),
            "fingerprint": pa.array([r["fingerprint"] for r in recs], pa.string()),
            "row": pa.array(rows),
            "shard": pa.array(np.full(len(recs), shard.shard_id, dtype=np.int32)),
            "status": pa.array(["ok" if o else "error" for o in shard.ok], pa.string()),
            "split": pa.array([r.get("split") for r in recs], pa.string()),
        }
        for f in self.label_schema:
            cols[f.name] = label_array(f, [r.get("labels", {}).get(f.name) for r in recs])
        return pa.table(cols)

    def _put_parquet(self, path: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        storage.atomic_write_bytes(self.fs, path, data)


def json_round_trip(obj):
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


ERRORS_SCHEMA = pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()),
                           ("reason", pa.string())])


def _vectors(x: np.ndarray) -> pa.FixedSizeListArray:
    arrow_type = pa.float16() if x.dtype == np.float16 else pa.float32()
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1), arrow_type), x.shape[1])


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"strata {version('strata')}"
    except PackageNotFoundError:
        return "strata (source)"
