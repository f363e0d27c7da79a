"""Incremental refresh: encode only new or changed images, tombstone deleted ones, commit a new version.

Changing the encoder, weights, layers, pooling or preprocessing changes the feature set's name,
so such a refresh starts a new feature set instead of mixing features.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..config import ExtractConfig, validate_extract
from ..stores import FeatureStore, FeatureStoreWriter
from ..stores.writer import schema_from_json
from ..stores.reader import NoCommittedVersionError
from .plan import ExtractPlan, build_plan, make_shards
from .run import ExtractSummary, execute, extract_plan, prepare_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefreshSummary:
    store_uri: str
    version: int | None
    added: int
    changed: int
    deleted: int
    unchanged: int
    seconds: float
    extract: ExtractSummary | None = None

    @property
    def nothing_changed(self) -> bool:
        return not (self.added or self.changed or self.deleted)

    def __str__(self) -> str:
        if self.nothing_changed:
            return (f"nothing changed in {self.unchanged} images; {self.store_uri} stays at version {self.version} "
                    f"({self.seconds:.1f} s)")
        return (f"refreshed {self.store_uri} to version {self.version}: {self.added} added, {self.changed} changed, "
                f"{self.deleted} deleted, {self.unchanged} unchanged kept without re-encoding ({self.seconds:.1f} s)")


def run_refresh(cfg: ExtractConfig) -> RefreshSummary:
    t0 = time.perf_counter()
    validate_extract(cfg)
    encoder = prepare_encoder(cfg)
    provenance = encoder.provenance()
    plan = build_plan(cfg, provenance)
    try:
        current = FeatureStore(plan.target.uri, storage_options=plan.target.storage_options)
    except (FileNotFoundError, NoCommittedVersionError):
        log.info("no committed version of %s yet: full extraction", plan.target.featureset)
        summary = extract_plan(cfg, encoder, plan)
        return RefreshSummary(plan.target.uri, summary.version, summary.images, 0, 0, 0,
                              time.perf_counter() - t0, summary)

    old = current.index_table(include_errors=True)
    old_fp = dict(zip(old.column("image_id").to_pylist(), old.column("fingerprint").to_pylist()))
    old_row = dict(zip(old.column("image_id").to_pylist(), old.column("row").to_pylist()))
    listed = {r["image_id"]: r for r in plan.records}
    added = [r for i, r in listed.items() if i not in old_fp]
    changed = [r for i, r in listed.items() if i in old_fp and old_fp[i] != r["fingerprint"]]
    deleted = [i for i in old_fp if i not in listed]
    unchanged = len(listed) - len(added) - len(changed)
    if not (added or changed or deleted):
        summary = RefreshSummary(plan.target.uri, current.version, 0, 0, 0, unchanged, time.perf_counter() - t0)
        log.info("%s", summary)
        return summary

    tombstones = sorted({*current.manifest.get("tombstone_rows", []),
                         *(old_row[r["image_id"]] for r in changed), *(old_row[i] for i in deleted)})
    shard_rows = plan.target.shard_rows
    writer = FeatureStoreWriter(plan.target)
    committed = writer.committed_shards()
    last = max(current.manifest["shards"])
    next_row = committed[last]["row_start"] + shard_rows
    todo = sorted(added + changed, key=lambda r: r["image_id"])
    new_shards = make_shards(todo, shard_rows, row_offset=next_row, first_shard=last + 1)
    refresh_plan = ExtractPlan(tuple(todo), tuple(new_shards), plan.target, plan.dataset_fingerprint)
    # label columns stay those of the feature set, so old and new index shards share one schema
    writer.prepare(n_rows=next_row + len(todo), layer_dims=encoder.layer_dims, provenance=provenance,
                   labels=schema_from_json(current.meta["label_schema"]))
    log.info("refresh: %d added, %d changed, %d deleted, %d unchanged -> %d new shards",
             len(added), len(changed), len(deleted), unchanged, len(new_shards))
    summary = execute(cfg, refresh_plan, writer, encoder, tombstone_rows=tombstones,
                      keep_shards=current.manifest["shards"])
    result = RefreshSummary(plan.target.uri, summary.version, len(added), len(changed), len(deleted), unchanged,
                            time.perf_counter() - t0, summary)
    log.info("%s", result)
    return result
