"""The encoder's own preprocessing: resize, center crop, normalisation, as its weights were trained.

Torch-free on purpose (torch is imported only inside `normalize`): decode workers and config
loading should not pay for importing torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """Eval transform of a set of weights.

    Split in two on purpose: `to_uint8` (resize + crop) runs in CPU decode tasks and ships
    a compact uint8 tensor; `normalize` runs next to the model, on its device.
    """

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {self.interpolation!r}; valid: {sorted(INTERPOLATIONS)}"
            )
        if self.crop_size > self.resize_size:
            raise ValueError(f"crop_size {self.crop_size} is larger than resize_size {self.resize_size}")

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> (3, crop, crop) uint8: shorter side resized, then center-cropped.

        The same arithmetic as torchvision's `Resize(int)` + `CenterCrop` on PIL images, which is
        what the reference transforms of the weights do (a parity test holds us to it).
        """
        new_w, new_h = self.resized_size(*image.size)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])
        left, top = self.crop_origin(new_w, new_h)
        c = self.crop_size
        image = image.crop((left, top, left + c, top + c))
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))

    def resized_size(self, w: int, h: int) -> tuple[int, int]:
        """(width, height) after the shorter side is resized to `resize_size`, as torchvision's `Resize(int)`."""
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if w <= h else (new_long, new_short)

    def crop_origin(self, w: int, h: int) -> tuple[int, int]:
        """(left, top) of the center crop of a (w, h) image, as torchvision's `CenterCrop`."""
        return int(round((w - self.crop_size) / 2.0)), int(round((h - self.crop_size) / 2.0))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, 3, crop, crop) uint8 for a list of RGB images."""
        return np.stack([self.to_uint8(im) for im in images])

    def normalize(self, pixels):
        """(N, 3, H, W) uint8 tensor -> float32 normalised with the weights' mean and std."""
        import torch

        x = pixels.to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            resize_size=int(d["resize_size"]),
            crop_size=int(d["crop_size"]),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )

    @classmethod
    def from_torchvision(cls, weights) -> "Preprocessing":
        """From a torchvision `Weights` enum member's `ImageClassification` preset."""
        t = weights.transforms()
        return cls(
            resize_size=int(t.resize_size[0]),
            crop_size=int(t.crop_size[0]),
            interpolation=t.interpolation.value,  # "bilinear" / "bicubic"
            mean=tuple(t.mean),
            std=tuple(t.std),
        )

    @classmethod
    def from_timm(cls, pretrained_cfg: dict) -> "Preprocessing":
        """From a timm `pretrained_cfg`, the way timm's eval transform derives its resize."""
        crop = int(pretrained_cfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = float(pretrained_cfg.get("crop_pct", 0.875))
        interp = pretrained_cfg.get("interpolation", "bicubic")
        return cls(
            resize_size=int(np.floor(crop / crop_pct)),
            crop_size=crop,
            interpolation=interp if interp in INTERPOLATIONS else "bicubic",
            mean=tuple(float(v) for v in pretrained_cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in pretrained_cfg.get("std", (0.229, 0.224, 0.225))),
        )
