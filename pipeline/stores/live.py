"""The live index of a version: its segments' index rows minus deleted rows, one row per image.

Built once from a version's index files; moved to a later version by reading only what changed between the
two (new segments, new label revisions, new deletions), which keeps a commit's rebase proportional to the
other committers' changes rather than to the store.
"""
from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from .manifest import Segment, Version

#: Index columns that are not the image's metadata (labels, split and URI are).
_STATE_COLUMNS = ("image_id", "fingerprint", "row", "shard", "status")


@dataclass(frozen=True)
class ImageState:
    """Where an image lives in a version and what it is."""

    row: int
    shard: int
    fingerprint: str
    status: str
    meta: tuple  # (uri, split, sorted labels) as stored

    @property
    def content(self) -> tuple[str, str]:
        return self.fingerprint, self.status


def meta_key(uri: str | None, split: str | None, labels: Mapping[str, Any]) -> tuple:
    return (uri, split, tuple(sorted((k, _plain(v)) for k, v in labels.items())))


def state_of(uri: str | None, split: str | None, labels: Mapping[str, Any]) -> tuple:
    """The metadata key of a listed image, as its index row would store it (URI credentials redacted)."""
    return meta_key(storage.redact_uri(uri) if uri else uri, split, labels)


def _plain(v: Any) -> Any:
    v = v.item() if isinstance(v, np.generic) else v
    return None if isinstance(v, float) and v != v else v  # NaN: a missing label, as Arrow stores it


def read_tables(fs, base: str, paths: Sequence[str], schema: pa.Schema | None = None) -> list[pa.Table]:
    """Parquet tables at ``paths`` (relative to ``base``), fetched concurrently, in the given order."""
    if not paths:
        return []
    full = [f"{base}/{p}" for p in paths]
    blobs = storage.cat_small(fs, full)
    return [pq.read_table(io.BytesIO(blobs[p]), schema=schema) for p in full]


def segment_index(table: pa.Table, segment: Segment) -> pa.Table:
    """A segment's index rows that are live (its deleted rows left out)."""
    if not segment.deleted:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("row"), pa.array(segment.deleted, pa.int64()))))


class LiveIndex:
    """Index rows of one version, by row. Columns: image_id, uri, fingerprint, row, shard, status, split, labels."""

    def __init__(self, version: Version | None, tables: Mapping[int, pa.Table], label_columns: Sequence[str]):
        self.version = version
        self._tables = dict(tables)  # block -> live index rows of that segment
        self.label_columns = list(label_columns)
        self._table: pa.Table | None = None
        self._pos: dict[str, int] | None = None

    @classmethod
    def of(cls, fs, base: str, version: Version, label_columns: Sequence[str]) -> LiveIndex:
        segments = list(version.segments)
        tables = read_tables(fs, base, [s.index for s in segments])
        return cls(version, {s.block: segment_index(t, s) for s, t in zip(segments, tables)}, label_columns)

    @property
    def table(self) -> pa.Table:
        if self._table is None:
            parts = [self._tables[b] for b in sorted(self._tables)]
            if parts:
                self._table = pa.concat_tables(parts, promote_options="default").sort_by("row")
            else:
                self._table = pa.table({"image_id": pa.array([], pa.string()), "fingerprint": pa.array([], pa.string()),
                                        "row": pa.array([], pa.int64()), "shard": pa.array([], pa.int32()),
                                        "status": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                                        "split": pa.array([], pa.string())})
        return self._table

    def segment_table(self, block: int) -> pa.Table:
        return self._tables[block]

    def __len__(self) -> int:
        return self.table.num_rows

    def _positions(self) -> dict[str, int]:
        if self._pos is None:
            self._pos = {i: k for k, i in enumerate(self.table.column("image_id").to_pylist())}
        return self._pos

    def states(self, image_ids: Iterable[str] | None = None) -> dict[str, ImageState]:
        """ImageState of each given image that the version holds (all images when ``image_ids`` is None)."""
        table = self.table
        if image_ids is not None:
            pos = self._positions()
            idx = sorted({pos[i] for i in image_ids if i in pos})
            table = table.take(pa.array(idx, pa.int64())) if idx else table.slice(0, 0)
        cols = {c: table.column(c).to_pylist() for c in (*_STATE_COLUMNS, "uri", "split") if c in table.column_names}
        labels = {c: table.column(c).to_pylist() for c in self.label_columns if c in table.column_names}
        out = {}
        for k, image_id in enumerate(cols["image_id"]):
            out[image_id] = ImageState(
                row=int(cols["row"][k]), shard=int(cols["shard"][k]), fingerprint=cols["fingerprint"][k],
                status=cols["status"][k],
                meta=meta_key(cols["uri"][k], cols["split"][k], {c: v[k] for c, v in labels.items()}))
        return out
