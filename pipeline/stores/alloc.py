"""Block allocation: each job appends one record that gives it a fresh, contiguous run of blocks.

Records are created with create-if-absent under consecutive sequence numbers, so two jobs can never get the
same block, and blocks (with their Zarr rows) are never handed out twice. A job that is run again with the same
work finds its earlier allocation by the hash of its blocks' contents and resumes in it.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .. import storage
from . import layout
from .cas import create_exclusive, read_settled
from .manifest import ls, now_iso

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    seq: int
    first_block: int
    contents: tuple[str, ...]  # content hash of each block, in order
    reused: bool = False

    @property
    def blocks(self) -> range:
        return range(self.first_block, self.first_block + len(self.contents))


def plan_hash(contents: Sequence[str]) -> str:
    return layout.stable_hash(list(contents))


def _entries(fs, base: str) -> tuple[list[tuple[int, int, int, str, str]], int]:
    """Allocations (seq, first block, blocks, plan prefix, path) and the highest sequence number taken.

    Named records are listed without reading them; a sequence number whose record is not there yet (its
    claimer is between its two writes, or died there) is read from its marker, which holds the same document.
    """
    records, markers = {}, {}
    for path in ls(fs, layout.allocations_dir(base)):
        name = path.rsplit("/", 1)[-1]
        parsed = layout.parse_allocation_name(name)
        if parsed:
            records[parsed[0]] = (*parsed, path)
        elif name.startswith("seq-") and name[4:].isdigit():
            markers[int(name[4:])] = path
    for seq in sorted(set(markers) - set(records)):
        try:
            doc = json.loads(read_settled(fs, markers[seq]))
        except FileNotFoundError:
            continue
        records[seq] = (seq, int(doc["first_block"]), len(doc["contents"]), plan_hash(doc["contents"]),
                        markers[seq])
    top = max([-1, *records, *markers])
    return sorted(records.values()), top


def allocate(fs, base: str, contents: Sequence[str], *, job_id: str, min_block: int = 0,
             reuse: bool = True) -> Allocation:
    """Blocks for ``contents`` (one block each): an earlier allocation of exactly this work, else a new one."""
    contents = tuple(contents)
    digest = plan_hash(contents)
    entries, top = _entries(fs, base)
    if reuse:
        for seq, start, count, prefix, path in reversed(entries):
            if count == len(contents) and digest.startswith(prefix):
                doc = storage.read_json(fs, path)
                if tuple(doc["contents"]) == contents:
                    log.info("resuming in allocation %d (blocks %d..%d)", seq, start, start + count - 1)
                    return Allocation(seq, start, contents, reused=True)
    while True:
        next_block = max([min_block, *(start + count for _, start, count, _, _ in entries)])
        seq = top + 1
        path = f"{layout.allocations_dir(base)}/{layout.allocation_name(seq, next_block, len(contents), digest)}"
        doc = {"seq": seq, "first_block": next_block, "contents": list(contents), "job_id": job_id,
               "created_at": now_iso()}
        # the sequence number is the lock: a second job taking `seq` must fail, whatever its blocks
        if _claim(fs, base, seq, path, json.dumps(doc).encode()):
            return Allocation(seq, next_block, contents)
        entries, top = _entries(fs, base)


def _claim(fs, base: str, seq: int, path: str, data: bytes) -> bool:
    """Create-if-absent on the sequence number alone (its marker), then the descriptive record."""
    marker = f"{layout.allocations_dir(base)}/seq-{seq:010d}"
    if not create_exclusive(fs, base, marker, data):
        return False
    storage.atomic_write_bytes(fs, path, data)
    return True
