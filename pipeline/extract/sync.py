"""One extraction job: list the source, build (or read the card of) the encoder, and update the feature set.

`strata extract` and `strata refresh` are both this: an extract into an existing feature set whose listing
changed does what a refresh does (new and changed images encoded into fresh blocks, deleted ones dropped,
label edits taken as data), and never renumbers or rewrites rows a published version holds.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import storage
from ..config import ExtractConfig, validate_extract
from ..stores import FeatureStoreWriter
from ..stores.job import update_from_records
from ..stores.units import BlockTask
from .plan import ExtractPlan, ShardTask, build_target, dataset_fingerprint, list_records
from .run import ExecuteResult, ExtractSummary, _ensure_ray, execute, prepare_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    store_uri: str
    version: int | None
    published: bool
    counts: dict  # added, changed, deleted, relabelled, unchanged images
    extract: ExtractSummary | None
    seconds: float


def sync_store(cfg: ExtractConfig, *, operation: str, start_ray_early: bool = False) -> SyncResult:
    """Bring the feature set of ``cfg`` in line with its source; see the module docstring."""
    t0 = time.perf_counter()
    validate_extract(cfg)
    storage.register_secrets(cfg.to_dict())
    # The driver's encoder build (mostly importing torch and timm) overlaps the listing and Ray's start-up,
    # which mostly waits on new processes. Ray must start on this thread: its processes die with the
    # thread that spawned them.
    with ThreadPoolExecutor(1, thread_name_prefix="strata-encoder") as pool:
        building = pool.submit(prepare_encoder, cfg)
        try:
            records = list_records(cfg.source)
        except Exception:
            building.result()  # a bad encoder config is reported before a bad source
            raise
        failed = building.done() and building.exception() is not None
        if start_ray_early and len(records) > cfg.run.local_max_images and not failed:
            _ensure_ray(cfg.run.ray_address)
        encoder = building.result()
    target = build_target(cfg, encoder.provenance())
    writer = FeatureStoreWriter(target)
    fingerprint = dataset_fingerprint(records)
    executed: list[ExecuteResult] = []

    def write_blocks(tasks: list[BlockTask]):
        plan = ExtractPlan(target, tuple(ShardTask(t.block, t.row_start, t.records, t.content, t.unit)
                                         for t in tasks), fingerprint)
        executed.append(execute(cfg, plan, writer, encoder))
        return executed[-1].records

    outcome = update_from_records(writer, records, operation=operation, write_blocks=write_blocks,
                                  layer_dims=encoder.layer_dims, provenance=encoder.provenance(),
                                  dataset_fingerprint=fingerprint, config=cfg.to_dict(),
                                  stats=lambda: _stats(executed[0] if executed else None))
    summary = None
    if executed:
        r = executed[0]
        summary = ExtractSummary(target.uri, outcome.version, r.rows, r.encoded, r.errors, r.skipped_shards,
                                 time.perf_counter() - t0, r.bytes_written)
        log.info("%s", summary)
    return SyncResult(target.uri, outcome.version, outcome.published, dict(outcome.counts), summary,
                      time.perf_counter() - t0)


def _stats(result: ExecuteResult | None) -> dict:
    if result is None:
        return {"encoded": 0}
    return {"images": result.rows, "encoded": result.encoded, "errors": result.errors,
            "skipped_shards": result.skipped_shards, "seconds": round(result.seconds, 3),
            "bytes_written": result.bytes_written}


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Encode the source into its feature set (a new one, or the existing one brought up to date)."""
    t0 = time.perf_counter()
    outcome = sync_store(cfg, operation="extract", start_ray_early=True)
    if outcome.extract is not None:
        return outcome.extract
    # nothing to encode: the listing matched the store, or only deletions and label edits were committed
    return ExtractSummary(outcome.store_uri, outcome.version, 0, 0, 0, 0, time.perf_counter() - t0, 0)
