"""Multi-layer extractor vs a bare `model(x)` forward on the same pre-decoded batches.

Prints images/s of both and their ratio (target >= 0.95: taps and pooling cost almost nothing).
Run: .venv/bin/python benchmarks/bench_encoder.py [--batches 8 --batch-size 32]
"""
from __future__ import annotations

import argparse
import platform

import torch

from _timing import best_seconds
from pipeline.config import EncoderSpec
from pipeline.encoders import build_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compute-dtype", default="fp32")
    args = ap.parse_args()

    layers = ("blocks.2", "blocks.4", "blocks.6", "bn2")
    enc = build_encoder(EncoderSpec(name="efficientnet_lite0", layers=layers, compute_dtype=args.compute_dtype),
                        device=args.device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8, generator=g)
               for _ in range(args.batches)]
    model = enc.model

    def bare(px):
        x = enc.preprocessing.normalize(px.to(enc.device)).contiguous(memory_format=enc.memory_format)
        with torch.inference_mode(), enc._autocast():
            out = model(x)
        return out.cpu()

    def taps(px):
        return enc.encode(px)

    n = args.batches * args.batch_size
    rows = []
    for name, fn in [("bare model(x) -> logits", bare), (f"strata {len(layers)} layers, avg-pooled", taps)]:
        rows.append((name, n / best_seconds(fn, batches, args.repeats)))
    print(f"# {platform.node()} {platform.processor() or platform.machine()} torch {torch.__version__} "
          f"threads={torch.get_num_threads()} device={enc.device} dtype={args.compute_dtype}")
    print(f"{'variant':<34} {'images/s':>10}")
    for name, ips in rows:
        print(f"{name:<34} {ips:>10.1f}")
    print(f"ratio strata / bare = {rows[1][1] / rows[0][1]:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
