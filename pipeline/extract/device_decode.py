"""`run.decode: fast` with GPU encoders: decode tasks ship JPEG bytes, the encoder actor decodes them on its GPU.

The CPU side stays torch-free and only reads headers (format, mode, the pixel limit); the actor decodes a
shard's JPEGs in one nvJPEG call (`torchvision.io.decode_jpeg(device="cuda")`), resizes and crops them on
the GPU, and falls back to the CPU fast path for the few a GPU decoder refuses (CMYK, arithmetic coding).
"""
from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

_DEVICE_MODES = ("RGB", "L")  # what nvJPEG decodes (YCbCr and greyscale JPEGs)


def jpeg_for_device(data: bytes, max_pixels: int) -> bool:
    """Whether the GPU can take these bytes: a baseline/progressive JPEG in RGB or greyscale, within the
    pixel limit (checked from the header: a decompression bomb never reaches the GPU)."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the CPU path will name the problem
        return False
    w, h = image.size
    return image.format == "JPEG" and image.mode in _DEVICE_MODES and w * h <= max_pixels


def decode_on_device(encoder, row: dict) -> dict:
    """A decoded shard row with JPEG bytes -> the same row with every ok image in `pixels`, a uint8 tensor on
    the encoder's device; images that fail there and on the CPU become errors."""
    import torch

    from ..encoders.fast_decode import decode_fast, decode_jpegs_on_device
    from ..images import ImageDecodeError
    from .stages import error_record

    pre = encoder.preprocessing
    jpegs, on_device = list(row["jpegs"]), np.asarray(row["on_device"], dtype=bool)
    decoded, reasons = decode_jpegs_on_device(jpegs, pre, encoder.device)
    records = json.loads(row["records"])
    ok = np.array(row["ok"], dtype=bool)
    ok_rows = np.flatnonzero(ok)
    errors = json.loads(row["errors"])
    cpu_pixels = iter(torch.as_tensor(np.array(row["pixels"])))
    gpu_pixels = iter(zip(jpegs, decoded, reasons))
    images = []
    for position, device_side in zip(ok_rows, on_device):
        if not device_side:
            images.append(next(cpu_pixels).to(encoder.device))
            continue
        data, tensor, reason = next(gpu_pixels)
        if tensor is None:
            try:  # the pixel limit was checked from the header before the bytes were shipped
                tensor = torch.from_numpy(decode_fast(data, pre, max_pixels=2**62)).to(encoder.device)
                log.debug("image %s: the GPU decoder refused it (%s); decoded on the CPU",
                          records[position]["image_id"], reason)
            except Exception as e:  # noqa: BLE001 - one bad image is data, not a crash
                ok[position] = False
                why = e.reason if isinstance(e, ImageDecodeError) else f"{type(e).__name__}: {e}"
                errors.append(error_record(records[position], "decode", why))
                continue
        images.append(tensor)
    size = pre.crop_size
    pixels = torch.stack(images) if images else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    out = {k: v for k, v in row.items() if k not in ("jpegs", "on_device")}
    return {**out, "ok": ok, "pixels": pixels, "errors": json.dumps(errors)}
