"""Retention: compact mostly-deleted segments, drop old versions, delete what no kept version references.

Files that only removed versions referenced are deleted at once. Files no version ever referenced belong to a
job still running or one that died; they are deleted only once older than ``grace`` seconds, so retention never
pulls blocks from under a job about to commit. Temporaries of interrupted writes are never read as data, and
are deleted after the same grace. Kept versions, pinned or not, stay byte-identical.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from . import layout
from .compact import CompactResult, compact
from .manifest import Version, list_versions, read_version

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 24 * 3600
_READ_THREADS = 16
_BLOCK = re.compile(r"shard-(\d{8})")
_ZARR_BLOCK = re.compile(rf"^{re.escape(layout.ZARR_DIR)}/[^/]+/c/(\d+)/")


@dataclass(frozen=True)
class RetentionResult:
    kept_versions: list[int]
    removed_versions: list[int]
    removed_shards: list[int]  # blocks whose files were deleted
    files_removed: int = 0
    bytes_freed: int = 0
    compaction: CompactResult | None = None
    kept_recent: int = 0  # unreferenced files left for their grace period
    removed_paths: list[str] = field(default_factory=list)


def retain(uri: str, *, keep: int, storage_options: Mapping[str, Any] | None = None, dry_run: bool = False,
           compact_first: bool = True, min_deleted: float = 0.5,
           grace: float = DEFAULT_GRACE_SECONDS) -> RetentionResult:
    """Keep the newest ``keep`` versions (after compacting, unless ``compact_first`` is off)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the latest version is always kept), got {keep}")
    if grace < 0:
        raise ValueError(f"the grace period must be >= 0 hours (unreferenced files younger than it are left alone), "
                         f"got {grace / 3600:g}")
    compaction = None
    if compact_first:
        compaction = compact(uri, min_deleted=min_deleted, storage_options=storage_options, dry_run=dry_run)
    fs, base = storage.resolve(uri, storage_options)
    meta = storage.read_json(fs, layout.featureset_json(base))
    versions = list_versions(fs, base)
    pending = bool(dry_run and compaction is not None and compaction.segments_rewritten)
    if pending:  # the real run commits the compaction first: one more version to count
        versions = [*versions, versions[-1] + 1]
    kept, removed = versions[-keep:], versions[:-keep]
    # a pending compaction's version is stood in for by the latest one less the segments it rewrites (their
    # new blocks do not exist yet, so the bytes it writes are not counted against those freed)
    kept_docs = _read_versions(fs, base, [min(v, versions[-2] if pending else v) for v in kept], meta)
    if pending:
        rewritten = set(compaction.segments_rewritten)
        kept_docs[-1] = dataclasses.replace(kept_docs[-1], segments=[seg for seg in kept_docs[-1].segments
                                                                     if seg.block not in rewritten])
    removed_docs = _read_versions(fs, base, removed, meta)
    live_files, live_blocks = _referenced(kept_docs, meta)
    dead_files, dead_blocks = _referenced(removed_docs, meta)
    now = time.time()
    doomed, recent = [], 0
    for path, info in _walk(fs, base):
        rel = path[len(base) + 1:]
        block = _block_of(rel)
        if rel in live_files or (block is not None and block in live_blocks and _block_scoped(rel)):
            continue
        known_dead = rel in dead_files or (block is not None and block in dead_blocks and _block_scoped(rel))
        if known_dead or now - storage.modified_time(info) > grace:
            doomed.append((path, rel, int(info.get("size") or 0), block))
        else:
            recent += 1
    if not dry_run:
        # versions first: a reader can no longer pin what is about to go
        storage.remove_files(fs, [layout.version_path(base, v) for v in removed])
        storage.remove_files(fs, [path for path, *_ in doomed])
        _prune_empty_dirs(fs, base, [path for path, *_ in doomed])
    blocks = sorted({b for *_, b in doomed if b is not None} - live_blocks)
    result = RetentionResult(kept, removed, blocks, len(doomed), sum(size for _, _, size, _ in doomed),
                             compaction, recent, sorted(rel for _, rel, _, _ in doomed))
    log.info("retention on %s: kept %s, removed versions %s, %d files (%.1f MB) from %d blocks%s",
             storage.redact_uri(uri), kept, removed, result.files_removed, result.bytes_freed / 1e6, len(blocks),
             " (dry run)" if dry_run else "")
    return result


def _prune_empty_dirs(fs, base: str, removed: list[str]) -> None:
    """On a filesystem with real folders, the chunk folders (`c/<block>`) the removed files leave empty.

    Object stores have no folders to leave behind; a folder a writer fills meanwhile is not empty and stays.
    """
    if not storage.is_local(fs):
        return
    stop = f"{base}/{layout.ZARR_DIR}"
    parents = {p.rsplit("/", 1)[0] for p in removed if p.startswith(stop + "/")}
    for folder in sorted(parents, key=len, reverse=True):
        while folder.startswith(stop + "/") and not folder.endswith("/c") and folder.count("/") > stop.count("/") + 1:
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or gone): its parents are not empty either
                break
            folder = folder.rsplit("/", 1)[0]


def _read_versions(fs, base: str, versions: list[int], meta: dict) -> list[Version]:
    """Version documents, read concurrently: on an object store each is a round trip, and under the read-back
    commit protocol a young one waits a second before it is trusted."""
    if len(versions) < 2:
        return [read_version(fs, base, v, meta=meta) for v in versions]
    with ThreadPoolExecutor(min(_READ_THREADS, len(versions)), thread_name_prefix="strata-retention") as pool:
        return list(pool.map(lambda v: read_version(fs, base, v, meta=meta), versions))


def _referenced(versions: list[Version], meta: Mapping) -> tuple[set[str], set[int]]:
    files, blocks = set(), set()
    for v in versions:
        for seg in v.segments:
            files.update(seg.files())
            blocks.add(seg.block)
    return files, blocks


def _block_scoped(rel: str) -> bool:
    """Files that belong to a block as a whole (its Zarr shard, its record), not to one revision of it."""
    return rel.startswith(f"{layout.ZARR_DIR}/") or rel.startswith(f"{layout.MANIFEST_DIR}/shards/")


def _block_of(rel: str) -> int | None:
    m = _ZARR_BLOCK.match(rel)
    if m:
        return int(m.group(1))
    if rel.startswith(f"{layout.MANIFEST_DIR}/") and not rel.startswith(f"{layout.MANIFEST_DIR}/shards/"):
        return None
    m = _BLOCK.search(rel.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def _walk(fs, base: str):
    """(path, info) of every data file and shard record: never versions, allocations, metadata or the lease."""
    fs.invalidate_cache(base)
    for path, info in fs.find(base, detail=True).items():
        rel = path[len(base) + 1:]
        name = rel.rsplit("/", 1)[-1]
        if rel.startswith(f"{layout.ZARR_DIR}/") and name in ("zarr.json", ".zgroup", ".zattrs", ".zarray"):
            continue
        if rel.startswith(f"{layout.MANIFEST_DIR}/") and not rel.startswith(f"{layout.MANIFEST_DIR}/shards/"):
            continue
        if rel.startswith("probes/"):
            continue  # probe results live beside the feature set and have their own life
        yield path, info
