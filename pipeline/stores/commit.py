"""Publishing versions: a change set applied to the latest version, published by compare-and-swap.

A job computes its change against the version it read (its parent): blocks it wrote, images it upserts or
deletes, labels it edits, each with the state it expected. Publishing creates ``v<parent+1>.json`` only if
absent. A committer that loses the race reads the new latest version, moves its view forward by the other
committers' changes, and applies its own again: images the others did not touch go in as planned, images they
changed to exactly what this job wanted are not duplicated, and any other overlap stops the commit with the
images named (``on_conflict="fail"``) or yields to the other committer (``"theirs"``, for compaction). No
version ever drops another version's rows.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .. import storage
from . import layout
from .live import ImageState, LiveIndex, read_tables
from .cas import create_exclusive
from .manifest import Segment, Version, latest_version, now_iso
from .writer import FeatureStoreWriter
from .zarr_arrays import ensure_arrays

log = logging.getLogger(__name__)

#: Test hook: called with the version about to be published, just before the compare-and-swap.
before_publish: Callable[[Version], None] | None = None


class CommitConflict(RuntimeError):
    """Another committer changed the same images differently; nothing was published."""


@dataclass(frozen=True)
class Upsert:
    row: int
    fingerprint: str
    status: str
    meta: tuple | None = None  # (uri, split, labels) the new row carries; None: not compared


@dataclass
class ChangeSet:
    """What one job changes, relative to ``parent`` (None for a new feature set)."""

    operation: str
    parent: LiveIndex
    new_segments: list[Segment] = field(default_factory=list)
    upserts: dict[str, Upsert] = field(default_factory=dict)  # image id -> its row in new_segments
    deletes: set[str] = field(default_factory=set)
    relabels: dict[str, tuple] = field(default_factory=dict)  # image id -> meta_key(uri, split, labels)
    on_conflict: str = "fail"
    dataset_fingerprint: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def touched(self) -> set[str]:
        return {*self.upserts, *self.deletes, *self.relabels}

    @property
    def empty(self) -> bool:
        return not (self.upserts or self.deletes or self.relabels)


@dataclass(frozen=True)
class CommitResult:
    version: int | None
    published: bool
    attempts: int
    deduplicated: int = 0  # upserts another committer had already made identically
    yielded: int = 0  # changes dropped in favour of another committer (on_conflict="theirs")


def commit_change(writer: FeatureStoreWriter, change: ChangeSet, *, max_attempts: int = 50) -> CommitResult:
    """Publish ``change`` on top of the latest version, rebasing as often as other committers win the race."""
    if change.on_conflict not in ("fail", "theirs"):
        raise ValueError(f"on_conflict must be 'fail' or 'theirs', got {change.on_conflict!r}")
    live = change.parent
    base_states = live.states(change.touched)
    for attempt in range(1, max_attempts + 1):
        target = live.version
        current = base_states if target is change.parent.version else live.states(change.touched)
        version, dedup, yielded = _apply(writer, change, base_states, current, target)
        if version is None:
            log.info("nothing to publish: version %s already holds this change", target.version if target else None)
            return CommitResult(target.version if target else None, False, attempt, dedup, yielded)
        if "zarr" in writer.target.formats and version.row_end:
            ensure_arrays(writer.target, writer.fs, writer.base, n_rows=version.row_end,
                          layer_dims=writer.meta["layer_dims"], attrs={})
        if before_publish is not None:
            before_publish(version)
        if publish(writer.fs, writer.base, version):
            log.info("committed version %d of %s (%s: %d segments, %d rows; %d attempt(s))", version.version,
                     writer.target.featureset, change.operation, len(version.segments), version.n_rows, attempt)
            return CommitResult(version.version, True, attempt, dedup, yielded)
        latest = latest_version(writer.fs, writer.base)
        log.info("version %d was published by another job; rebasing onto it", version.version)
        live = live.advance(writer.fs, writer.base, latest)
        time.sleep(min(1.0, 0.01 * attempt))
    raise CommitConflict(f"could not publish after {max_attempts} attempts: other jobs keep committing to "
                         f"{storage.redact_uri(writer.target.uri)}; run again later")


def _apply(writer: FeatureStoreWriter, change: ChangeSet, before: Mapping[str, ImageState],
           now: Mapping[str, ImageState], target: Version | None) -> tuple[Version | None, int, int]:
    """``change`` applied to ``target``: the next version, or None when nothing would change."""
    theirs = change.on_conflict == "theirs"
    deleted: dict[int, set[int]] = defaultdict(set)  # block -> rows to delete
    relabel: dict[int, dict[int, tuple]] = defaultdict(dict)  # block -> row -> meta
    conflicts, dedup, yielded = [], 0, 0

    def moved_by_others(image_id: str) -> bool:
        a, b = before.get(image_id), now.get(image_id)
        return (a.content if a else None) != (b.content if b else None)

    for image_id, up in change.upserts.items():
        cur, was = now.get(image_id), before.get(image_id)
        if moved_by_others(image_id):
            if cur is not None and cur.content == (up.fingerprint, up.status):
                deleted[up.row // writer.target.shard_rows].add(up.row)
                dedup += 1
            elif theirs:
                deleted[up.row // writer.target.shard_rows].add(up.row)
                yielded += 1
            else:
                conflicts.append(image_id)
            continue
        if cur is None:
            continue
        deleted[cur.shard].add(cur.row)
        if was is not None and cur.meta != was.meta and up.meta is not None and up.meta != cur.meta:
            # another job edited this image's labels meanwhile
            if theirs:
                relabel[up.row // writer.target.shard_rows][up.row] = cur.meta
                yielded += 1
            else:
                conflicts.append(image_id)
    for image_id in change.deletes:
        cur = now.get(image_id)
        if cur is None:
            continue
        if moved_by_others(image_id):
            yielded += theirs
            if not theirs:
                conflicts.append(image_id)
            continue
        deleted[cur.shard].add(cur.row)
    for image_id, meta in change.relabels.items():
        cur, was = now.get(image_id), before.get(image_id)
        if cur is None or cur.meta == meta:
            continue
        if moved_by_others(image_id) or (was is not None and cur.meta != was.meta):
            yielded += theirs
            if not theirs:
                conflicts.append(image_id)
            continue
        relabel[cur.shard][cur.row] = meta
    if conflicts:
        raise CommitConflict(
            f"{len(conflicts)} image(s) were changed by another job since this one read version "
            f"{change.parent.version.version if change.parent.version else None}: {sorted(conflicts)[:5]}; "
            f"nothing was published. Run the refresh again: it starts from the latest version")

    segments = target.segment_map() if target else {}
    new_blocks = {s.block for s in change.new_segments}
    for seg in change.new_segments:
        segments[seg.block] = seg
    for block, rows in deleted.items():
        segments[block] = segments[block].with_deleted(rows)
    for block, edits in relabel.items():
        segments[block] = _relabel_segment(writer, segments[block], edits)
    segments = {b: s for b, s in segments.items() if s.live_rows > 0}
    touched_old = set(deleted) | set(relabel)
    if not (set(segments) & new_blocks) and not (touched_old - new_blocks):
        return None, dedup, yielded
    number = (target.version if target else 0) + 1
    counts = {"upserts": len(change.upserts) - dedup, "deletes": len(change.deletes), "relabels": len(change.relabels),
              "segments_added": sorted(set(segments) & new_blocks),
              "segments_removed": sorted((set(target.segment_map()) if target else set()) - set(segments)),
              "deduplicated": dedup, "yielded": yielded}
    version = Version(version=number, parent=target.version if target else None, created_at=now_iso(),
                      operation=change.operation, segments=tuple(segments.values()),
                      dataset_fingerprint=change.dataset_fingerprint, config=storage.redact(dict(change.config)),
                      stats=dict(change.stats), changes=counts, job_id=change.job_id)
    return version, dedup, yielded


def _relabel_segment(writer: FeatureStoreWriter, segment: Segment,
                     edits: Mapping[int, tuple]) -> Segment:
    """A new index revision of ``segment`` with ``edits`` (row -> meta) applied; its other rows unchanged."""
    (table,) = read_tables(writer.fs, writer.base, [segment.index])
    rows = table.column("row").to_pylist()
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    label_names = [f.name for f in writer.label_schema if f.name in cols]
    for k, row in enumerate(rows):
        meta = edits.get(row)
        if meta is None:
            continue
        uri, split, labels = meta
        cols["uri"][k], cols["split"][k] = uri, split
        labels = dict(labels)
        for name in label_names:
            cols[name][k] = labels.get(name)
    revised = pa.table({name: pa.array(cols[name], table.schema.field(name).type) for name in table.column_names})
    return writer.write_index_revision(segment, revised)


def publish(fs, base: str, version: Version) -> bool:
    """Create the version document if no other job created that version first (compare-and-swap)."""
    return create_exclusive(fs, base, layout.version_path(base, version.version), version.to_bytes())
