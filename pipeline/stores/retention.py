"""Retention: drop old versions and the shards only they referenced; the kept versions stay readable."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from .. import storage
from . import layout
from .reader import list_versions
from .writer import FeatureStoreWriter, StoreTarget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionResult:
    kept_versions: list[int]
    removed_versions: list[int]
    removed_shards: list[int]


def retain(uri: str, *, keep: int, storage_options: Mapping[str, Any] | None = None,
           dry_run: bool = False) -> RetentionResult:
    """Keep the newest `keep` versions; delete older version files and unreferenced shards' files."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the latest version is always kept), got {keep}")
    fs, base = storage.resolve(uri, storage_options)
    versions = list_versions(fs, base)
    kept, removed = versions[-keep:], versions[:-keep]
    vdir = layout.versions_dir(base)
    referenced = {s for v in kept for s in storage.read_json(fs, f"{vdir}/{layout.version_name(v)}")["shards"]}
    shard_dir = f"{base}/{layout.MANIFEST_DIR}/shards"
    all_shards = sorted(int(p.rsplit("-", 1)[-1].removesuffix(".json")) for p in fs.ls(shard_dir, detail=False))
    # only shards that some removed version listed: never touch shards of a run still in progress
    listed_by_removed = {s for v in removed for s in storage.read_json(fs, f"{vdir}/{layout.version_name(v)}")["shards"]}
    orphans = [s for s in all_shards if s in listed_by_removed and s not in referenced]
    if not dry_run:
        for v in removed:  # versions first: a reader can no longer pin what is about to go
            fs.rm(f"{vdir}/{layout.version_name(v)}")
        writer = FeatureStoreWriter(_target_of(uri, fs, base, storage_options))
        for s in orphans:
            _remove_shard(writer, s)
    log.info("retention on %s: kept %s, removed versions %s and %d shards", storage.redact_uri(uri), kept, removed,
             len(orphans))
    return RetentionResult(kept, removed, orphans)


def _remove_shard(writer: FeatureStoreWriter, shard_id: int) -> None:
    fs = writer.fs
    record = storage.read_json(fs, layout.shard_record_path(writer.base, shard_id))
    paths = writer.shard_files(record)
    writer.uncommit_shard(shard_id)  # uncommit first, then the data
    for path in paths:
        if fs.exists(path):
            fs.rm(path)


def _target_of(uri: str, fs, base: str, storage_options) -> StoreTarget:
    meta = storage.read_json(fs, layout.featureset_json(base))
    root, name = uri.rstrip("/").rsplit("/", 1)
    return StoreTarget(root=root, featureset=name, storage_options=dict(storage_options or {}), dtype=meta["dtype"],
                       shard_rows=meta["shard_rows"], chunk_rows=meta["chunk_rows"], formats=tuple(meta["formats"]))
