"""The demo: everything on one machine with the bundled pretrained encoder."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from .config import EncoderSpec
from .encoders import build_encoder

log = logging.getLogger(__name__)


def _sample_photos() -> list[Path]:
    import matplotlib
    import sklearn.datasets

    return [
        Path(sklearn.datasets.__file__).parent / "images" / "china.jpg",
        Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg",
        Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    ]


def run_demo(out_dir: str | Path = "out/demo") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    enc = build_encoder(EncoderSpec(layers=("blocks.1", "blocks.2", "blocks.4", "bn2", "classifier")), device="auto")
    photos = _sample_photos()
    pixels = torch.stack([enc.preprocessing.to_uint8(Image.open(p).convert("RGB")) for p in photos])
    feats = enc.encode(pixels)
    print(f"encoder {enc.name} ({enc.weights.source}, sha256 {enc.weights.sha256[:12]}) on {enc.device}")
    for layer, t in feats.items():
        print(f"  {layer:<12} {tuple(t.shape)}")
    for path, row in zip(photos, feats["classifier"]):
        print(f"  {path.name:<18} -> {enc.class_names[int(row.argmax())]}")
    return 0
