"""Decode + resize + crop per CPU core: the exact path, `run.decode: fast`, and torchvision.io.decode_jpeg.

JPEG photos of 500-800 px (crops of the scikit-image and scikit-learn sample photos, tests/photos.py), and of
1100-1500 px, where fast decodes at a reduced DCT scale; the
bundled EfficientNet-Lite0's preprocessing (resize 256, crop 224, bicubic). Each variant runs on one thread;
its images/s is per core. Fidelity: each variant's pixels are encoded by the bundled pretrained
EfficientNet-Lite0 and compared with the exact path's features, layer by layer: the mean (and the worst
image's) cosine. Target: fast >= 2x exact at mean cos >= 0.995 on every layer.

Run: .venv/bin/python benchmarks/bench_decode.py [--images 200 --repeats 3]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from _machine import machine_header  # noqa: E402
from _timing import best_seconds  # noqa: E402
from photos import photo_jpegs  # noqa: E402

from pipeline.config import EncoderSpec  # noqa: E402
from pipeline.encoders import build_encoder  # noqa: E402
from pipeline.encoders.fast_decode import decode_fast, resize_crop  # noqa: E402
from pipeline.images import DEFAULT_MAX_PIXELS, decode_rgb  # noqa: E402

# the 2x target is against the exact path on the 500-800 px photos


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


def features(enc, pixels: np.ndarray) -> dict[str, torch.Tensor]:
    out: dict[str, list] = {}
    for start in range(0, len(pixels), 50):
        for layer, t in enc.encode(pixels[start:start + 50]).items():
            out.setdefault(layer, []).append(t)
    return {k: torch.cat(v) for k, v in out.items()}


def measure(enc, blobs, repeats: int, names: set[str] | None = None) -> list[tuple]:
    rows, ref_feats, ref_pixels, exact_rate = [], None, None, None
    for name, fn in variants(enc.preprocessing):
        if names is not None and name not in names:
            continue
        ips = len(blobs) / best_seconds(fn, blobs, repeats)
        pixels = np.stack([fn(b) for b in blobs])
        feats = features(enc, pixels)
        if ref_feats is None:
            ref_feats, ref_pixels, exact_rate = feats, pixels.astype(int), ips
        cos = {k: torch.nn.functional.cosine_similarity(feats[k], ref_feats[k]) for k in feats}
        rows.append((name, ips, ips / exact_rate, min(float(c.mean()) for c in cos.values()),
                     min(float(c.min()) for c in cos.values()), float(np.abs(pixels.astype(int) - ref_pixels).mean())))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--large", type=int, default=60, help="photos of 1100-1500 px, where the DCT scaling engages")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.set_num_threads(1)
    enc = build_encoder(EncoderSpec(name="efficientnet_lite0"), device="cpu")
    pre = enc.preprocessing
    sets = [("500-800 px", photo_jpegs(args.images, seed=0), None)]
    if args.large:
        sets.append(("1100-1500 px", photo_jpegs(args.large, seed=1, sides=(1100, 1500)),
                     {"exact (PIL decode + PIL resize)", "fast (run.decode: fast)",
                      "torchvision.io.decode_jpeg + torch resize"}))
    print(machine_header("bench_decode"))
    print(f"# preprocessing resize {pre.resize_size} crop {pre.crop_size} {pre.interpolation}; one thread per "
          "variant; cos: features of the bundled EfficientNet-Lite0 (5 layers) against the exact path's, the mean "
          "over images on the lowest layer, and the worst single image")
    print(f"{'photos':<13} {'variant':<44} {'img/s/core':>10} {'vs exact':>8} {'mean cos':>9} {'worst cos':>9} "
          f"{'pixel MAE':>9}")
    verdict = None
    for label, blobs, names in sets:
        rows = measure(enc, blobs, args.repeats, names)
        kb = sum(map(len, blobs)) / len(blobs) / 1e3
        for name, ips, ratio, mean_cos, worst_cos, mae in rows:
            print(f"{label + f' ({len(blobs)})':<13} {name:<44} {ips:>10.1f} {ratio:>7.2f}x {mean_cos:>9.4f} "
                  f"{worst_cos:>9.4f} {mae:>9.2f}")
        print(f"{'':<13} ({kb:.0f} kB per JPEG on average)")
        verdict = verdict or rows[1]
    if args.large:
        print("the 1100-1500 px photos are upscaled crops of samples of at most 1411 px: smoother than camera "
              "photos, so their cos is an optimistic figure for the DCT-scaled decode")
    print(f"fast on 500-800 px photos: {verdict[2]:.2f}x exact at mean cos {verdict[3]:.4f}  (target >= 2x at "
          f">= 0.995): {'met' if verdict[2] >= 2 and verdict[3] >= 0.995 else 'NOT met'}")


if __name__ == "__main__":
    main()
