"""`run.decode: fast`: the encoder's resize and crop with torch's antialiased kernels, JPEGs downscaled in the
DCT domain when much larger than the crop, and on a GPU, JPEGs decoded by nvJPEG.

The exact path (PIL decode, PIL resize: what the weights' reference transforms do) spends most of its time
in PIL's resize of the full image. torch's antialiased bilinear/bicubic is the same filter (written to match
PIL's) vectorised for uint8, several times faster; a JPEG at least 2 x `DRAFT_MARGIN` times larger than the
resize target is also decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL's `draft`), which leaves the final
resize a real downscale (at least `DRAFT_MARGIN`), so that the two-step filter stays close to the one-step
one, and resized from the region of the reduced image that holds the original: the full decode's geometry. The features differ
slightly from the exact path: the parity bound, tested on real photos, is a mean cosine >= 0.995 per
layer; the store records `decode: fast` in its provenance.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..images import ImageDecodeError, decode_rgb_reduced
from .preprocess import INTERPOLATIONS, Preprocessing

# draft only while the DCT-scaled image keeps at least this many times the resize target
DRAFT_MARGIN = 2


def resize_crop(pixels: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """(3, H, W) uint8 on any device -> (3, crop, crop) uint8: the encoder's resize and center crop."""
    h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
    new_w, new_h = preprocessing.resized_size(w, h)
    x = pixels.unsqueeze(0)
    if (new_w, new_h) != (w, h):
        mode = preprocessing.interpolation
        if x.device.type == "cpu" and mode != "nearest":  # uint8 in, uint8 out: torch's vectorised path
            x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        else:
            x = F.interpolate(x.float(), size=(new_h, new_w), mode=mode, antialias=mode != "nearest",
                              **({} if mode == "nearest" else {"align_corners": False}))
            x = x.round_().clamp_(0, 255).to(torch.uint8)
    left, top = preprocessing.crop_origin(new_w, new_h)
    c = preprocessing.crop_size
    return x[0, :, top:top + c, left:left + c]


def _resize_box(pixels: torch.Tensor, box, size: tuple[int, int], mode: str) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, size[1], size[0]): `box` (a region anchored at two image edges, as a DCT-scaled
    decode leaves it) resized to `size`, as PIL's `resize(size, box=box)` maps it."""
    flip = [d for d, anchored_far in ((-1, box[0] > 0), (-2, box[1] > 0)) if anchored_far]
    x = pixels.flip(flip) if flip else pixels  # the box now starts at (0, 0)
    scale = (size[1] / (box[3] - box[1]), size[0] / (box[2] - box[0]))
    x = F.interpolate(x.unsqueeze(0), scale_factor=scale, mode=mode, antialias=True, align_corners=False,
                      recompute_scale_factor=False)[0, :, :size[1], :size[0]]  # floor(w * scale) >= size
    return x.flip(flip) if flip else x


def decode_fast(data: bytes, preprocessing: Preprocessing, *, max_pixels: int,
                draft_margin: float = DRAFT_MARGIN) -> np.ndarray:
    """Image bytes -> (3, crop, crop) uint8 on the CPU, the fast way; the same errors as `decode_rgb`."""
    decoded = decode_rgb_reduced(data, max_pixels=max_pixels,
                                 reduce_to=int(draft_margin * preprocessing.resize_size))
    if preprocessing.interpolation == "nearest":  # no antialiased kernel to speed up: PIL's own resize
        return preprocessing.to_uint8(decoded.image) if decoded.box is None else _pil_box(decoded, preprocessing)
    pixels = _as_tensor(decoded.image)
    if decoded.box is None:
        return resize_crop(pixels, preprocessing).contiguous().numpy()
    # DCT-scaled: resize the region that holds the original, so that the geometry is the full decode's
    new_w, new_h = preprocessing.resized_size(*decoded.size)
    x = _resize_box(pixels, decoded.box, (new_w, new_h), preprocessing.interpolation)
    left, top = preprocessing.crop_origin(new_w, new_h)
    c = preprocessing.crop_size
    return x[:, top:top + c, left:left + c].contiguous().numpy()


def _as_tensor(image) -> torch.Tensor:
    """(3, H, W) uint8 view of an RGB image's pixels, read-only (nothing writes to it): no copy."""
    array = np.asarray(image, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
        return torch.from_numpy(array).permute(2, 0, 1)


def _pil_box(decoded, preprocessing: Preprocessing) -> np.ndarray:
    new_w, new_h = preprocessing.resized_size(*decoded.size)
    image = decoded.image.resize((new_w, new_h), INTERPOLATIONS[preprocessing.interpolation], box=decoded.box)
    left, top = preprocessing.crop_origin(new_w, new_h)
    c = preprocessing.crop_size
    return np.ascontiguousarray(np.asarray(image.crop((left, top, left + c, top + c))).transpose(2, 0, 1))


def decode_jpegs_on_device(blobs: list[bytes], preprocessing: Preprocessing, device: torch.device
                           ) -> tuple[list[torch.Tensor | None], list[str | None]]:
    """JPEG bytes -> one (3, crop, crop) uint8 tensor on `device` each (nvJPEG on CUDA), or None and a reason.

    The batch is decoded in one call; if that fails, image by image, so that one bad file costs only itself.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not blobs:
        return [], []
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    kwargs = {"mode": ImageReadMode.RGB, "apply_exif_orientation": True, "device": device}
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs for TorchCodec, which is not a dependency (yet)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded: list = decode_jpeg(data, **kwargs)
        except RuntimeError:
            decoded = []
            for d in data:
                try:
                    decoded.append(decode_jpeg(d, **kwargs))
                except RuntimeError as e:
                    decoded.append(ImageDecodeError("corrupt", detail=f"decode_jpeg: {e}"))
    out: list[torch.Tensor | None] = []
    reasons: list[str | None] = []
    for item in decoded:
        if isinstance(item, Exception):
            out.append(None)
            reasons.append(str(item)[:500])
        else:
            out.append(resize_crop(item, preprocessing))
            reasons.append(None)
    return out, reasons
