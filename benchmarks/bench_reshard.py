"""A Hugging Face dataset re-sharded and appended to: the refresh that copies moved images vs encoding them.

The dataset: N procedural shapes (`write_shapes(..., size=64, seed=0)`) as a `datasets` Image column with a
ClassLabel, exported as Hub-style Parquet shards (`data/train-0000k-of-0000S.parquet`). Encoder:
efficientnet_lite0 with its bundled pretrained weights and native 224 px preprocessing, 4 layers, float16,
a local store. Three runs, each timed whole, in the driver (run.local_max_images above N: no Ray start-up
in any of them, so the comparison is about the work):

  full       the extraction of the N images in 8 shards (version 1)
  reshard    the same N images plus 1% appended, re-cut into 10 shards, then `run_refresh`: every old image
             moved to another file; its vectors are copied from the rows holding the same bytes and only the
             appended 1% is encoded (version 2). Checked: copied == N, encoded == the appended count, and
             every copied vector is bit-identical to version 1's of the same bytes.
  baseline   what a refresh did before moved images were copied: encode every listed image again (measured
             as the full extraction of the re-cut dataset into a second, empty store).

    .venv/bin/python benchmarks/bench_reshard.py            # N=1500
    .venv/bin/python benchmarks/bench_reshard.py --quick    # N=300

Target: reshard / baseline <= 0.1.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from _machine import machine_header  # noqa: E402 - benchmarks/ is on sys.path when run as a script

ENCODER = "efficientnet_lite0"
LAYERS = "[blocks.2,blocks.4,blocks.6,bn2]"
TARGET = 0.1


def export(images: list[bytes], labels: list[int], names: list[str], root: Path, shards: int) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "shape": datasets.ClassLabel(names=names)})
    data = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "shape": labels},
                                      features=features)
    for old in root.glob("data/*.parquet"):
        old.unlink()
    (root / "data").mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        data.shard(shards, k, contiguous=True).to_parquet(str(root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"))


def shapes(n: int, seed: int, workdir: Path) -> tuple[list[bytes], list[int], list[str]]:
    import pandas as pd

    from pipeline.sources.demo import write_shapes

    out = write_shapes(workdir / f"shapes-{seed}", n=n, size=64, seed=seed)
    manifest = pd.read_csv(out / "manifest.csv")
    names = sorted(manifest["shape"].unique())
    return ([(out / uri).read_bytes() for uri in manifest["uri"]],
            [names.index(s) for s in manifest["shape"]], names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--quick", action="store_true", help="N=300")
    args = ap.parse_args()
    n = 300 if args.quick else args.n
    logging.basicConfig(level=logging.WARNING)
    import numpy as np

    from pipeline.config import ExtractConfig, load_config
    from pipeline.extract import run_extract
    from pipeline.extract.refresh import run_refresh
    from pipeline.stores import FeatureStore

    print(machine_header("bench_reshard"))
    with tempfile.TemporaryDirectory(prefix="bench-reshard-") as tmp:
        work = Path(tmp)
        images, labels, names = shapes(n, 0, work)
        extra = max(1, n // 100)
        more, more_labels, _ = shapes(extra, 1, work)
        ds = work / "ds"

        def cfg(store: str):
            return load_config(ExtractConfig, None, [
                "source.kind=hf", f"source.uri={ds}", f"store.root={work / store}", f"encoder.name={ENCODER}",
                "encoder.weights=imagenet", f"encoder.layers={LAYERS}", "store.shard_rows=256",
                "store.chunk_rows=64", f"run.local_max_images={10 * n}"])

        export(images, labels, names, ds, 8)
        t = time.perf_counter()
        first = run_extract(cfg("s"))
        full_s = time.perf_counter() - t
        old = FeatureStore(first.store_uri)
        old_x = dict(zip(old.index()["fingerprint"], old.layer("bn2")))

        export(images + more, labels + more_labels, names, ds, 10)
        t = time.perf_counter()
        refresh = run_refresh(cfg("s"))
        reshard_s = time.perf_counter() - t
        new = FeatureStore(first.store_uri)
        new_x = dict(zip(new.index()["fingerprint"], new.layer("bn2")))
        assert refresh.copied == n and refresh.extract.encoded == extra, refresh
        assert all(np.array_equal(new_x[fp], v) for fp, v in old_x.items())

        t = time.perf_counter()
        baseline = run_extract(cfg("baseline"))
        baseline_s = time.perf_counter() - t

    rows = [("full (8 shards)", n, first.encoded, 0, full_s),
            ("reshard refresh (10 shards, +1%)", n + extra, refresh.extract.encoded, refresh.copied, reshard_s),
            ("baseline: encode all again", n + extra, baseline.encoded, 0, baseline_s)]
    print(f"\n{'run':<34} {'images':>7} {'encoded':>8} {'copied':>7} {'seconds':>8}")
    for name, images_n, encoded, copied, seconds in rows:
        print(f"{name:<34} {images_n:>7} {encoded:>8} {copied:>7} {seconds:>8.1f}")
    ratio = reshard_s / baseline_s
    print(f"\nreshard / baseline = {ratio:.3f} (target <= {TARGET}) -> {'MET' if ratio <= TARGET else 'NOT MET'}")


if __name__ == "__main__":
    main()
