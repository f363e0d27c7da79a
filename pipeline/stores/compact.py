"""Compaction: segments whose rows are mostly deleted are rewritten, live rows only, into fresh blocks.

A compaction is a commit like any other (operation ``compact``): it never edits a block a version references,
and on a race it yields to the other committer (an image that job changed, deleted or relabelled keeps that
job's state). The old blocks stay for the versions that still reference them until retention removes those.
"""
from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import storage
from .alloc import allocate
from .commit import CommitResult, JobChange, commit_change
from .copy import stored_features
from .live import LiveIndex, read_tables
from .manifest import Segment, latest_version
from .units import UnitChange, UnitSpec, unit_live_index
from .writer import ERRORS_SCHEMA, EncodedShard, FeatureStoreWriter, StoreTarget, shard_plan_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompactResult:
    version: int | None
    segments_rewritten: list[int]
    rows_moved: int
    commit: CommitResult | None


def target_of(uri: str, storage_options: Mapping[str, Any] | None = None) -> StoreTarget:
    """The StoreTarget of an existing feature set (geometry from its featureset.json)."""
    fs, base = storage.resolve(uri, storage_options)
    try:
        meta = storage.read_json(fs, f"{base}/_manifest/featureset.json")
    except FileNotFoundError:
        raise FileNotFoundError(f"no strata feature set at {storage.redact_uri(uri)} "
                                f"(missing _manifest/featureset.json)") from None
    root, name = uri.rstrip("/").rsplit("/", 1)
    return StoreTarget(root=root, featureset=name, storage_options=dict(storage_options or {}), dtype=meta["dtype"],
                       shard_rows=meta["shard_rows"], chunk_rows=meta["chunk_rows"], formats=tuple(meta["formats"]))


def compact(uri: str, *, min_deleted: float = 0.5, storage_options: Mapping[str, Any] | None = None,
            dry_run: bool = False) -> CompactResult:
    """Rewrite every segment of the latest version with at least ``min_deleted`` of its rows deleted."""
    if not 0.0 < min_deleted <= 1.0:
        raise ValueError(f"min_deleted must be within (0, 1], got {min_deleted}")
    writer = FeatureStoreWriter(target_of(uri, storage_options))
    latest = latest_version(writer.fs, writer.base)
    if latest is None:
        return CompactResult(None, [], 0, None)
    chosen = [s for s in latest.segments if s.deleted and len(s.deleted) >= min_deleted * s.n_rows]
    if dry_run or not chosen:
        return CompactResult(latest.version, [s.block for s in chosen], sum(s.live_rows for s in chosen), None)
    job_id = uuid.uuid4().hex
    by_unit: dict[str, list[Segment]] = {}
    for seg in chosen:
        by_unit.setdefault(seg.unit, []).append(seg)
    pending = []  # (unit, its rewritten shards)
    for unit, segs in sorted(by_unit.items()):
        pending.append((unit, segs, _rewritten(writer, segs, unit_live_index(writer, segs))))
    all_shards = [sh for _, _, shards in pending for sh in shards]
    alloc = allocate(writer.fs, writer.base, [sh.plan_hash for sh in all_shards], job_id=job_id)
    writer.grow(alloc.blocks.stop * writer.target.shard_rows)
    blocks = iter(alloc.blocks)
    changes = []
    for unit, segs, shards in pending:
        new = []
        for shard in shards:
            block = next(blocks)
            shard.shard_id, shard.row_start = block, block * writer.target.shard_rows
            segment = Segment.from_record(writer.write_shard(shard))
            missing, _ = writer.check_segment(segment)
            if missing:
                raise RuntimeError(f"compacted block {block} is missing {missing[:3]} right after being written")
            new.append(segment)
        old = latest.unit_segments(unit)
        deleted = {s.block: [s.row_start + i for i in range(s.n_rows)] for s in segs}
        spec = UnitSpec(unit, **latest.units[unit]) if unit in latest.units else UnitSpec(unit)
        changes.append(UnitChange(spec, old, new, deleted, {}))
    change = JobChange(operation="compact", parent=latest, units=changes, on_conflict="theirs",
                       dataset_fingerprint=latest.dataset_fingerprint, job_id=job_id,
                       stats={"segments_rewritten": [s.block for s in chosen]})
    outcome = commit_change(writer, change)
    moved = sum(len(sh.records) for sh in all_shards)
    log.info("compacted %d segments (%d live rows) into %d", len(chosen), moved, len(all_shards))
    return CompactResult(outcome.version, [s.block for s in chosen], moved, outcome)


def _rewritten(writer: FeatureStoreWriter, chosen: list[Segment], live: LiveIndex) -> list[EncodedShard]:
    """The live rows of ``chosen`` (index rows, features, errors), cut into block-sized shards by image id."""
    labels = [f.name for f in writer.label_schema]
    rows: list[tuple[dict, bool, dict[str, np.ndarray], dict | None]] = []
    for seg in chosen:
        table = live.segment_table(seg.block).sort_by("image_id")
        feats = stored_features(writer, seg, table.column("row").to_numpy())
        errors = {}
        if seg.n_ok < seg.n_rows:
            (et,) = read_tables(writer.fs, writer.base, [seg.errors], ERRORS_SCHEMA)
            errors = {e["image_id"]: e for e in et.to_pylist()}
        cols = table.to_pydict()
        for k, image_id in enumerate(cols["image_id"]):
            record = {"image_id": image_id, "uri": cols["uri"][k], "fingerprint": cols["fingerprint"][k],
                      "split": cols["split"][k], "labels": {c: cols[c][k] for c in labels if c in cols}}
            ok = cols["status"][k] == "ok"
            rows.append((record, ok, {layer: f[k] for layer, f in feats.items()}, errors.get(image_id)))
    rows.sort(key=lambda t: t[0]["image_id"])
    size = writer.target.shard_rows
    shards = []
    for start in range(0, len(rows), size):
        part = rows[start:start + size]
        records = [r for r, _, _, _ in part]
        ok = np.array([o for _, o, _, _ in part], dtype=bool)
        features = {layer: np.stack([f[layer] for _, o, f, _ in part if o]) if ok.any() else
                    np.zeros((0, dim), np.float32) for layer, dim in writer.meta["layer_dims"].items()}
        errors = [e if e is not None else {"image_id": r["image_id"], "uri": r["uri"], "stage": "unknown",
                                           "reason": "failed in an earlier run"}
                  for r, o, _, e in part if not o]
        shards.append(EncodedShard(-1, -1, records, ok, features, errors, shard_plan_hash(records), chosen[0].unit))
    return shards
