"""Retention: drop old versions and the shards only they referenced; the kept versions stay readable."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from .. import storage
from . import layout
from .reader import list_versions

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
        for s in orphans:
            _remove_shard(fs, base, s)
    log.info("retention on %s: kept %s, removed versions %s and %d shards", storage.redact_uri(uri), kept, removed,
             len(orphans))
    return RetentionResult(kept, removed, orphans)


def _remove_shard(fs, base: str, shard_id: int) -> None:
    record_path = layout.shard_record_path(base, shard_id)
    record = storage.read_json(fs, record_path)
    fs.rm(record_path)  # uncommit first, then the data
    paths = [layout.index_path(base, shard_id), layout.errors_path(base, shard_id),
             *(f"{base}/{p}" for p in record.get("files", {}).get("parquet", {}).values())]
    meta = storage.read_json(fs, layout.featureset_json(base))
    if "zarr" in meta["formats"]:
        zarr_shard = record["row_start"] // meta["shard_rows"]
        paths += [f"{base}/{layout.ZARR_DIR}/{layer}/c/{zarr_shard}/0" for layer in meta["layer_dims"]]
    for path in paths:
        if fs.exists(path):
            fs.rm(path)
