"""One job's update of a feature set, whatever computes its features: units in, committed version out.

The driver's part holds units, never images: `plan_job` compares the listed units with the latest version's
(O(units)) and reserves blocks for the units that need work; `plan_unit` (in a task, per unit) compares the
unit's images with its old blocks; the blocks are written (``write_blocks``: the extraction pipeline, or
anything that writes whole blocks); `finish_job` commits. `update_featureset` runs all of it in this process.
"""
from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from .alloc import allocate
from .commit import CommitResult, JobChange, commit_change
from .layout import stable_hash
from .manifest import Segment, Version, latest_version
from .units import BlockTask, UnitChange, UnitPlan, UnitSpec, plan_unit
from .writer import FeatureStoreWriter, label_schema

log = logging.getLogger(__name__)

#: Images a unit of unknown count is assumed to hold per byte of its size, for its block reservation.
BYTES_PER_IMAGE_GUESS = 8192
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class UnitWork:
    """A unit that needs a task: the unit as listed, its segments in the parent, its reserved blocks."""

    unit: Any  # a sources.units.WorkUnit (or anything with unit_id, fingerprint, meta, n_images, size_bytes)
    old: tuple[Segment, ...]
    blocks: tuple[int, ...]
    donors: tuple[Segment, ...] = ()  # blocks of changed or removed units its images may have moved from

    @property
    def spec(self) -> UnitSpec:
        return UnitSpec(self.unit.unit_id, self.unit.fingerprint, self.unit.meta)


@dataclass
class JobPlan:
    parent: Version | None
    work: list[UnitWork] = field(default_factory=list)
    removed: list[UnitPlan] = field(default_factory=list)
    unchanged: int = 0  # units
    unchanged_images: int = 0  # rows of those units, errors included
    listed: int = 0
    job_id: str = ""
    reserved: int = 0  # blocks reserved for the work

    @property
    def empty(self) -> bool:
        return not (self.work or self.removed)


def plan_job(writer: FeatureStoreWriter, units: Sequence[Any], *, job_id: str, dry_run: bool = False) -> JobPlan:
    """Which units need a task (new, changed, or of unknown content), which left the source; blocks reserved
    (``dry_run``: counted, not reserved, and nothing is written)."""
    parent = latest_version(writer.fs, writer.base)
    known = parent.units if parent else {}
    segments = parent.by_unit() if parent else {}
    plan = JobPlan(parent, job_id=job_id, listed=len(units))
    reserve: list[tuple[Any, int, bool]] = []  # unit, blocks reserved, whether its images may have changed
    seen = set()
    for unit in units:
        if unit.unit_id in seen:
            raise ValueError(f"the source lists unit {unit.unit_id!r} twice; unit ids must be unique")
        seen.add(unit.unit_id)
        state = known.get(unit.unit_id)
        if state and unit.fingerprint and state == {"fingerprint": unit.fingerprint, "meta": unit.meta}:
            plan.unchanged += 1
            plan.unchanged_images += sum(s.live_rows for s in segments.get(unit.unit_id, []))
            continue
        content_same = bool(state and unit.fingerprint and state["fingerprint"] == unit.fingerprint)
        # a stored unit of unknown content is checked every time and mostly unchanged: its task allocates
        # blocks if it finds images to write, so a refresh that finds none grows no array
        lazy = bool(state and not unit.fingerprint)
        n = 0 if content_same or lazy else _blocks_needed(unit, writer.target.shard_rows)
        reserve.append((unit, n, not content_same))
    for uid in sorted(set(known) - seen):
        plan.removed.append(UnitPlan(UnitSpec(uid, **known[uid]), segments.get(uid, []), removed=True,
                                     counts={"deleted": sum(s.live_rows for s in segments.get(uid, []))}))
    total = plan.reserved = sum(n for _, n, _ in reserve)
    first = 0
    if total and not dry_run:
        keys = [stable_hash([parent.version if parent else 0, u.unit_id, u.fingerprint, u.meta, k])
                for u, n, _ in reserve for k in range(n)]
        alloc = allocate(writer.fs, writer.base, keys, job_id=job_id)
        writer.grow(alloc.blocks.stop * writer.target.shard_rows)
        first = alloc.first_block
    changed = {u.unit_id for u, _, c in reserve if c and u.unit_id in known} | {p.unit.unit_id for p in plan.removed}
    donors = donor_units([u.unit_id for u, _, c in reserve if c], [u.unit_id for u in units], [*known], changed)
    for unit, n, _ in reserve:
        given = tuple(seg for uid in donors.get(unit.unit_id, ()) for seg in segments.get(uid, []))
        plan.work.append(UnitWork(unit, tuple(segments.get(unit.unit_id, [])), tuple(range(first, first + n)),
                                  given))
        first += n
    return plan


