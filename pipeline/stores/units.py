"""One source unit's part of a job: its listed images against the blocks the unit already has.

A unit (a tar, a Parquet row group, a page of a listing) owns its blocks: a block never holds two units'
images. Planning a unit reads only that unit's index tables, so the work (and the memory) of a task grows
with the unit, never with the store.
"""
from __future__ import annotations

import base64
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from .alloc import allocate
from .copy import Source, copy_sources, moved, moved_relabelled
from .diff import chunk_records, diff_listing
from .label_types import label_array
from .live import LiveIndex, read_tables, segment_index
from .manifest import Segment
from .writer import FeatureStoreWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnitSpec:
    """A unit as a version records it: ``fingerprint`` of its content ("" when unknown: such a unit is checked
    image by image every time), ``meta`` of its labels, splits and URIs."""

    unit_id: str
    fingerprint: str = ""
    meta: str = ""

    def state(self) -> dict[str, str]:
        return {"fingerprint": self.fingerprint, "meta": self.meta}


@dataclass(frozen=True)
class BlockTask:
    """A block to write: its number, its first row, its records (in row order), their content hash, its unit;
    ``copies``: for a block of images already stored under other rows, each record's source there."""

    block: int
    row_start: int
    records: tuple[dict, ...]
    content: str
    unit: str = ""
    copies: tuple[Source, ...] = ()


@dataclass
class UnitPlan:
    """What a unit needs: new blocks to write, rows of its old blocks to delete, label revisions written."""

    unit: UnitSpec
    old: list[Segment]
    blocks: list[BlockTask] = field(default_factory=list)
    deleted: dict[int, list[int]] = field(default_factory=dict)
    revised: dict[int, str] = field(default_factory=dict)  # old block -> its new index revision
    counts: dict[str, int] = field(default_factory=dict)  # added, changed, deleted, relabelled, unchanged
    removed: bool = False  # the unit left the source
    id_hashes: np.ndarray | None = None  # 8-byte hashes of every listed id, where the driver must check them
    content: str = ""  # digest of the listed images, for a unit listed without a fingerprint

    def to_json(self) -> dict:
        out = {"unit": self.unit.__dict__, "old": [s.to_json() for s in self.old],
               "blocks": [{"block": t.block, "row_start": t.row_start, "content": t.content,
                           "n": len(t.records)} for t in self.blocks],
               "deleted": {str(k): v for k, v in self.deleted.items()},
               "revised": {str(k): v for k, v in self.revised.items()}, "counts": self.counts,
               "removed": self.removed, "content": self.content}
        if self.id_hashes is not None:
            out["id_hashes"] = base64.b64encode(self.id_hashes.astype("<u8").tobytes()).decode()
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> UnitPlan:
        """The plan as the driver gets it back: block tasks without their records (the records are written)."""
        hashes = d.get("id_hashes")
        return cls(UnitSpec(**d["unit"]), [Segment.from_json(s) for s in d["old"]],
                   [BlockTask(b["block"], b["row_start"], (), b["content"], d["unit"]["unit_id"]) for b in d["blocks"]],
                   {int(k): list(v) for k, v in d["deleted"].items()},
                   {int(k): v for k, v in d["revised"].items()}, dict(d["counts"]), bool(d.get("removed")),
                   None if hashes is None else np.frombuffer(base64.b64decode(hashes), "<u8"), d.get("content", ""))

    def change(self, written: Mapping[int, Mapping]) -> UnitChange:
        """The unit's change, once its blocks are written (``written``: block -> shard record)."""
        return UnitChange(self.unit, self.old, [Segment.from_record(written[t.block]) for t in self.blocks],
                          self.deleted, self.revised, self.removed)


@dataclass
class UnitChange:
    """A unit's change against its segments in the parent version."""

    unit: UnitSpec
    old: list[Segment]
    new: list[Segment]
    deleted: Mapping[int, Sequence[int]]
    revised: Mapping[int, str]
    removed: bool = False

    def result(self) -> list[Segment]:
        """The unit's segments after the change: old ones with deletions and revisions, new ones; a segment
        whose every row is deleted is left out."""
        out = []
        for seg in self.old:
            if self.removed:
                continue
            if seg.block in self.revised:
                seg = replace(seg, index=self.revised[seg.block])
            if seg.block in self.deleted:
                seg = seg.with_deleted(self.deleted[seg.block])
            if seg.live_rows > 0:
                out.append(seg)
        return out + [s for s in self.new if s.live_rows > 0]


