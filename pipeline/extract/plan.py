"""The extraction plan: listing -> shards with fixed row ranges, and what an earlier run already committed.

Plain Python: no Ray, no torch models. Shards are contiguous row ranges of the sorted listing, so a
re-run of the same listing gets the same shards and can skip the committed ones.
"""
from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass

from ..config import ExtractConfig, SourceSpec
from ..sources import ImageRecord, make_source
from ..stores import StoreTarget, featureset_name, shard_plan_hash
from ..stores.layout import stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    shard_id: int
    row_start: int
    records: tuple[dict, ...]
    plan_hash: str

    def to_item(self) -> dict:
        """The Ray Data row that carries this shard through the pipeline."""
        return {"shard_id": self.shard_id, "row_start": self.row_start, "records": json.dumps(self.records)}


@dataclass(frozen=True)
class ExtractPlan:
    records: tuple[dict, ...]
    shards: tuple[ShardTask, ...]
    target: StoreTarget
    dataset_fingerprint: str


def build_source(spec: SourceSpec):
    options = dict(spec.options)
    if spec.storage_options:
        options["storage_options"] = dict(spec.storage_options)
    return make_source(spec.kind, spec.uri, **options)


def record_dict(r: ImageRecord) -> dict:
    return {"image_id": r.image_id, "uri": r.uri, "fingerprint": r.fingerprint, "split": r.split,
            "labels": dict(r.labels)}


def dataset_fingerprint(records) -> str:
    return stable_hash([(r["image_id"], r["fingerprint"]) for r in records])


def dataset_name(spec: SourceSpec) -> str:
    path = spec.uri.rstrip("/").split("://", 1)[-1]
    head = path.split("*", 1)[0].rstrip("/")
    stem = posixpath.splitext(posixpath.basename(head))[0]
    if spec.kind == "manifest" or stem in ("", "images"):
        stem = posixpath.basename(posixpath.dirname(head)) or stem  # data/digits/manifest.csv -> digits
    return stem or "dataset"


def make_shards(records: list[dict], shard_rows: int, *, row_offset: int = 0, first_shard: int = 0) -> list[ShardTask]:
    shards = []
    for k, start in enumerate(range(0, len(records), shard_rows)):
        chunk = tuple(records[start:start + shard_rows])
        shards.append(ShardTask(first_shard + k, row_offset + start, chunk, shard_plan_hash(chunk)))
    return shards


def list_records(spec: SourceSpec) -> list[dict]:
    records = [record_dict(r) for r in build_source(spec).list_images()]
    if not records:
        raise ValueError(f"source {spec.kind}:{spec.uri} listed no images")
    return records


def build_plan(cfg: ExtractConfig, provenance: dict, records: list[dict] | None = None) -> ExtractPlan:
    """Shards and target for the listing (`records`, or a fresh listing of the source)."""
    records = list_records(cfg.source) if records is None else records
    name = cfg.store.featureset or featureset_name(dataset_name(cfg.source), provenance, cfg.store.dtype)
    target = StoreTarget(root=cfg.store.root, featureset=name, storage_options=dict(cfg.store.storage_options),
                         dtype=cfg.store.dtype, shard_rows=cfg.store.shard_rows, chunk_rows=cfg.store.chunk_rows,
                         formats=tuple(cfg.store.formats))
    shards = make_shards(records, cfg.store.shard_rows)
    log.info("plan: %d images in %d shards of %d rows -> %s", len(records), len(shards), cfg.store.shard_rows,
             target.featureset)
    return ExtractPlan(tuple(records), tuple(shards), target, dataset_fingerprint(records))
