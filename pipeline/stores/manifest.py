"""Version documents: the segments a version is made of, its deleted rows, its parent. Immutable once published.

A version lists every live segment (a block written once by one job) with the files that hold it and the rows
of it that are deleted. Plain readers get flat copies of what they need: ``index_files``, ``parquet_files`` per
layer and ``deleted_rows``.
"""
from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import storage
from . import layout
from .cas import read_settled


class NoCommittedVersionError(FileNotFoundError):
    pass


class VersionNotFoundError(FileNotFoundError, ValueError):
    """A pinned version the feature set does not hold (never committed, or retired by retention)."""


@dataclass(frozen=True)
class Segment:
    """One written block as a version sees it."""

    block: int
    row_start: int
    n_rows: int
    n_ok: int
    content: str  # hash of the block's inputs: names its files
    index: str  # relative path of its index table (the latest label revision)
    errors: str
    parquet: Mapping[str, str] = field(default_factory=dict)  # layer -> relative path
    deleted: tuple[int, ...] = ()  # rows of this block no longer in the version
    unit: str = ""  # the source unit (tar, row group, listing page) whose images the block holds

    @property
    def row_end(self) -> int:
        return self.row_start + self.n_rows

    @property
    def live_rows(self) -> int:
        return self.n_rows - len(self.deleted)

    def with_deleted(self, rows: Iterable[int]) -> Segment:
        return replace(self, deleted=tuple(sorted({*self.deleted, *(int(r) for r in rows)})))

    def to_json(self) -> dict:
        return {"block": self.block, "row_start": self.row_start, "n_rows": self.n_rows, "n_ok": self.n_ok,
                "content": self.content, "index": self.index, "errors": self.errors,
                "parquet": dict(sorted(self.parquet.items())), "deleted": list(self.deleted), "unit": self.unit}

    @classmethod
    def from_json(cls, d: Mapping) -> Segment:
        return cls(block=int(d["block"]), row_start=int(d["row_start"]), n_rows=int(d["n_rows"]),
                   n_ok=int(d["n_ok"]), content=d["content"], index=d["index"], errors=d["errors"],
                   parquet=dict(d.get("parquet") or {}), deleted=tuple(int(r) for r in d.get("deleted", ())),
                   unit=d.get("unit", ""))

    @classmethod
    def from_record(cls, record: Mapping) -> Segment:
        """The segment a block's writer describes in its shard record."""
        files = record["files"]
        return cls(block=int(record["shard_id"]), row_start=int(record["row_start"]), n_rows=int(record["n_rows"]),
                   n_ok=int(record["n_ok"]), content=record["plan_hash"], index=files["index"],
                   errors=files["errors"], parquet=dict(files.get("parquet") or {}), unit=record.get("unit", ""))

    def files(self) -> list[str]:
        """Relative paths of its tables (Zarr chunks aside)."""
        return [self.index, self.errors, *self.parquet.values()]


