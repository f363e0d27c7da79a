"""Decode untrusted image bytes into a fully loaded RGB PIL image, or fail with a short reason."""

from __future__ import annotations

import functools
import io
import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "Decoded", "ImageDecodeError", "decode_rgb", "decode_rgb_reduced", "to_rgb"]

logger = logging.getLogger(__name__)

# Same number as PIL's default MAX_IMAGE_PIXELS, but enforced per call: PIL's limit
# is process-global and other code in a worker may have changed it.
DEFAULT_MAX_PIXELS = 89_478_485

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WHITE = (255, 255, 255, 255)
_ORIENTATION = 0x0112  # the EXIF tag


class ImageDecodeError(ValueError):
    """A file that cannot become an RGB image; ``reason`` is short enough for an errors table."""

    def __init__(self, reason: str, *, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # keep reason/detail when pickled to another Ray worker
        return _rebuild_error, (self.reason, self.detail)


def _rebuild_error(reason: str, detail: str) -> ImageDecodeError:
    return ImageDecodeError(reason, detail=detail)


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` to an RGB image: alpha over white, EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, and
    truncated files raise instead of coming back half grey.
    """
    return decode_rgb_reduced(data, max_pixels=max_pixels).image


@dataclass(frozen=True)
class Decoded:
    """An RGB image, and where a reduced decode left it: `box` is the region of `image` that holds the whole
    original of `size` (both as displayed, EXIF orientation applied); None when decoded at full size."""

    image: Image.Image
    size: tuple[int, int]
    box: tuple[float, float, float, float] | None = None


def decode_rgb_reduced(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, reduce_to: int | None = None) -> Decoded:
    """`decode_rgb`, and with ``reduce_to``, a JPEG whose shorter side is at least twice that decoded at a
    reduced DCT scale (1/2, 1/4 or 1/8: libjpeg's own downscaling, through PIL's ``draft``) that keeps its
    shorter side at ``reduce_to`` or more: several times less work to decode and to resize. Resizing
    `box` of the result to a size gives nearly the pixels the full decode resized to that size gives.
    """
    if not data:
        raise ImageDecodeError("empty file")
    image = _open(data, max_pixels)
    _check_pixels(image.size, max_pixels)
    full = image.size
    box = _reduce_jpeg(image, reduce_to) if reduce_to and image.format == "JPEG" else None
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        _warn_truncated_allowed()
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises a zoo of types for broken streams
        reason = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        raise ImageDecodeError(reason, detail=f"{type(exc).__name__}: {exc}") from exc
    if image.format == "PNG" and b"IEND" not in data:
        # PIL stops after the last IDAT, so a cut-off tail would pass unnoticed.
        raise ImageDecodeError("truncated", detail="PNG has no IEND chunk")
    stored = image.size
    try:
        orientation = int(image.getexif().get(_ORIENTATION, 1))
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as exc:  # a broken EXIF block should not cost us good pixels
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        orientation = 1
    if image.size != stored and image.size != stored[::-1]:
        orientation = 1  # not a transposition we know: leave the box unoriented
    if orientation in (5, 6, 7, 8):
        full = full[::-1]
    if box is not None:
        box = _orient_box(box, stored, orientation)
    return Decoded(to_rgb(image), full, box)


def _reduce_jpeg(image: Image.Image, reduce_to: int) -> tuple[float, float, float, float] | None:
    """Ask libjpeg for a DCT-scaled decode where the image is at least twice `reduce_to`; the box of the
    original in the reduced image, or None."""
    width, height = image.size
    scale = reduce_to / min(width, height)
    if scale > 0.5:
        return None
    # draft picks the largest DCT scale that keeps both sides at the size asked for, or above
    drafted = image.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    return tuple(drafted[1]) if drafted and image.size != (width, height) else None


def _orient_box(box, size: tuple[int, int], orientation: int) -> tuple[float, float, float, float]:
    """`box` of an image of `size`, after the EXIF orientation's flip or rotation."""
    w, h = size
    move = {
        2: lambda x, y: (w - x, y), 3: lambda x, y: (w - x, h - y), 4: lambda x, y: (x, h - y),
        5: lambda x, y: (y, x), 6: lambda x, y: (h - y, x), 7: lambda x, y: (h - y, w - x),
        8: lambda x, y: (y, w - x),
    }.get(orientation, lambda x, y: (x, y))
    (x0, y0), (x1, y1) = move(box[0], box[1]), move(box[2], box[3])
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, scaling high bit depths instead of clipping them."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image), mode))
    elif mode == "LAB":  # PIL's own LAB -> RGB convert copies channels, giving false colours
        return ImageCms.applyTransform(image, _lab_to_srgb())
    try:
        if mode in _ALPHA_MODES or image.has_transparency_data:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
        return image if mode == "RGB" else image.convert("RGB")  # RGB already: no copy
    except ValueError as exc:  # PIL has no conversion path for this mode (e.g. LAB)
        raise ImageDecodeError(f"unsupported mode {mode}", detail=str(exc)) from exc


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Map 16-bit, 32-bit int and float pixels to 0..255.

    16-bit modes (and ``I`` data that fits in 0..65535, which is what 16-bit PNG
    and TIFF give) are scaled by 255/65535; float data in 0..1 by 255; anything
    else is min-max stretched, since no fixed range would be right for it.
    """
    values = array.astype(np.float64)
    values[~np.isfinite(values)] = 0.0
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and low >= 0 and high <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif high > low:
        scaled = (values - low) * (255.0 / (high - low))
    else:
        scaled = np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Read only the header; map PIL's open-time failures to reasons."""
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not an image") from exc
    except Image.DecompressionBombError as exc:
        # PIL's own hard limit (2x its global) fired before we saw the size.
        size = _header_size(data)
        if size is None:
            raise ImageDecodeError("decompression bomb", detail=str(exc)) from exc
        raise _bomb_error(size, min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0))) from exc
    except Exception as exc:
        raise ImageDecodeError("corrupt", detail=f"{type(exc).__name__}: {exc}") from exc


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    if size[0] * size[1] > max_pixels:
        raise _bomb_error(size, max_pixels)


def _bomb_error(size: tuple[int, int], limit: int) -> ImageDecodeError:
    width, height = size
    return ImageDecodeError(
        f"decompression bomb: {width} x {height} = {width * height} pixels > limit {limit}"
    )


@functools.cache
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
    return ImageCms.buildTransform(lab, srgb, "LAB", "RGB")


@functools.cache
def _warn_truncated_allowed() -> None:
    logger.warning(
        "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True by other code in this "
        "process; truncated JPEGs may now decode silently"
    )


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Header size through PIL's plugin registry, skipping its global bomb check."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        accepted = accept(prefix) if accept is not None else True
        if not accepted or isinstance(accepted, str):  # a str is PIL's "maybe" warning
            continue
        try:
            return factory(io.BytesIO(data), "").size
        except Exception:
            continue
    return None
