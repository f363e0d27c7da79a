"""Where each part of a feature set lives under its root, and how a feature set is named.

<root>/<featureset>/
  features.zarr/<layer>            Zarr v3 (rows, dim) arrays, row-sharded; group attrs = provenance
  parquet/layer=<layer>/shard-N.parquet   image_id, row, vector (fixed_size_list)
  index/shard-N.parquet            image_id, uri, fingerprint, row, status, split, labels
  errors/shard-N.parquet           image_id, uri, stage, reason
  _manifest/featureset.json        provenance, layer dims, shard geometry
  _manifest/shards/shard-N.json    a shard is committed once this exists
  _manifest/versions/vN.json       a version: the shards (and tombstoned rows) readers see
"""
from __future__ import annotations

import hashlib
import json
import re

ZARR_DIR = "features.zarr"
MANIFEST_DIR = "_manifest"


def shard_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}"


def version_name(version: int) -> str:
    return f"v{version:08d}.json"


def parse_version_name(name: str) -> int | None:
    m = re.fullmatch(r"v(\d{8})\.json", name.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def featureset_json(base: str) -> str:
    return f"{base}/{MANIFEST_DIR}/featureset.json"


def shard_record_path(base: str, shard_id: int) -> str:
    return f"{base}/{MANIFEST_DIR}/shards/{shard_name(shard_id)}.json"


def versions_dir(base: str) -> str:
    return f"{base}/{MANIFEST_DIR}/versions"


def index_path(base: str, shard_id: int) -> str:
    return f"{base}/index/{shard_name(shard_id)}.parquet"


def errors_path(base: str, shard_id: int) -> str:
    return f"{base}/errors/{shard_name(shard_id)}.parquet"


def parquet_path(base: str, layer: str, shard_id: int) -> str:
    return f"{base}/parquet/layer={layer}/{shard_name(shard_id)}.parquet"


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def featureset_name(dataset: str, provenance: dict, dtype: str) -> str:
    """Deterministic name: one per (dataset, encoder + weights, preprocessing, layers, pooling, dtype)."""
    key = {k: provenance[k] for k in ("encoder", "weights_sha256", "preprocessing", "layers", "pooling",
                                      "multiscale_grid", "compute_dtype")}
    key["dtype"] = dtype
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-") or "dataset"
    enc = re.sub(r"[^A-Za-z0-9_.-]+", "-", provenance["encoder"])
    return f"{safe}__{enc}__{stable_hash(key)[:10]}"