def unit_live_index(writer: FeatureStoreWriter, segments: Sequence[Segment]) -> LiveIndex:
    """The live index rows of these segments only."""
    labels = [f.name for f in writer.label_schema]
    tables = read_tables(writer.fs, writer.base, [s.index for s in segments])
    return LiveIndex(None, {s.block: segment_index(t, s) for s, t in zip(segments, tables)}, labels)


def plan_unit(writer: FeatureStoreWriter, unit: UnitSpec, records: Sequence[dict], old: Sequence[Segment],
              blocks: Sequence[int], *, job_id: str, donors: Sequence[Segment] = (),
              copy: bool = False) -> UnitPlan:
    """Diff a unit's listed images with its old blocks: new and changed images go to ``blocks`` (reserved for
    the unit; more are allocated if it outgrew them), removed and changed ones become deleted rows, and label,
    split or URI edits are written as index revisions of the old blocks.

    With ``copy``, new and changed images whose bytes the unit's old blocks or the ``donors`` (blocks of other
    units this job changes or removes) hold already get blocks of their own, to be filled with those stored
    vectors (``BlockTask.copies``) rather than encoded.
    """
    live = unit_live_index(writer, old)
    diff = diff_listing(records, live)
    sources = find_copies(writer, live, diff.encode, donors, unit=unit.unit_id) if copy else {}
    states = live.states({*diff.deletes, *(r["image_id"] for r in diff.encode), *diff.relabels})
    deleted: dict[int, list[int]] = defaultdict(list)
    for image_id in [*diff.deletes, *(r["image_id"] for r in diff.encode)]:
        if image_id in states:
            deleted[states[image_id].shard].append(states[image_id].row)
    edits: dict[int, dict[int, tuple]] = defaultdict(dict)
    for image_id, meta in diff.relabels.items():
        edits[states[image_id].shard][states[image_id].row] = meta
    by_block = {s.block: s for s in old}
    revised = {b: relabel_segment(writer, by_block[b], e).index for b, e in edits.items()}
    rows = writer.target.shard_rows
    # copied images in the order of the rows they come from: a block of them reads few stored blocks
    chunks = (chunk_records([r for r in diff.encode if r["image_id"] not in sources], rows)
              + chunk_records([r for r in diff.encode if r["image_id"] in sources], rows,
                              key=lambda r: sources[r["image_id"]]))
    ids = list(blocks)[: len(chunks)]
    if len(chunks) > len(ids):  # the unit outgrew its reservation (a tar with more images than its size let guess)
        extra = allocate(writer.fs, writer.base, [digest for _, digest in chunks[len(ids):]],
                         job_id=f"{job_id}:{unit.unit_id}")
        writer.grow(extra.blocks.stop * rows)
        ids += list(extra.blocks)
    tasks = [BlockTask(b, b * rows, recs, digest, unit.unit_id,
                       tuple(sources[r["image_id"]] for r in recs) if recs[0]["image_id"] in sources else ())
             for b, (recs, digest) in zip(ids, chunks)]
    counts = {"added": diff.added, "changed": diff.changed, "deleted": len(diff.deletes),
              "relabelled": len(diff.relabels), "unchanged": diff.unchanged}
    if sources:
        counts["copied"] = len(sources)
        counts["moved"] = moved(sources)  # job.counts nets them out of added and deleted
        counts["moved_relabelled"] = moved_relabelled(sources)
    return UnitPlan(unit, list(old), tasks, dict(deleted), revised, counts)


def find_copies(writer: FeatureStoreWriter, live: LiveIndex | None, records: Sequence[dict],
                donors: Sequence[Segment], *, unit: str = "") -> dict[str, Source]:
    """Where ``records`` (a unit's new and changed images) are stored already: among the unit's own old rows
    (``live``), then the ``donors``'. A donor index that cannot be read gives none: encoding is always right."""
    found = copy_sources(live, records) if live is not None else {}
    rest = [r for r in records if r["image_id"] not in found]
    if donors and rest:
        try:
            found |= copy_sources(unit_live_index(writer, donors), rest)
        except Exception as e:  # noqa: BLE001 - an optimisation
            log.warning("unit %s: the blocks its images may have moved from cannot be read (%s); encoding its new "
                        "images", unit, e)
    return found


def relabel_segment(writer: FeatureStoreWriter, segment: Segment, edits: Mapping[int, tuple]) -> Segment:
    """A new index revision of ``segment`` with ``edits`` (row -> (uri, split, labels)) applied."""
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
    revised = pa.table({name: (label_array(table.schema.field(name), cols[name]) if name in label_names else
                               pa.array(cols[name], table.schema.field(name).type)) for name in table.column_names})
    return writer.write_index_revision(segment, revised)
