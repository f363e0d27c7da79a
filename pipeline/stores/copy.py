"""Vectors copied from stored blocks: what compaction rewrites, and what a job reuses for an image that moved.

An image whose bytes are already in the store under another row (a Hugging Face dataset re-sharded, rows that
shifted to a neighbouring file after an append) has the same features: the feature set fixes the encoder,
weights, layers, pooling and preprocessing. A job copies such rows' vectors instead of encoding the image
again. Only content fingerprints (``sha256:`` of the image bytes) are matched; a file's size and mtime, or an
ETag, say nothing about which image another row holds.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import storage
from .live import LiveIndex, meta_key, read_tables
from .manifest import Segment
from .writer import EncodedShard, FeatureStoreWriter

CONTENT_PREFIX = "sha256:"


def stored_features(writer: FeatureStoreWriter, seg: Segment, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Stored vectors of ``rows`` (of segment ``seg``) per layer, as stored (NaN for failed images)."""
    out = {}
    if "zarr" in writer.target.formats:
        import zarr

        group = zarr.open_group(storage.zarr_store(f"{writer.target.uri}/features.zarr",
                                                   writer.target.storage_options, read_only=True), mode="r")
        for layer in writer.meta["layer_dims"]:
            block = group[layer][seg.row_start:seg.row_end]
            out[layer] = block[rows - seg.row_start]
        return out
    for layer, dim in writer.meta["layer_dims"].items():
        (t,) = read_tables(writer.fs, writer.base, [seg.parquet[layer]])
        pos = {int(r): i for i, r in enumerate(t.column("row").to_numpy())}
        flat = t.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        out[layer] = np.stack([flat[pos[int(r)]] if int(r) in pos else np.full(dim, np.nan, flat.dtype)
                               for r in rows]) if len(rows) else np.zeros((0, dim), flat.dtype)
    return out


class Source(NamedTuple):
    """Where a stored vector is copied from, and under which id it is stored there; ``relabelled``: an image
    that only moved (same id) now has other labels or another split."""

    block: int
    row: int
    image_id: str
    relabelled: bool = False


def copy_sources(live: LiveIndex, records: Sequence[Mapping]) -> dict[str, Source]:
    """image_id -> the stored, encoded row with the same content, for the records that have one (the row of
    the same id where there is one: an image that only moved)."""
    wanted = {r["fingerprint"] for r in records if str(r.get("fingerprint") or "").startswith(CONTENT_PREFIX)}
    if not wanted or not len(live):
        return {}
    table = live.table
    table = table.filter(pc.and_(pc.equal(table.column("status"), "ok"),
                                 pc.is_in(table.column("fingerprint"), pa.array(sorted(wanted), pa.string()))))
    found: dict[str, Source] = {}
    by_id: dict[tuple[str, str], tuple[Source, tuple]] = {}
    columns = [c for c in live.label_columns if c in table.column_names]
    split = table.column("split").to_pylist() if "split" in table.column_names else [None] * table.num_rows
    labels = [table.column(c).to_pylist() for c in columns]
    for k, (fp, block, row, image_id) in enumerate(zip(*(table.column(c).to_pylist()
                                                         for c in ("fingerprint", "shard", "row", "image_id")))):
        src = Source(int(block), int(row), image_id)
        found.setdefault(fp, src)
        by_id[(fp, image_id)] = src, meta_key(None, split[k], {c: v[k] for c, v in zip(columns, labels)})
    out = {}
    for r in records:
        if r.get("fingerprint") not in found:
            continue
        same = by_id.get((r["fingerprint"], r["image_id"]))
        if same is None:
            out[r["image_id"]] = found[r["fingerprint"]]
            continue
        given = r.get("labels") or {}
        now = meta_key(None, r.get("split"), {c: given.get(c) for c in columns})
        out[r["image_id"]] = same[0]._replace(relabelled=now != same[1])
    return out


def moved(sources: Mapping[str, Source]) -> int:
    """Images copied from a row of the same id: moved from another unit, neither added nor deleted."""
    return sum(1 for image_id, src in sources.items() if src.image_id == image_id)


def moved_relabelled(sources: Mapping[str, Source]) -> int:
    """Of the images that moved, those whose labels or split changed on the way: relabelled, not unchanged."""
    return sum(1 for image_id, src in sources.items() if src.image_id == image_id and src.relabelled)


def copied_shard(writer: FeatureStoreWriter, block: int, records: Sequence[dict], plan_hash: str, unit: str,
                 sources: Sequence[Source], segments: Mapping[int, Segment]) -> EncodedShard:
    """Block ``block`` of ``records``, each with the stored vectors of its source."""
    by_block: dict[int, list[int]] = defaultdict(list)
    for k, src in enumerate(sources):
        by_block[src.block].append(k)
    dims = writer.meta["layer_dims"]
    feats = {layer: np.zeros((len(records), dim), np.float32) for layer, dim in dims.items()}
    for src_block, ks in by_block.items():
        got = stored_features(writer, segments[src_block], np.array([sources[k].row for k in ks], np.int64))
        for layer in dims:
            feats[layer][ks] = got[layer]
    for layer, x in feats.items():
        if not np.isfinite(x).all():  # a hole where a vector should be: encode rather than copy it
            raise ValueError(f"stored vectors of layer {layer!r} copied for block {block} are not finite")
    return EncodedShard(block, block * writer.target.shard_rows, list(records), np.ones(len(records), bool), feats,
                        [], plan_hash, unit, copied=True)
