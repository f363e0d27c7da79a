"""One layer of a feature store written for other tools: the embedding-reader layout, or a FAISS index.

Both read the store shard by shard and write through fsspec, so the layer never has to fit in memory
(except a FAISS index itself, which lives in memory until it is written).
"""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage

log = logging.getLogger(__name__)

EMBEDDINGS_DIR, METADATA_DIR = "embeddings", "metadata"
FAISS_INDEX, FAISS_IDS = "index.faiss", "ids.parquet"
FAISS_METRICS = ("ip", "l2", "cosine")
#: rows sampled to train a FAISS index that needs training (IVF, PQ...)
FAISS_TRAIN_ROWS = 100_000


def _metadata(index_rows: pa.Table, store) -> pa.Table:
    columns = ["image_id", "row", *[c for c in ("split", *store.label_columns) if c in index_rows.column_names]]
    return index_rows.select(list(dict.fromkeys(columns)))


def _write_manifest(fs, base: str, store, layer: str, fmt: str, n: int, **extra) -> None:
    info = {"format": fmt, "store": storage.redact_uri(storage.absolute_uri(store.uri)), "version": store.version, "layer": layer,
            "dim": store.layer_dims[layer], "rows": n, **extra}
    fs.pipe_file(f"{base}/export.json", json.dumps(info, indent=2).encode())


def _out_folder(out: str, storage_options) -> tuple:
    """(fs, path) of the export folder; an existing file there is refused before any work."""
    fs, base = storage.resolve(out, storage_options)
    if fs.isfile(base):
        raise ValueError(f"export folder {storage.redact_uri(out)} is a file; --out takes a folder (created if "
                         f"missing)")
    return fs, base


def _clear_earlier_export(fs, base: str, out: str) -> None:
    """Remove an earlier embedding-reader export in this folder: its numbered files would be read beside the new
    ones (more shards, other rows). Folders strata did not write are refused, not emptied."""
    parts = [f"{base}/{d}" for d in (EMBEDDINGS_DIR, METADATA_DIR) if fs.exists(f"{base}/{d}")]
    if not parts:
        return
    manifest = f"{base}/export.json"
    earlier = json.loads(fs.cat_file(manifest)) if fs.exists(manifest) else {}
    if earlier.get("format") != "embedding-reader":
        raise ValueError(f"export folder {storage.redact_uri(out)} holds embeddings/ or metadata/ that no strata "
                         f"export wrote; choose an empty or new folder for --out")
    log.info("replacing the earlier export in %s (%s of %s, version %s)", storage.redact_uri(out),
             earlier.get("layer"), earlier.get("store"), earlier.get("version"))
    fs.rm(manifest)
    for path in parts:
        fs.rm(path, recursive=True)


def export_embedding_reader(store, layer: str, out: str, *, storage_options=None) -> str:
    """`<out>/embeddings/emb_NNNNN.npy` (float32) + `<out>/metadata/metadata_NNNNN.parquet` (image_id, row,
    split, labels), one pair per store shard, aligned row for row: what embedding-reader's `parquet_npy`
    format (and autofaiss) read."""
    if layer not in store.layer_dims:
        raise ValueError(f"layer {layer!r} not in this feature set; layers: {store.layers}")
    fs, base = _out_folder(out, storage_options)
    _clear_earlier_export(fs, base, out)
    fs.makedirs(f"{base}/{EMBEDDINGS_DIR}", exist_ok=True)
    fs.makedirs(f"{base}/{METADATA_DIR}", exist_ok=True)
    n = 0
    for part, (index_rows, block) in enumerate(store.iter_layer(layer, dtype=np.float32)):
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(block))
        fs.pipe_file(f"{base}/{EMBEDDINGS_DIR}/emb_{part:05d}.npy", buf.getvalue())
        sink = io.BytesIO()
        pq.write_table(_metadata(index_rows, store), sink)
        fs.pipe_file(f"{base}/{METADATA_DIR}/metadata_{part:05d}.parquet", sink.getvalue())
        n += len(block)
    _write_manifest(fs, base, store, layer, "embedding-reader", n)
    log.info("exported %d rows of %s to %s (embedding-reader parquet_npy)", n, layer, storage.redact_uri(out))
    return out


def export_faiss(store, layer: str, out: str, *, metric: str = "cosine", factory: str = "Flat",
                 storage_options=None) -> str:
    """`<out>/index.faiss` whose ids are the store's row numbers, and `<out>/ids.parquet` mapping each id to
    its image_id (and labels). `cosine` L2-normalises rows and searches by inner product; `factory` is a
    faiss.index_factory string (trained on up to FAISS_TRAIN_ROWS rows when it needs training)."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines read like import failures
    import faiss

    if layer not in store.layer_dims:
        raise ValueError(f"layer {layer!r} not in this feature set; layers: {store.layers}")
    if metric not in FAISS_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {list(FAISS_METRICS)}")
    fs, base = _out_folder(out, storage_options)
    dim = store.layer_dims[layer]
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(dim, f"IDMap2,{factory}", faiss_metric)
    except RuntimeError as e:
        raise ValueError(f"faiss cannot build index {factory!r}: {' '.join(str(e).split())[:200]}") from None
    prepare = _normalise if metric == "cosine" else _float32
    if not index.is_trained:
        sample = _training_sample(store, layer, prepare)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise ValueError(f"faiss cannot train index {factory!r} on {len(sample)} rows of {layer!r}: "
                             f"{' '.join(str(e).split())[:200]}; use a smaller factory (fewer IVF lists, "
                             f"fewer PQ bits) or Flat/HNSW32 for small sets") from None
    ids = []
    for index_rows, block in store.iter_layer(layer, dtype=np.float32):
        rows = index_rows.column("row").to_numpy().astype(np.int64)
        index.add_with_ids(prepare(block), rows)
        meta = _metadata(index_rows, store)
        if "id" in meta.column_names:  # a label called id: the faiss id column owns that name
            meta = meta.rename_columns(["label_id" if c == "id" else c for c in meta.column_names])
        ids.append(meta.rename_columns(["id" if c == "row" else c for c in meta.column_names]))
    fs.makedirs(base, exist_ok=True)
    fs.pipe_file(f"{base}/{FAISS_INDEX}", faiss.serialize_index(index).tobytes())
    sink = io.BytesIO()
    table = pa.concat_tables(ids) if ids else pa.table({"image_id": pa.array([], pa.string()),
                                                         "id": pa.array([], pa.int64())})
    pq.write_table(table, sink)
    fs.pipe_file(f"{base}/{FAISS_IDS}", sink.getvalue())
    _write_manifest(fs, base, store, layer, "faiss", index.ntotal, metric=metric, factory=factory)
    log.info("exported %d rows of %s to %s (faiss %s, %s)", index.ntotal, layer, storage.redact_uri(out),
             factory, metric)
    return out


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = _float32(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _training_sample(store, layer: str, prepare: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """An even sample of up to FAISS_TRAIN_ROWS rows, taken shard by shard."""
    keep = min(1.0, FAISS_TRAIN_ROWS / max(len(store.index_table()), 1))
    parts, rng = [], np.random.default_rng(0)
    for _, block in store.iter_layer(layer, dtype=np.float32):
        take = block if keep >= 1.0 else block[rng.random(len(block)) < keep]
        parts.append(prepare(take))
    return np.concatenate(parts) if parts else np.zeros((0, store.layer_dims[layer]), np.float32)


EXPORTERS: dict[str, Callable[..., str]] = {"embedding-reader": export_embedding_reader, "faiss": export_faiss}
