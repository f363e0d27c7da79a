"""Where each part of a feature set lives under its root, and how a feature set is named.

<root>/<featureset>/
  features.zarr/<layer>                      Zarr v3 (rows, dim) arrays; block k owns rows [k*S, (k+1)*S)
  parquet/layer=<layer>/shard-<k>-<c>.parquet image_id, row, vector (fixed_size_list)
  index/shard-<k>-<c>[-l<r>].parquet          image_id, uri, fingerprint, row, shard, status, split, labels
  errors/shard-<k>-<c>.parquet                image_id, uri, stage, reason
  _manifest/featureset.json                   provenance, layer dims, shard geometry (written once)
  _manifest/allocations/a-<seq>-...json       which job owns which blocks (create-if-absent, append-only)
  _manifest/shards/shard-<k>.json             written last by block k's writer: its files are complete
  _manifest/versions/vN.json                  a version: its segments, deleted rows, parent (create-if-absent)

Block numbers (and so Zarr rows) are never reused: each block is written once, by the one job whose
allocation holds it, with one content (``c``, the hash of its rows' inputs). Label edits write a new index
revision (``-l<r>``) beside the old one; nothing a published version references is ever rewritten.
"""
from __future__ import annotations

import hashlib
import json
import re

ZARR_DIR = "features.zarr"
MANIFEST_DIR = "_manifest"
FORMAT_VERSION = 2
_HASH_CHARS = 12


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def shard_name(block: int) -> str:
    return f"shard-{block:08d}"


def segment_stem(block: int, content: str) -> str:
    """File stem of block ``block`` holding ``content``: another content can never take this name."""
    return f"{shard_name(block)}-{content[:_HASH_CHARS]}"


def index_file(block: int, content: str, revision: str | None = None) -> str:
    """Relative path of a block's index table; ``revision`` names a label edit of it."""
    suffix = f"-l{revision[:_HASH_CHARS]}" if revision else ""
    return f"index/{segment_stem(block, content)}{suffix}.parquet"


def errors_file(block: int, content: str) -> str:
    return f"errors/{segment_stem(block, content)}.parquet"


def parquet_file(layer: str, block: int, content: str) -> str:
    return f"parquet/layer={layer}/{segment_stem(block, content)}.parquet"


def zarr_chunk_file(layer: str, block: int) -> str:
    """The one object holding block ``block`` of a layer: a Zarr shard (or chunk) spans a whole block."""
    return f"{ZARR_DIR}/{layer}/c/{block}/0"


def version_name(version: int) -> str:
    return f"v{version:08d}.json"


def parse_version_name(name: str) -> int | None:
    m = re.fullmatch(r"v(\d{8})\.json", name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def featureset_json(base: str) -> str:
    return f"{base}/{MANIFEST_DIR}/featureset.json"


def shard_record_path(base: str, block: int) -> str:
    return f"{base}/{MANIFEST_DIR}/shards/{shard_name(block)}.json"


def shards_dir(base: str) -> str:
    return f"{base}/{MANIFEST_DIR}/shards"


def versions_dir(base: str) -> str:
    return f"{base}/{MANIFEST_DIR}/versions"


def version_path(base: str, version: int) -> str:
    return f"{versions_dir(base)}/{version_name(version)}"


def allocations_dir(base: str) -> str:
    return f"{base}/{MANIFEST_DIR}/allocations"


def allocation_name(seq: int, start: int, count: int, plan: str) -> str:
    return f"a-{seq:010d}-b{start:010d}-n{count:08d}-{plan[:_HASH_CHARS]}.json"


def parse_allocation_name(name: str) -> tuple[int, int, int, str] | None:
    """(seq, first block, blocks, plan hash prefix) of an allocation file name."""
    m = re.fullmatch(r"a-(\d{10})-b(\d{10})-n(\d{8})-([0-9a-f]+)\.json", name.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)) if m else None


def lock_path(base: str) -> str:
    return f"{base}/{MANIFEST_DIR}/lock.json"


# format 1 (strata before immutable versions): shard files named by shard id only
def v1_index_file(shard_id: int) -> str:
    return f"index/shard-{shard_id:06d}.parquet"


def v1_errors_file(shard_id: int) -> str:
    return f"errors/shard-{shard_id:06d}.parquet"


def featureset_name(dataset: str, provenance: dict, dtype: str) -> str:
    """Deterministic name: one per (dataset, encoder + weights, preprocessing, layers, pooling, dtype)."""
    key = {k: provenance[k] for k in ("encoder", "weights_sha256", "preprocessing", "layers", "pooling",
                                      "multiscale_grid", "compute_dtype")}
    key["dtype"] = dtype
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-") or "dataset"
    enc = re.sub(r"[^A-Za-z0-9_.-]+", "-", provenance["encoder"])
    return f"{safe}__{enc}__{stable_hash(key)[:10]}"
