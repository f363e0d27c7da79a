"""Publishing versions: a job's unit changes applied to the latest version, published by compare-and-swap.

A job changes some source units (a tar, a row group, a page of a listing), each against the segments that unit
had in the version the job read (its parent). Publishing creates ``v<parent+1>.json`` only if absent. A
committer that loses the race applies its changes again on the new latest version: a unit no other job
touched is replaced as planned (no image is read); a unit another job changed meanwhile is merged image by
image: images the other job did not touch go in as planned, images it changed to exactly what this job
wanted are not duplicated, and any other overlap stops the commit with the images named
(``on_conflict="fail"``) or yields to the other job (``"theirs"``, for compaction). No version ever drops
another version's rows.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from . import layout
from .cas import create_exclusive
from .live import ImageState
from .manifest import Segment, Version, latest_version, now_iso
from .units import UnitChange, relabel_segment, unit_live_index
from .writer import FeatureStoreWriter
from .zarr_arrays import ensure_arrays

log = logging.getLogger(__name__)

#: Test hook: called with the version about to be published, just before the compare-and-swap.
before_publish: Callable[[Version], None] | None = None


class CommitConflict(RuntimeError):
    """Another committer changed the same images differently; nothing was published."""


@dataclass
class JobChange:
    """What one job changes, unit by unit, relative to ``parent`` (None for a new feature set)."""

    operation: str
    parent: Version | None
    units: list[UnitChange] = field(default_factory=list)
    on_conflict: str = "fail"
    dataset_fingerprint: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    stats: Mapping[str, Any] = field(default_factory=dict)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    class_names: Mapping[str, Sequence[str]] | None = None  # None: the parent's (the job did not read the source)


@dataclass(frozen=True)
class CommitResult:
    version: int | None
    published: bool
    attempts: int
    deduplicated: int = 0  # images another committer had already written identically
    yielded: int = 0  # changes dropped in favour of another committer (on_conflict="theirs")
    merged_units: int = 0  # units another committer changed too, merged image by image


def commit_change(writer: FeatureStoreWriter, change: JobChange, *, max_attempts: int = 50) -> CommitResult:
    """Publish ``change`` on top of the latest version, re-applying it as often as other committers win."""
    if change.on_conflict not in ("fail", "theirs"):
        raise ValueError(f"on_conflict must be 'fail' or 'theirs', got {change.on_conflict!r}")
    target = change.parent
    for attempt in range(1, max_attempts + 1):
        version, stats = _apply(writer, change, target)
        if version is None:
            log.info("nothing to publish: version %s already holds this change", target.version if target else None)
            return CommitResult(target.version if target else None, False, attempt, **stats)
        if "zarr" in writer.target.formats and version.row_end:
            ensure_arrays(writer.target, writer.fs, writer.base, n_rows=version.row_end,
                          layer_dims=writer.meta["layer_dims"], attrs={})
        if before_publish is not None:
            before_publish(version)
        if publish(writer.fs, writer.base, version):
            log.info("committed version %d of %s (%s: %d segments, %d rows; %d attempt(s))", version.version,
                     writer.target.featureset, change.operation, len(version.segments), version.n_rows, attempt)
            return CommitResult(version.version, True, attempt, **stats)
        log.info("version %d was published by another job; applying this change on top of it", version.version)
        target = latest_version(writer.fs, writer.base)
        time.sleep(min(1.0, 0.01 * attempt))
    raise CommitConflict(f"could not publish after {max_attempts} attempts: other jobs keep committing to "
                         f"{storage.redact_uri(writer.target.uri)}; run again later")


def publish(fs, base: str, version: Version) -> bool:
    """Create the version document if no other job created that version first (compare-and-swap)."""
    return create_exclusive(fs, base, layout.version_path(base, version.version), version.to_bytes())


def _apply(writer: FeatureStoreWriter, change: JobChange, target: Version | None) -> tuple[Version | None, dict]:
    """``change`` applied to ``target``: the next version, or None when nothing would change."""
    parent_units = dict(change.parent.units) if change.parent else {}
    units = {u: dict(v) for u, v in (target.units if target else {}).items()}
    now_by_unit = target.by_unit() if target else {}
    segments = target.segment_map() if target else {}
    stats = {"deduplicated": 0, "yielded": 0, "merged_units": 0}
    conflicts: list[str] = []
    for uc in change.units:
        uid = uc.unit.unit_id
        now = now_by_unit.get(uid, [])
        if {s.block: s for s in now} == {s.block: s for s in uc.old} and units.get(uid) == parent_units.get(uid):
            result = uc.result()
        else:  # another job changed this unit since the parent: merge image by image
            result, dedup, yielded, clash = _merge_unit(writer, uc, now, theirs=change.on_conflict == "theirs")
            stats["deduplicated"] += dedup
            stats["yielded"] += yielded
            stats["merged_units"] += 1
            conflicts += clash
        for s in now:
            segments.pop(s.block, None)
        segments.update({s.block: s for s in result})
        if uc.removed:
            units.pop(uid, None)
        else:
            units[uid] = uc.unit.state()
    if conflicts:
        raise CommitConflict(
            f"{len(conflicts)} image(s) were changed by another job since this one read version "
            f"{change.parent.version if change.parent else None}: {sorted(conflicts)[:5]}; nothing was "
            f"published. Run the job again: it starts from the latest version")
    classes, clash = _merge_class_names(change, target)
    if clash and change.on_conflict == "fail":
        raise CommitConflict(
            f"the class names of label(s) {clash} were changed by another job since this one read version "
            f"{change.parent.version if change.parent else None}, differently; nothing was published. Run the "
            f"job again: it starts from the latest version")
    if (target is not None and segments == target.segment_map() and units == target.units
            and classes == target.class_names):
        return None, stats
    if target is None and not segments and not units:
        return None, stats
    before = target.segment_map() if target else {}
    counts = {"segments_added": sorted(set(segments) - set(before)),
              "segments_removed": sorted(set(before) - set(segments)), "units": len(change.units), **stats}
    version = Version(version=(target.version if target else 0) + 1, parent=target.version if target else None,
                      created_at=now_iso(), operation=change.operation, segments=tuple(segments.values()),
                      dataset_fingerprint=change.dataset_fingerprint, config=storage.redact(dict(change.config)),
                      stats=dict(change.stats), changes=counts, job_id=change.job_id, units=units,
                      class_names=classes)
    return version, stats


def _merge_class_names(change: JobChange, target: Version | None) -> tuple[dict[str, list[str]], list[str]]:
    """Class names merged three ways, label by label, as images are: this job's edit wins over names nobody
    else changed, another job's edit stays where this job changed nothing; both changed differently is a clash
    (the other job's names kept)."""
    theirs = {k: list(v) for k, v in (target.class_names if target else {}).items()}
    if change.class_names is None:
        return theirs, []
    parent = {k: list(v) for k, v in (change.parent.class_names if change.parent else {}).items()}
    mine = {k: list(v) for k, v in change.class_names.items()}
    out, clash = {}, []
    for label in sorted({*parent, *mine, *theirs}):
        was, want, now = parent.get(label), mine.get(label), theirs.get(label)
        if want == was or now == want:
            value = now
        elif now == was:
            value = want
        else:
            value = now
            clash.append(label)
        if value is not None:
            out[label] = value
    return out, clash


def _merge_unit(writer: FeatureStoreWriter, uc: UnitChange, now: list[Segment], *,
                theirs: bool) -> tuple[list[Segment], int, int, list[str]]:
    """A unit changed by this job and by another since the parent, merged image by image.

    Reads the unit's index tables: its parent segments (``before``), the other job's (``now``) and this job's.
    """
    before = unit_live_index(writer, uc.old).states()
    current = unit_live_index(writer, now).states()
    mine = unit_live_index(writer, uc.result()).states()
    upserts = {i: s for i, s in mine.items() if s.shard in {n.block for n in uc.new}}
    deletes = {i for i in before if i not in mine}
    relabels = {i: s.meta for i, s in mine.items() if i not in upserts and i in before and s.meta != before[i].meta}

    def content(state: ImageState | None):
        return state.content if state else None

    rows = writer.target.shard_rows
    segments = {s.block: s for s in [*now, *uc.new]}
    deleted: dict[int, set[int]] = defaultdict(set)
    relabel: dict[int, dict[int, tuple]] = defaultdict(dict)
    conflicts, dedup, yielded = [], 0, 0
    for image_id, up in upserts.items():
        cur, was = current.get(image_id), before.get(image_id)
        if cur is not None and cur.row == up.row:  # the other job committed this very block (same work, resumed)
            dedup += 1
            continue
        if content(cur) != content(was):  # the other job changed or added it too
            deleted[up.row // rows].add(up.row)
            if cur is not None and cur.content == up.content:
                dedup += 1
            elif theirs:
                yielded += 1
            else:
                conflicts.append(image_id)
            continue
        if cur is None:
            continue
        deleted[cur.shard].add(cur.row)
        if was is not None and cur.meta != was.meta and up.meta != cur.meta:  # its labels were edited meanwhile
            if theirs:
                relabel[up.row // rows][up.row] = cur.meta
                yielded += 1
            else:
                conflicts.append(image_id)
    for image_id in deletes:
        cur = current.get(image_id)
        if cur is None:
            continue
        if content(cur) != content(before.get(image_id)):
            yielded += theirs
            if not theirs:
                conflicts.append(image_id)
            continue
        deleted[cur.shard].add(cur.row)
    for image_id, meta in relabels.items():
        cur, was = current.get(image_id), before[image_id]
        if cur is None or cur.meta == meta:
            continue
        if content(cur) != content(was) or cur.meta != was.meta:
            yielded += theirs
            if not theirs:
                conflicts.append(image_id)
            continue
        relabel[cur.shard][cur.row] = meta
    for block, rows_ in deleted.items():
        segments[block] = segments[block].with_deleted(rows_)
    for block, edits in relabel.items():
        segments[block] = relabel_segment(writer, segments[block], edits)
    return [s for s in segments.values() if s.live_rows > 0], dedup, yielded, conflicts
