"""The per-block stages Ray Data runs: decode (CPU tasks) and encode (actors that own the model).

Plain callables over row dicts; `run.py` wires them into a Dataset. Decoding never imports
torch, so decode workers start fast and stay small (but for the opt-in `run.decode: fast`).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..encoders.preprocess import Preprocessing
from ..images import ImageDecodeError, decode_rgb
from ..stores import EncodedShard, check_feature_range, shard_plan_hash
from .device_decode import decode_on_device, jpeg_for_device

log = logging.getLogger(__name__)

FEATURE_PREFIX = "features/"


def _decode_one(rec: dict, data: bytes | Exception, preprocessing: Preprocessing, max_pixels: int,
                decode: str = "exact", device_decode: bool = False):
    """-> (uint8 array | JPEG bytes, None) or (None, error dict). A bad image is recorded, never raised.

    With `device_decode`, a JPEG that passes the header checks comes back as its bytes, for the encoder's GPU.
    """
    stage = "read"
    try:
        if isinstance(data, Exception):
            raise data
        stage = "decode"
        if device_decode and jpeg_for_device(data, max_pixels):
            return data, None
        if decode == "fast":
            from ..encoders.fast_decode import decode_fast  # imports torch: only for this opt-in mode

            return decode_fast(data, preprocessing, max_pixels=max_pixels), None
        image = decode_rgb(data, max_pixels=max_pixels)
        stage = "preprocess"
        return preprocessing.to_uint8(image), None
    except ImageDecodeError as e:
        reason = e.reason
    except Exception as e:  # noqa: BLE001 - any failure of one image is data, not a crash
        reason = f"{type(e).__name__}: {e}"
    return None, error_record(rec, stage, reason)


def error_record(rec: dict, stage: str, reason: str) -> dict:
    return {"image_id": rec["image_id"], "uri": rec["uri"], "stage": stage, "reason": reason[:500]}


def lower_thread_priority(niceness: int) -> None:
    """Make the calling thread `niceness` steps nicer (Linux: nice is per thread); a no-op where it cannot."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except OSError as e:
        log.debug("decode thread priority unchanged: %s", e)


def decode_records(records, *, source, preprocessing: Preprocessing, max_pixels: int, threads: int = 8,
                   niceness: int = 0, decode: str = "exact", device_decode: bool = False) -> dict:
    """ImageRecords -> `ok` mask, `pixels` (n_ok, 3, H, W) uint8 and error rows (JSON). Records holding their
    bytes (tar members, Parquet rows) are not read again.

    With `niceness`, the decoding threads yield to CPU encoder actors on the same cores: decode then runs
    ahead on what the encoders leave, rather than slowing the step that sets the pace. With `device_decode`
    (`run.decode: fast` and GPU encoders), JPEGs travel as bytes (`jpegs`, in the order of the ok rows that
    `on_device` marks) and the encoder decodes them on its GPU; `pixels` holds the others.
    """
    step = source.read_chunk or max(1, len(records))
    results = []
    with ThreadPoolExecutor(max_workers=threads, initializer=lower_thread_priority,
                            initargs=(niceness,)) as pool:  # PIL releases the GIL while decoding
        for start in range(0, len(records), step):
            chunk = records[start:start + step]
            blobs = source.read_many(chunk, threads=threads)
            dicts = [{"image_id": r.image_id, "uri": r.uri} for r in chunk]
            results += pool.map(lambda rd: _decode_one(*rd, preprocessing, max_pixels, decode, device_decode),
                                zip(dicts, blobs))
    ok = np.array([t is not None for t, _ in results], dtype=bool)
    size = preprocessing.crop_size
    tensors = [t for t, _ in results if isinstance(t, np.ndarray)]
    pixels = np.stack(tensors) if tensors else np.zeros((0, 3, size, size), np.uint8)
    errors = [e for _, e in results if e is not None]
    out = {"ok": ok, "pixels": pixels, "errors": json.dumps(errors)}
    if device_decode:
        out["jpegs"] = [t for t, _ in results if isinstance(t, bytes)]
        out["on_device"] = np.array([isinstance(t, bytes) for t, _ in results if t is not None], dtype=bool)
    return out


