"""One job's update of a feature set, whatever computes its features: listing in, committed version out.

diff the listing with the latest version -> allocate fresh blocks for new and changed images -> have them
written (``write_blocks``: the extraction pipeline, or anything that writes whole blocks) -> commit the change.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .alloc import allocate
from .commit import ChangeSet, CommitResult, Upsert, commit_change
from .diff import ListingDiff, chunk_records, diff_listing
from .live import LiveIndex, state_of
from .manifest import Segment, latest_version
from .writer import FeatureStoreWriter, label_schema

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockTask:
    """A block to write: its number, its first row, its records (in row order) and their content hash."""

    block: int
    row_start: int
    records: tuple[dict, ...]
    content: str


#: Writes every task's block (skipping ones already written) and returns each block's shard record, after
#: checking that all their files are in the store.
WriteBlocks = Callable[[list[BlockTask]], Mapping[int, Mapping]]


@dataclass(frozen=True)
class JobOutcome:
    version: int | None
    published: bool
    diff: ListingDiff
    commit: CommitResult | None
    written: Mapping[int, Mapping]  # block -> shard record


def update_featureset(writer: FeatureStoreWriter, records: Sequence[dict], *, operation: str,
                      write_blocks: WriteBlocks, layer_dims: Mapping[str, int], provenance: Mapping[str, Any],
                      dataset_fingerprint: str = "", config: Mapping[str, Any] | None = None,
                      stats: Callable[[], Mapping[str, Any]] | None = None) -> JobOutcome:
    """Bring the feature set in line with ``records`` (image_id, uri, fingerprint, split, labels)."""
    meta = writer.prepare(n_rows=0, layer_dims=layer_dims, provenance=provenance, labels=label_schema(records))
    latest = latest_version(writer.fs, writer.base)
    label_names = [f["name"] for f in meta["label_schema"]]
    live = LiveIndex.of(writer.fs, writer.base, latest, label_names) if latest else LiveIndex.empty(label_names)
    diff = diff_listing(records, live)
    if diff.empty:
        log.info("nothing changed since version %d; no new version committed", latest.version)
        return JobOutcome(latest.version, False, diff, None, {})
    log.info("%s of %s: %d added, %d changed, %d deleted, %d relabelled, %d unchanged", operation,
             writer.target.featureset, diff.added, diff.changed, len(diff.deletes), len(diff.relabels),
             diff.unchanged)
    change = ChangeSet(operation=operation, parent=live, deletes=diff.deletes, relabels=diff.relabels,
                       dataset_fingerprint=dataset_fingerprint, config=dict(config or {}))
    written: Mapping[int, Mapping] = {}
    chunks = chunk_records(diff.encode, writer.target.shard_rows)
    if chunks:
        alloc = allocate(writer.fs, writer.base, [digest for _, digest in chunks], job_id=change.job_id)
        rows = writer.target.shard_rows
        writer.grow(alloc.blocks.stop * rows)
        tasks = [BlockTask(b, b * rows, recs, digest) for b, (recs, digest) in zip(alloc.blocks, chunks)]
        log.info("%d images in %d blocks of %d rows (blocks %d..%d)", len(diff.encode), len(tasks), rows,
                 alloc.first_block, alloc.blocks.stop - 1)
        written = write_blocks(tasks)
        _add_blocks(change, tasks, written)
    change.stats = dict(stats() if stats else {})
    outcome = commit_change(writer, change)
    return JobOutcome(outcome.version, outcome.published, diff, outcome, written)


def _add_blocks(change: ChangeSet, tasks: list[BlockTask], written: Mapping[int, Mapping]) -> None:
    columns = change.parent.label_columns
    for task in tasks:
        record = written[task.block]
        change.new_segments.append(Segment.from_record(record))
        failed = set(record.get("error_rows", ()))
        for i, r in enumerate(task.records):
            labels = r.get("labels") or {}
            meta = state_of(r["uri"], r.get("split"), {c: labels.get(c) for c in columns})
            change.upserts[r["image_id"]] = Upsert(task.row_start + i, r["fingerprint"],
                                                   "error" if i in failed else "ok", meta)
