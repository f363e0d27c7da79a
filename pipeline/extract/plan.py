"""The extraction plan: listing -> blocks of rows, each block one shard written by one task.

Plain Python: no Ray, no torch models. A job's new rows are cut into chunks of `shard_rows` (sorted by image id,
so the same work always gives the same chunks and content hashes); the store's allocator then gives the job a
fresh run of blocks, and chunk k goes to the k-th block.
"""
from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ExtractConfig, SourceSpec
from ..sources import ImageRecord, make_source
from ..stores import StoreTarget, featureset_name
from ..stores.layout import stable_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardTask:
    shard_id: int  # the block number
    row_start: int
    records: tuple[dict, ...]
    plan_hash: str
    unit: str = ""

    def to_item(self) -> dict:
        """The Ray Data row that carries this shard through the pipeline."""
        return {"shard_id": self.shard_id, "row_start": self.row_start, "records": json.dumps(self.records),
                "unit": self.unit}


@dataclass(frozen=True)
class ExtractPlan:
    """The blocks one job writes into one feature set."""

    target: StoreTarget
    shards: tuple[ShardTask, ...]
    dataset_fingerprint: str

    @property
    def n_rows(self) -> int:
        return sum(len(s.records) for s in self.shards)


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
    path = spec.uri.rstrip("/").split("://", 1)[-1].split("?", 1)[0]
    head = path.split("*", 1)[0].rstrip("/")
    stem = posixpath.splitext(posixpath.basename(head))[0]
    if spec.kind == "manifest" or stem in ("", "images"):
        stem = posixpath.basename(posixpath.dirname(head)) or stem  # data/digits/manifest.csv -> digits
    return stem or "dataset"


def list_records(spec: SourceSpec) -> list[dict]:
    records = [record_dict(r) for r in build_source(spec).list_images()]
    if not records:
        raise ValueError(f"source {spec.kind}:{spec.uri} listed no images")
    return records


def build_target(cfg: ExtractConfig, provenance: dict) -> StoreTarget:
    name = cfg.store.featureset or featureset_name(dataset_name(cfg.source), provenance, cfg.store.dtype)
    return StoreTarget(root=cfg.store.root, featureset=name, storage_options=dict(cfg.store.storage_options),
                       dtype=cfg.store.dtype, shard_rows=cfg.store.shard_rows, chunk_rows=cfg.store.chunk_rows,
                       formats=tuple(cfg.store.formats))


def assign_blocks(chunks: Sequence[tuple[tuple[dict, ...], str]], first_block: int, shard_rows: int) -> list[ShardTask]:
    return [ShardTask(first_block + k, (first_block + k) * shard_rows, recs, digest)
            for k, (recs, digest) in enumerate(chunks)]
