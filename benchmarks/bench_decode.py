"""Decode + resize + crop per CPU core: the exact path, `run.decode: fast`, and torchvision.io.decode_jpeg.

JPEG photos of 500-800 px (crops of the scikit-image and scikit-learn sample photos, tests/photos.py), the
bundled EfficientNet-Lite0's preprocessing (resize 256, crop 224, bicubic). Each variant runs on one thread;
its images/s is per core. Fidelity: each variant's pixels are encoded by the bundled pretrained
EfficientNet-Lite0 and compared with the exact path's features, layer by layer: the mean (and the worst
image's) cosine. Target: fast >= 2x exact at mean cos >= 0.995 on every layer.

Run: .venv/bin/python benchmarks/bench_decode.py [--images 200 --repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from _machine import machine_header  # noqa: E402
from photos import photo_jpegs  # noqa: E402

from pipeline.config import EncoderSpec  # noqa: E402
from pipeline.encoders import build_encoder  # noqa: E402
from pipeline.encoders.fast_decode import decode_fast, resize_crop  # noqa: E402
from pipeline.images import DEFAULT_MAX_PIXELS, decode_rgb  # noqa: E402


def variants(pre):
    def exact(b):
        return pre.to_uint8(decode_rgb(b))

    def fast(b):
        return decode_fast(b, pre, max_pixels=DEFAULT_MAX_PIXELS)

    def fast_draft_1x(b):
        return decode_fast(b, pre, max_pixels=DEFAULT_MAX_PIXELS, draft_margin=1)

    def tv_cpu(b):
        from torchvision.io import ImageReadMode, decode_jpeg

        t = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB,
                        apply_exif_orientation=True)
        return resize_crop(t, pre).contiguous().numpy()

    return [("exact (PIL decode + PIL resize)", exact),
            ("fast (run.decode: fast)", fast),
            ("torchvision.io.decode_jpeg + torch resize", tv_cpu),
            ("  fast with DRAFT_MARGIN=1", fast_draft_1x)]


def rate(fn, blobs, repeats: int) -> float:
    fn(blobs[0])
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in blobs:
            fn(b)
        best = min(best, time.perf_counter() - t0)
    return len(blobs) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(1)
    blobs = photo_jpegs(args.images, seed=0)
    enc = build_encoder(EncoderSpec(name="efficientnet_lite0"), device="cpu")
    pre = enc.preprocessing
    rows, reference, exact_rate = [], None, None
    for name, fn in variants(pre):
        ips = rate(fn, blobs, args.repeats)
        pixels = np.stack([fn(b) for b in blobs])
        with torch.no_grad():
            feats = {}
            for start in range(0, len(pixels), 50):
                for layer, t in enc.encode(pixels[start:start + 50]).items():
                    feats.setdefault(layer, []).append(t)
        feats = {k: torch.cat(v) for k, v in feats.items()}
        reference = reference or feats
        exact_rate = exact_rate or ips
        cos = {k: torch.nn.functional.cosine_similarity(feats[k], reference[k]) for k in feats}
        rows.append((name, ips, ips / exact_rate, min(float(c.mean()) for c in cos.values()),
                     min(float(c.min()) for c in cos.values()), float(np.abs(pixels.astype(int) - pixels_exact).mean())
                     if reference is not feats else 0.0))
        if reference is feats:
            pixels_exact = pixels.astype(int)
    print(machine_header("bench_decode"))
    print(f"# {len(blobs)} JPEG photos 500-800 px, {sum(map(len, blobs)) / len(blobs) / 1e3:.0f} kB average; "
          f"preprocessing resize {pre.resize_size} crop {pre.crop_size} {pre.interpolation}; 1 thread each")
    print(f"{'variant':<44} {'img/s/core':>10} {'vs exact':>8} {'mean cos':>9} {'worst cos':>9} {'pixel MAE':>9}")
    for name, ips, ratio, mean_cos, worst_cos, mae in rows:
        print(f"{name:<44} {ips:>10.1f} {ratio:>7.2f}x {mean_cos:>9.4f} {worst_cos:>9.4f} {mae:>9.2f}")
    print("cos: features of the bundled EfficientNet-Lite0 (5 layers) against the exact path's; mean over images, "
          "lowest layer; worst: the lowest single image")
    fast = rows[1]
    print(f"fast: {fast[2]:.2f}x exact at mean cos {fast[3]:.4f}  (target >= 2x at >= 0.995): "
          f"{'met' if fast[2] >= 2 and fast[3] >= 0.995 else 'NOT met'}")


if __name__ == "__main__":
    main()
