"""The first stage of a job, per source unit: expand the unit, diff it with its old blocks, decode new images.

A unit row (small: the unit, its old segments, its reserved blocks) becomes one row per block to write, each
with its decoded pixels; a block an earlier run already wrote comes out as its record, without pixels; a unit
with nothing to encode comes out as one empty row. The unit's plan (deletions, label revisions, counts)
travels on its first row to the driver, which commits it. Every row has the same columns, so Ray Data can
batch them together.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import numpy as np

from ..sources.base import record_to_json
from ..sources.units import CHECK_IDS, WorkUnit, id_hashes
from ..stores import FeatureStoreWriter, Segment, StoreTarget
from ..stores.copy import copied_shard, moved
from ..stores.layout import stable_hash
from ..stores.units import UnitSpec, plan_unit
from .stages import decode_records

log = logging.getLogger(__name__)


def unit_item(work, job_id: str) -> dict:
    """The Ray Data row that carries one unit's work to a task."""
    return {"unit": json.dumps(work.unit.to_json()), "old": json.dumps([s.to_json() for s in work.old]),
            "blocks": json.dumps(list(work.blocks)), "job_id": job_id,
            "donors": json.dumps([s.to_json() for s in work.donors])}


def empty_row(crop: int, device_decode: bool = False) -> dict:
    row = {"shard_id": -1, "row_start": -1, "unit": "", "records": "[]", "plan": "", "done": "", "defer": False,
           "ok": np.zeros(0, bool), "pixels": np.zeros((0, 3, crop, crop), np.uint8), "errors": "[]"}
    if device_decode:  # every row of a job has the same columns
        row |= {"jpegs": [], "on_device": np.zeros(0, bool)}
    return row


def plan_item(item: dict, *, source, target: StoreTarget):
    """A unit row -> (its plan, its listed records by id, the records of blocks written already: by an
    earlier run, or now, from stored vectors of images that moved here)."""
    unit = WorkUnit.from_json(json.loads(item["unit"]))
    old = [Segment.from_json(s) for s in json.loads(item["old"])]
    donors = [Segment.from_json(s) for s in json.loads(item.get("donors") or "[]")]
    writer = FeatureStoreWriter(target)
    listed = source.expand(unit)
    records = [record_to_json(r) for r in listed]
    plan = plan_unit(writer, UnitSpec(unit.unit_id, unit.fingerprint, unit.meta), records,
                     old, json.loads(item["blocks"]), job_id=item["job_id"], donors=donors, copy=True)
    if not unit.fingerprint:  # what the version's dataset fingerprint stands on for this unit
        plan.content = stable_hash(sorted(records, key=lambda r: r["image_id"]))
    if unit.params.get(CHECK_IDS):
        plan.id_hashes = id_hashes(r.image_id for r in listed)
    done = writer.written_records([t.block for t in plan.blocks])
    done = {b: r for b, r in done.items() if any(t.block == b and t.content == r.get("plan_hash")
                                                 for t in plan.blocks)}
    segments = {s.block: s for s in [*old, *donors]}
    for t in plan.blocks:
        if t.copies and t.block in done and not done[t.block].get("copied"):  # an earlier run encoded them
            _encoded_instead(plan, t)
        elif t.copies and t.block not in done:
            try:
                done[t.block] = writer.write_shard(copied_shard(writer, t.block, t.records, t.content, t.unit,
                                                                t.copies, segments))
            except Exception as e:  # noqa: BLE001 - the images are still there: encode them instead
                log.warning("block %d: vectors of %d moved images could not be copied (%s); encoding them",
                            t.block, len(t.records), e)
                _encoded_instead(plan, t)
    return plan, {r.image_id: r for r in listed}, done


def _encoded_instead(plan, task) -> None:
    """Counts of a copy block encoded after all: its images are no longer copies, but those that only moved
    (same id) still moved, and the job nets them out of "copied" (``job.net_moved``): only the others leave it."""
    plan.counts["copied"] -= len(task.records) - moved({r["image_id"]: c for r, c in zip(task.records, task.copies)})


def block_rows(plan, by_id: dict, done: dict, *, source, preprocessing, max_pixels: int, threads: int = 8,
               niceness: int = 0, decode_kwargs: dict | None = None, defer: bool = False) -> Iterator[dict]:
    """A planned unit -> its block rows, one at a time (a unit's pixels are never all in memory at once),
    pixels decoded for the blocks not written yet (``defer``: left to the encoder actor, which decodes a
    block batch by batch). The first row carries the unit's plan."""
    crop = preprocessing.crop_size
    device = bool((decode_kwargs or {}).get("device_decode"))
    plan_json = json.dumps(plan.to_json())
    if not plan.blocks:
        yield empty_row(crop, device) | {"unit": plan.unit.unit_id, "plan": plan_json}
    for k, task in enumerate(plan.blocks):
        row = empty_row(crop, device) | {"shard_id": task.block, "row_start": task.row_start, "unit": plan.unit.unit_id,
                                 "records": json.dumps(task.records)}
        if task.block in done:
            row["done"] = json.dumps(done[task.block])  # written by an earlier run of this work: resumed
        elif defer:
            row["defer"] = True
        else:
            row |= decode_records([by_id[r["image_id"]] for r in task.records], source=source,
                                  preprocessing=preprocessing, max_pixels=max_pixels, threads=threads,
                                  niceness=niceness, **(decode_kwargs or {}))
        if k == 0:
            row["plan"] = plan_json
        yield row


def expand_unit(item: dict, *, source, target: StoreTarget, preprocessing, max_pixels: int, threads: int = 8,
                niceness: int = 0, decode_kwargs: dict | None = None, progress=None,
                defer: bool = False) -> Iterator[dict]:
    """A unit row -> its block rows (see the module docstring): the Ray Data stage. With ``progress`` (the
    job's JobProgress actor), the unit is reported in flight on this node until its blocks are written."""
    if progress is not None:
        import ray

        unit = json.loads(item["unit"])
        unit_id = unit["unit_id"]
        progress.started.remote(unit_id, ray.get_runtime_context().get_node_id(), -1)
    plan, by_id, done = plan_item(item, source=source, target=target)
    if progress is not None and plan.id_hashes is not None:
        _refuse_repeated_ids(progress, plan, by_id)
    if progress is not None:
        todo = sum(len(t.records) for t in plan.blocks if t.block not in done)
        known = unit.get("n_images") is not None
        kept = unit["n_images"] - todo if known else 0  # the total counted n_images
        progress.started.remote(plan.unit.unit_id, ray.get_runtime_context().get_node_id(), max(1, len(plan.blocks)),
                                kept, 0 if known else len(by_id))
    yield from block_rows(plan, by_id, done, source=source, preprocessing=preprocessing, max_pixels=max_pixels,
                          threads=threads, niceness=niceness, decode_kwargs=decode_kwargs, defer=defer)


def _refuse_repeated_ids(progress, plan, by_id: dict) -> None:
    """Stop the job before this unit encodes anything when a unit planned before it lists one of its ids."""
    import ray

    from ..sources.units import id_hash
    from .id_check import EXAMPLES, repeated_ids_error

    units, shared = ray.get(progress.check_ids.remote(plan.unit.unit_id, plan.id_hashes))
    if units:
        shared = set(shared.tolist())
        examples = sorted(i for i in by_id if id_hash(i) in shared)[:EXAMPLES]
        raise repeated_ids_error(len(shared), sorted([*units, plan.unit.unit_id]), examples)