def donor_units(work: Sequence[str], listed: Sequence[str], known: Sequence[str], changed: set[str], *,
                slack: int = 1, cap: int = 16) -> dict[str, list[str]]:
    """For each unit to work on (of the ``listed`` ones), the changed or removed units of the parent (``known``)
    its images may have moved from.

    Datasets written in numbered shards (``data-00003-of-00010.arrow``, ``train-00001-of-00004.parquet``) keep
    their row order across shards, so a row that moves (shards re-cut, rows appended) lands in the shard at
    about the same relative position among shards of the same name pattern (the name with its numbers
    blanked): those, one more on each side. When at most ``cap`` units changed in all, every one of them is a
    donor too (after those): rows reversed, moved to the end, or from one split to another are found as well.
    At most ``cap`` each; O(units), names only.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for uid in sorted(known, key=_natural):
        groups[_DIGITS.sub("#", uid)].append(uid)
    now: dict[str, list[str]] = defaultdict(list)
    for uid in sorted(listed, key=_natural):
        now[_DIGITS.sub("#", uid)].append(uid)
    out: dict[str, list[str]] = {}
    todo = set(work)
    for key, new in now.items():
        old = groups.get(key, [])
        n, m = len(new), len(old)
        if not m:
            continue
        for j, uid in enumerate(new):
            if uid not in todo:
                continue
            lo, hi = max(0, j * m // n - slack), min(m, -(-(j + 1) * m // n) + slack)
            picked = [u for u in old[lo:hi] if u in changed and u != uid]
            if picked:
                out[uid] = picked[:cap]
    if len(changed) <= cap:
        few = sorted(changed, key=_natural)
        for uid in todo:
            picked = out.get(uid, [])
            picked += [u for u in few if u != uid and u not in picked]
            if picked:
                out[uid] = picked
    return out


def _blocks_needed(unit: Any, shard_rows: int) -> int:
    n = unit.n_images
    if n is None:
        n = max(1, (unit.size_bytes or 0) // BYTES_PER_IMAGE_GUESS)
    return max(1, math.ceil(n / shard_rows))


def _natural(uid: str) -> list:
    """Sort key reading numbers as numbers (row group 10 after row group 9): text and numbers alternate."""
    return [int(part) if k % 2 else part for k, part in enumerate(_DIGITS.split(uid))]


def finish_job(writer: FeatureStoreWriter, plan: JobPlan, unit_plans: Sequence[UnitPlan],
               written: Mapping[int, Mapping], *, operation: str, on_conflict: str = "fail",
               dataset_fingerprint: str = "", config: Mapping[str, Any] | None = None,
               stats: Mapping[str, Any] | None = None,
               class_names: Mapping[str, Sequence[str]] | None = None) -> CommitResult:
    changes: list[UnitChange] = [p.change(written) for p in [*unit_plans, *plan.removed]]
    change = JobChange(operation=operation, parent=plan.parent, units=changes, on_conflict=on_conflict,
                       dataset_fingerprint=dataset_fingerprint, config=dict(config or {}), stats=dict(stats or {}),
                       job_id=plan.job_id, class_names=class_names)
    return commit_change(writer, change)


def counts(unit_plans: Sequence[UnitPlan], plan: JobPlan) -> dict[str, int]:
    """Image counts of the job, by id: an image that moved to another unit under the same id (its old unit
    deleted it, its new one copied it) is neither added nor deleted but unchanged, and not counted copied."""
    out = {"added": 0, "changed": 0, "deleted": 0, "relabelled": 0, "unchanged": plan.unchanged_images}
    for p in [*unit_plans, *plan.removed]:
        for k, v in p.counts.items():
            out[k] = out.get(k, 0) + v
    return net_moved(out)


def net_moved(out: dict[str, int]) -> dict[str, int]:
    """Counts by id: an image that moved under its id is unchanged, or relabelled where its labels or split
    changed on the way; only copies under other ids stay "copied"."""
    moved = out.get("moved", 0)
    relabelled = out.pop("moved_relabelled", 0)
    if moved:
        out["added"] -= moved
        out["deleted"] -= moved
        out["unchanged"] += moved - relabelled
        out["relabelled"] += relabelled
        out["copied"] = max(0, out.get("copied", 0) - moved)
    return out


@dataclass(frozen=True)
class JobOutcome:
    version: int | None
    published: bool
    counts: Mapping[str, int]
    commit: CommitResult | None
    written: Mapping[int, Mapping]  # block -> shard record
    plan: JobPlan


WriteBlocks = Callable[[list[BlockTask]], Mapping[int, Mapping]]


def update_featureset(writer: FeatureStoreWriter, units: Sequence[Any], *, expand: Callable[[Any], list[dict]],
                      write_blocks: WriteBlocks, layer_dims: Mapping[str, int], provenance: Mapping[str, Any],
                      labels: pa.Schema | None = None, operation: str = "extract", dataset_fingerprint: str = "",
                      config: Mapping[str, Any] | None = None, on_conflict: str = "fail",
                      job_id: str | None = None, stats: Callable[[], Mapping[str, Any]] | None = None) -> JobOutcome:
    """The whole job in this process: units listed by the caller, expanded by ``expand``."""
    import uuid

    job_id = job_id or uuid.uuid4().hex
    if labels is None:
        labels = label_schema(expand(units[0]) if units else [])
    writer.prepare(n_rows=0, layer_dims=layer_dims, provenance=provenance, labels=labels)
    plan = plan_job(writer, units, job_id=job_id)
    unit_plans = [plan_unit(writer, w.spec, expand(w.unit), w.old, w.blocks, job_id=job_id) for w in plan.work]
    tasks = [t for p in unit_plans for t in p.blocks]
    written = write_blocks(tasks) if tasks else {}
    tally = counts(unit_plans, plan)
    tally["unchanged_units"] = plan.unchanged
    if plan.empty:
        log.info("nothing changed in %d units since version %s", plan.unchanged,
                 plan.parent.version if plan.parent else None)
        return JobOutcome(plan.parent.version if plan.parent else None, False, tally, None, {}, plan)
    outcome = finish_job(writer, plan, unit_plans, written, operation=operation, on_conflict=on_conflict,
                         dataset_fingerprint=dataset_fingerprint, config=config, stats=stats() if stats else None)
    return JobOutcome(outcome.version, outcome.published, tally, outcome, written, plan)


def units_from_records(records: Sequence[dict], *, page_images: int | None = None) -> tuple[list, dict]:
    """Content-defined pages of an in-memory listing as units, and their records by unit id (for tests and
    small sources)."""
    from ..sources.units import PAGE_IMAGES, WorkUnit, paginate
    from .live import state_of

    ordered = sorted(records, key=lambda r: r["image_id"])
    rows = [(r["image_id"], r["fingerprint"], state_of(r["uri"], r.get("split"), r.get("labels") or {}))
            for r in ordered]
    units, by_unit, start = [], {}, 0
    for page in paginate(rows, page_images or PAGE_IMAGES):
        unit = WorkUnit(f"page:{page.key}", page.content.hexdigest(), page.count, page.meta.hexdigest())
        units.append(unit)
        by_unit[unit.unit_id] = list(ordered[start:start + page.count])
        start += page.count
    return units, by_unit


def update_from_records(writer: FeatureStoreWriter, records: Sequence[dict], *, page_images: int | None = None,
                        **kwargs: Any) -> JobOutcome:
    """`update_featureset` over an in-memory listing, paged into units (tests and small sources)."""
    units, by_unit = units_from_records(records, page_images=page_images)
    kwargs.setdefault("labels", label_schema(records))
    return update_featureset(writer, units, expand=lambda u: by_unit[u.unit_id], **kwargs)