@dataclass(frozen=True)
class Version:
    version: int
    parent: int | None
    created_at: str
    operation: str
    segments: tuple[Segment, ...]
    dataset_fingerprint: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    changes: Mapping[str, Any] = field(default_factory=dict)
    job_id: str = ""
    format_version: int = layout.FORMAT_VERSION
    units: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # unit id -> fingerprint, meta
    class_names: Mapping[str, Sequence[str]] = field(default_factory=dict)  # label -> the names its integers index

    @property
    def n_rows(self) -> int:
        return sum(s.live_rows for s in self.segments)

    @property
    def row_end(self) -> int:
        return max((s.row_end for s in self.segments), default=0)

    def segment_map(self) -> dict[int, Segment]:
        return {s.block: s for s in self.segments}

    def unit_segments(self, unit: str) -> list[Segment]:
        return sorted((s for s in self.segments if s.unit == unit), key=lambda s: s.block)

    def by_unit(self) -> dict[str, list[Segment]]:
        out: dict[str, list[Segment]] = {u: [] for u in self.units}
        for s in sorted(self.segments, key=lambda s: s.block):
            out.setdefault(s.unit, []).append(s)
        return out

    def to_json(self) -> dict:
        segments = sorted(self.segments, key=lambda s: s.block)
        layers = sorted({layer for s in segments for layer in s.parquet})
        return {
            "format_version": self.format_version, "version": self.version, "parent": self.parent,
            "created_at": self.created_at, "operation": self.operation, "job_id": self.job_id,
            "dataset_fingerprint": self.dataset_fingerprint, "n_rows": self.n_rows, "row_end": self.row_end,
            "segments": [s.to_json() for s in segments],
            # flat copies for plain readers (pyarrow, duckdb): no strata needed to read one version exactly
            "index_files": [s.index for s in segments],
            "parquet_files": {layer: [s.parquet[layer] for s in segments if layer in s.parquet] for layer in layers},
            "deleted_rows": sorted(r for s in segments for r in s.deleted),
            "units": {u: dict(v) for u, v in sorted(self.units.items())},
            "config": dict(self.config), "config_hash": layout.stable_hash(dict(self.config)),
            "stats": dict(self.stats), "changes": dict(self.changes),
            "class_names": {k: list(v) for k, v in sorted(self.class_names.items())},
        }

    def to_bytes(self) -> bytes:
        """Compact JSON: a version lists every live segment, so its size grows with the store."""
        return (json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_json(cls, d: Mapping) -> Version:
        if int(d.get("format_version", 1)) < 2 and "segments" not in d:
            raise ValueError("format 1 version documents are read through read_version")
        return cls(version=int(d["version"]), parent=d.get("parent"), created_at=d.get("created_at", ""),
                   operation=d.get("operation", ""), segments=tuple(Segment.from_json(s) for s in d["segments"]),
                   dataset_fingerprint=d.get("dataset_fingerprint", ""), config=d.get("config") or {},
                   stats=d.get("stats") or {}, changes=d.get("changes") or {}, job_id=d.get("job_id", ""),
                   format_version=int(d.get("format_version", layout.FORMAT_VERSION)),
                   units={u: dict(v) for u, v in (d.get("units") or {}).items()},
                   class_names={k: list(v) for k, v in (d.get("class_names") or {}).items()})


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def list_versions(fs, base: str) -> list[int]:
    return sorted(v for v in (layout.parse_version_name(p) for p in ls(fs, layout.versions_dir(base))) if v)


def read_version(fs, base: str, version: int, *, meta: Mapping | None = None) -> Version:
    """Version ``version`` of the feature set at ``base`` (format 1 documents are converted on read)."""
    doc = json.loads(read_settled(fs, layout.version_path(base, version)))
    if "segments" in doc:
        return Version.from_json(doc)
    meta = meta if meta is not None else storage.read_json(fs, layout.featureset_json(base))
    return _from_v1(fs, base, doc, meta)


def latest_version(fs, base: str) -> Version | None:
    versions = list_versions(fs, base)
    return read_version(fs, base, versions[-1]) if versions else None


def _from_v1(fs, base: str, doc: Mapping, meta: Mapping) -> Version:
    """A format 1 version (shards named by id, tombstones by row) seen as segments, for reading."""
    tomb = {int(r) for r in doc.get("tombstone_rows", [])}
    paths = [f"{layout.shards_dir(base)}/shard-{int(s):06d}.json" for s in doc["shards"]]
    records = [json.loads(b) for b in fs.cat(paths).values()] if paths else []
    segments = []
    for rec in sorted(records, key=lambda r: int(r["shard_id"])):
        sid, start, n = int(rec["shard_id"]), int(rec["row_start"]), int(rec["n_rows"])
        segments.append(Segment(
            block=start // int(meta["shard_rows"]), row_start=start, n_rows=n, n_ok=int(rec["n_ok"]),
            content=rec["plan_hash"], index=layout.v1_index_file(sid), errors=layout.v1_errors_file(sid),
            parquet=dict((rec.get("files") or {}).get("parquet") or {}),
            deleted=tuple(sorted(r for r in tomb if start <= r < start + n))))
    return Version(version=int(doc["version"]), parent=doc.get("parent"), created_at=doc.get("created_at", ""),
                   operation="extract", segments=tuple(segments), dataset_fingerprint=doc.get("dataset_fingerprint", ""),
                   config=doc.get("config") or {}, stats=doc.get("stats") or {}, format_version=1)


def ls(fs, path: str) -> list[str]:
    """Fresh listing of ``path`` (object-store listings are cached; commits must see the latest), temporaries
    of interrupted writes left out."""
    fs.invalidate_cache(path)
    try:
        return [p for p in fs.ls(path, detail=False) if not storage.is_temporary(p)]
    except FileNotFoundError:
        return []


def segment_paths(base: str, segments: Sequence[Segment]) -> list[str]:
    return [f"{base}/{p}" for s in segments for p in s.files()]