class EncodeShard:
    """Actor callable: loads the frozen encoder once, then encodes shard after shard."""

    def __init__(self, *, encoder_spec, device: str, store_dtype: str, storage_options: dict | None = None,
                 torch_threads: int | None = None, expected_provenance: dict | None = None, decode: str = "exact",
                 source=None, max_pixels: int = 89_478_485):
        import torch

        from ..encoders import build_encoder

        if torch_threads:
            torch.set_num_threads(torch_threads)  # Ray pins OMP threads to the actor's num_cpus
        self.encoder = build_encoder(encoder_spec, device=device, storage_options=storage_options, decode=decode)
        if expected_provenance is not None:
            check_encoder_matches(expected_provenance, self.encoder.provenance())
        self.batch_size = encoder_spec.batch_size
        self.store_dtype = np.dtype(store_dtype)
        self.source, self.max_pixels, self.decode = source, max_pixels, decode
        log.info("encoder %s ready on %s", self.encoder.name, self.encoder.device)

    def __call__(self, row: dict) -> dict:
        if row.get("defer"):  # run.decode_in: encoder
            return decode_and_encode(self.encoder, row, source=self.source, max_pixels=self.max_pixels,
                                     decode=self.decode, batch_size=self.batch_size, store_dtype=self.store_dtype)
        return encode_row(self.encoder, row, batch_size=self.batch_size, store_dtype=self.store_dtype)


def decode_and_encode(encoder, row: dict, *, source, max_pixels: int, decode: str, batch_size: int,
                      store_dtype) -> dict:
    """A block row without pixels -> its features, reading and decoding one batch while the previous one is
    encoded: at most two batches of pixels are in memory, whatever the block's size."""
    from ..sources.base import record_from_json

    records = [record_from_json(r) for r in json.loads(row["records"])]
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]

    def decoded(batch):
        return decode_records(batch, source=source, preprocessing=encoder.preprocessing, max_pixels=max_pixels,
                              decode=decode)

    oks, errors, parts = [], [], {layer: [] for layer in encoder.layers}
    with ThreadPoolExecutor(1, thread_name_prefix="strata-decode") as pool:
        pending = pool.submit(decoded, batches[0]) if batches else None
        for k in range(len(batches)):
            got = pending.result()
            pending = pool.submit(decoded, batches[k + 1]) if k + 1 < len(batches) else None
            encoded = encode_row(encoder, {"records": "[]", **got}, batch_size=batch_size, store_dtype=store_dtype)
            oks.append(got["ok"])
            errors += json.loads(got["errors"])
            for layer in parts:
                parts[layer].append(encoded[FEATURE_PREFIX + layer])
    out = {k: v for k, v in row.items() if k != "pixels"} | {
        "ok": np.concatenate(oks) if oks else np.zeros(0, bool), "errors": json.dumps(errors), "defer": False}
    for layer, chunks in parts.items():
        out[FEATURE_PREFIX + layer] = (np.concatenate(chunks) if chunks else
                                       np.zeros((0, encoder.layer_dims[layer]), store_dtype))
    return out


def check_encoder_matches(expected: dict, actual: dict) -> None:
    """The encoder built here must be the one the driver planned the store for (its card, or its own build):
    other weights, layer dims or library versions on a worker would write features the store misdescribes."""
    from ..encoders.card import CACHE_ENV, provenance_mismatch

    differ = provenance_mismatch(expected, actual)
    if differ:
        detail = "; ".join(f"{k}: planned {expected.get(k)!r}, built {actual.get(k)!r}" for k in differ[:3])
        raise RuntimeError(
            f"the encoder built on this worker differs from the one the driver planned for ({detail}). "
            f"Check that every node has the same weights and torch/timm versions; if the driver used a stale "
            f"encoder card, clear the card cache (${CACHE_ENV}, default ~/.cache/strata/encoder-cards)")


def encode_row(encoder, row: dict, *, batch_size: int, store_dtype) -> dict:
    """Decoded shard row -> the same row with `features/<layer>` arrays instead of pixels."""
    if "jpegs" in row:
        row = decode_on_device(encoder, row)
    pixels = row["pixels"]  # may be a read-only view of a Ray block: the upload copies each batch once
    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in encoder.layers}
    batches = (pixels[start:start + batch_size] for start in range(0, len(pixels), batch_size))
    for out in encoder.encode_batches(batches):
        for layer, t in out.items():
            values = t.numpy()
            check_feature_range(layer, values, np.dtype(store_dtype).name)
            parts[layer].append(values.astype(store_dtype))
    result = {k: v for k, v in row.items() if k != "pixels"}
    for layer, chunks in parts.items():
        dim = encoder.layer_dims[layer]
        result[FEATURE_PREFIX + layer] = np.concatenate(chunks) if chunks else np.zeros((0, dim), store_dtype)
    return result


def row_to_shard(row: dict, layers) -> EncodedShard:
    records = json.loads(row["records"])
    return EncodedShard(
        shard_id=int(row["shard_id"]),
        row_start=int(row["row_start"]),
        records=records,
        ok=np.asarray(row["ok"], dtype=bool),
        features={layer: np.asarray(row[FEATURE_PREFIX + layer]) for layer in layers},
        errors=json.loads(row["errors"]),
        plan_hash=shard_plan_hash(records),
        unit=str(row.get("unit") or ""),
    )
