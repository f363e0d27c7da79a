"""Driver planning at scale: `strata extract --dry-run` on manifests of 10^4, 10^5 and 10^6 rows and on 1,000
WebDataset tars, each in a fresh process: seconds and the driver's peak RSS.

The manifests (CSV, with a fingerprint column, so the driver needs no per-image request) list URIs of a few
real PNGs over and over; a dry run reads none of them. The baseline is the planner strata had before work
units: the whole listing held in the driver as one record per image (`Source.list_images()`), measured on the
same inputs in the same run. Before timing, one untimed run caches the encoder card, so no run imports torch.

    .venv/bin/python benchmarks/bench_plan.py                      # 1e4, 1e5, 1e6 rows + 1000 tars
    .venv/bin/python benchmarks/bench_plan.py --rows 10000 100000  # quicker

Targets: peak RSS at 10^6 rows / at 10^4 rows <= 1.5; planning 10^6 rows < 30 s.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ENCODER = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1,layer4]"]


def _manifest(path: Path, rows: int, images: list[Path]) -> None:
    with open(path, "w") as f:
        f.write("uri,image_id,fp,label\n")
        for i in range(rows):
            f.write(f"{images[i % len(images)]},img{i:08d},fp{i},{i % 10}\n")


def _tars(folder: Path, n: int, png: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        with tarfile.open(folder / f"shard-{k:05d}.tar", "w") as tar:
            for j in range(2):
                for name, data in ((f"{k:05d}{j:04d}.png", png), (f"{k:05d}{j:04d}.cls", b"1")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def child(kind: str, uri: str, planner: str, root: str) -> None:
    """One measurement in this fresh process: prints a JSON line."""
    from pipeline.config import ExtractConfig, load_config

    source = ["source.kind=manifest", f"source.uri={uri}", "source.options={fingerprint_column: fp}"] \
        if kind == "manifest" else ["source.kind=webdataset", f"source.uri={uri}"]
    cfg = load_config(ExtractConfig, None, [*source, f"store.root={root}", *ENCODER])
    t0 = time.perf_counter()
    if planner == "units":
        from pipeline.extract.sync import dry_run

        result = dry_run(cfg)
        count = result.images if not result.unknown_units else result.units
    else:
        from pipeline.extract.plan import build_source

        count = len(build_source(cfg.source).list_images())
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "count": count, "torch": "torch" in sys.modules}))


def measure(kind: str, uri: str, planner: str, root: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, uri, planner, root], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=3600)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--tars", type=int, default=1000)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _machine import machine_header

    from pipeline.sources import SOURCE_KINDS
    from pipeline.sources.demo import write_shapes

    print(machine_header("bench_plan"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_shapes(tmp / "img", n=8, size=32, seed=0)
        images = sorted((tmp / "img" / "images").glob("*.png"))
        env = {**os.environ, "STRATA_CACHE_DIR": str(tmp / "cache")}
        cases = []
        for rows in args.rows:
            path = tmp / f"m{rows}.csv"
            _manifest(path, rows, images)
            cases.append(("manifest", f"{rows} rows", str(path)))
        if "webdataset" in SOURCE_KINDS and args.tars:
            _tars(tmp / "tars", args.tars, images[0].read_bytes())
            cases.append(("webdataset", f"{args.tars} tars", str(tmp / "tars")))
        measure(*cases[0][::2], "units", str(tmp / "stores"), env)  # caches the encoder card: no torch below
        rows_out = []
        for kind, label, uri in cases:
            for planner in ("units", "records"):
                r = measure(kind, uri, planner, str(tmp / "stores"), env)
                rows_out.append((kind, label, planner, r))
                print(f"  done: {label} {planner}", flush=True)
    print()
    print(f"{'input':<16} {'planner':<30} {'seconds':>9} {'peak RSS MB':>12} {'images/units':>13}")
    names = {"units": "strata: work units (dry run)", "records": "before: one record per image"}
    for kind, label, planner, r in rows_out:
        if "error" in r:
            print(f"{label:<16} {names[planner]:<30} error: {r['error']}")
            continue
        print(f"{label:<16} {names[planner]:<30} {r['seconds']:>9.2f} {r['rss_mb']:>12.0f} {r['count']:>13}"
              f"{'  (torch imported)' if r['torch'] else ''}")
    print()
    for planner in ("units", "records"):
        manifest = [(lab, r) for k, lab, p, r in rows_out if k == "manifest" and p == planner and "error" not in r]
        if len(manifest) >= 2:
            (small_label, small), (big_label, big) = manifest[0], manifest[-1]
            print(f"{names[planner]}: peak RSS {big_label} / {small_label} = {big['rss_mb'] / small['rss_mb']:.2f}x "
                  f"(target <= 1.5 for strata); seconds {big['seconds']:.1f} (target < 30 at 10^6 rows)")


if __name__ == "__main__":
    main()
