"""The encoder's own preprocessing: resize, center crop, normalisation, as its weights were trained."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
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

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, crop, crop) uint8, resized on the shorter side then center-cropped."""
        image = F.resize(
            image, [self.resize_size], interpolation=INTERPOLATIONS[self.interpolation], antialias=True
        )
        image = F.center_crop(image, [self.crop_size])
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> float32 normalised with the weights' mean and std."""
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
            interpolation=t.interpolation.value,
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
