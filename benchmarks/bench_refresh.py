"""Incremental refresh vs full extraction: what does re-encoding 1% of a dataset cost?

Same images (procedural shapes from `write_shapes(..., size=64, seed=0)`, upsampled by the encoder's own
preprocessing), same encoder (efficientnet_lite0, bundled pretrained weights, native 224 px preprocessing,
fp32 compute), same 4 layers (blocks.2, blocks.4, blocks.6, bn2; global average pooled), float16 features,
local store (shard_rows=256, chunk_rows=64), all in ONE process with ONE local Ray started up front and
kept for the three runs, so that the comparison is about the work, not about Ray start-up:

  full      `run_refresh(cfg)` on an empty store root: a full extraction of the N images (version 1).
  refresh   overwrite ~0.5% of the images with other rendered images (a `write_shapes(..., seed=1)` set) and
            add ~0.5% new files (1% in all), then `run_refresh(cfg)`: only those are encoded (version 2).
            Checked: the summary's added/changed/deleted/unchanged counts, that only added + changed were
            encoded, that version 2 has N + added rows with unique ids, that a kept image's features are
            bit-identical to version 1 and a changed image's are not.
  no-op     `run_refresh(cfg)` again with nothing changed: no encoding, no new version.

Heavy imports (torch, the encoder registry, Ray Data) are done before the clock starts; `ray.init` is
timed on its own. Each run is split into driver phases (_phases.py: the driver's encoder card or build for
provenance, overlapped with the listing; dataset fingerprint, store prepare, finding the latest version,
reading its index, the diff, block allocation, growing the arrays, the resume check's shard records, Ray Data
execution, block verification, commit, other) by wrapping the pipeline's functions -- they run unchanged --
and, with --trace (default), the encoder actor's start-up and per-shard decode/encode times.

    .venv/bin/python benchmarks/bench_refresh.py            # N=3000 (a few minutes on 2 cores)
    .venv/bin/python benchmarks/bench_refresh.py --quick    # N=600
    .venv/bin/python benchmarks/bench_refresh.py --n 10000 --json out/bench_refresh.json

Target: refresh/full <= 0.05 (seconds of a 1% refresh over seconds of the full extraction).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine_header  # benchmarks/ is on sys.path when run as a script
from _phases import instrumented, phase_sum
from _trace import read_trace, stage_lines

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ENCODER = "efficientnet_lite0"
LAYERS = ("blocks.2", "blocks.4", "blocks.6", "bn2")
IMAGE_SIZE = 64  # source PNGs; the encoder's preprocessing resizes them to its native 224 px
SHARD_ROWS = 256
CHUNK_ROWS = 64
TARGET_REFRESH_VS_FULL = 0.05


# ----------------------------------------------------------------------------------------------------------
# the three runs
# ----------------------------------------------------------------------------------------------------------

def timed_refresh(label: str, cfg, workdir: Path, trace: bool) -> dict:
    from pipeline.extract.refresh import run_refresh

    timings: dict = {}
    counts: dict = {}
    trace_path = str(workdir / f"trace-{label}.jsonl") if trace else None
    with instrumented(timings, counts, trace_path):
        t = time.perf_counter()
        summary = run_refresh(cfg)
        seconds = time.perf_counter() - t
    events = read_trace(trace_path)
    encoded = summary.extract.encoded if summary.extract is not None else 0
    return {"variant": label, "summary": summary, "seconds": seconds, "encoded": encoded,
            "timings": timings, "counts": counts, "trace": events}


def change_images(images: Path, spare: Path, n_images: int, n_change: int, n_add: int) -> tuple[list, list]:
    """Overwrite `n_change` images spread over the listing (so over several shards) and add `n_add` new ones."""
    spare_files = sorted(spare.glob("*.png"))
    assert len(spare_files) >= n_change + n_add
    step = max(1, n_images // max(1, n_change))
    changed = []
    for k in range(n_change):
        dst = images / f"{(k * step + step // 2) % n_images:05d}.png"
        src = spare_files[k]
        if src.read_bytes() == dst.read_bytes():
            raise RuntimeError(f"{src} has the same bytes as {dst}: not a change")
        shutil.copyfile(src, dst)  # new bytes and a new mtime: a new fingerprint
        changed.append(dst.name)
    added = []
    for k in range(n_add):
        dst = images / f"new-{k:05d}.png"
        shutil.copyfile(spare_files[n_change + k], dst)
        added.append(dst.name)
    return changed, added


def check_full(r: dict, n: int) -> list[str]:
    s = r["summary"]
    problems = []
    if s.version != 1:
        problems.append(f"full: version {s.version}, expected 1")
    if s.added != n or s.extract is None or s.extract.images != n or s.extract.encoded != n:
        problems.append(f"full: added {s.added}, extract {s.extract}; expected {n} images encoded")
    elif s.extract.errors:
        problems.append(f"full: {s.extract.errors} decode/encode errors")
    return problems


def check_refresh(r: dict, first: dict, n: int, changed: list[str], added: list[str], before: dict) -> list[str]:
    import numpy as np

    from pipeline.stores import FeatureStore

    s = r["summary"]
    problems = []
    want = (len(added), len(changed), 0, n - len(changed))
    got = (s.added, s.changed, s.deleted, s.unchanged)
    if got != want:
        problems.append(f"refresh: (added, changed, deleted, unchanged) = {got}, expected {want}")
    if s.version != 2:
        problems.append(f"refresh: version {s.version}, expected 2")
    n_todo = len(added) + len(changed)
    if s.extract is None or s.extract.images != n_todo or s.extract.encoded != n_todo:
        problems.append(f"refresh: extract {s.extract}; expected exactly {n_todo} images encoded")
    store = FeatureStore(first["summary"].store_uri)
    ids = list(store.index_table().column("image_id").to_pylist())
    if store.version != 2 or len(ids) != n + len(added) or len(set(ids)) != len(ids):
        problems.append(f"refresh: version {store.version} has {len(ids)} rows ({len(set(ids))} unique), "
                        f"expected {n + len(added)}")
    if not set(added) <= set(ids):
        problems.append(f"refresh: added images missing from version 2: {sorted(set(added) - set(ids))[:5]}")
    layer = LAYERS[-1]
    keep = [i for i in before if i not in changed]
    got_keep = store.get(keep, layer)
    if not np.array_equal(got_keep, np.stack([before[i] for i in keep])):
        problems.append("refresh: an unchanged image's features differ from version 1 (re-encoded?)")
    got_changed = store.get(changed, layer)
    same = [i for i, a in zip(changed, got_changed) if np.allclose(a, before[i])]
    if same:
        problems.append(f"refresh: changed images still have their version-1 features: {same[:5]}")
    return problems


def check_noop(r: dict) -> list[str]:
    from pipeline.stores import FeatureStore

    s = r["summary"]
    problems = []
    if not s.nothing_changed or s.version != 2 or r["encoded"]:
        problems.append(f"no-op: {s}; expected nothing changed at version 2")
    versions = FeatureStore(s.store_uri).versions()
    if versions != [1, 2]:
        problems.append(f"no-op: versions {versions}, expected [1, 2]")
    return problems


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------


def _flag(ok: bool) -> str:
    return "ok" if ok else "MISS"


def breakdown(r: dict) -> list[str]:
    t, c, total = r["timings"], r["counts"], r["seconds"]
    lines = [f"  {r['variant']:<8} {total:6.2f} s = {phase_sum(t, c, total, digits=3)}"]
    start = t.get("ray_data_start_wall")
    events = r.get("trace") or []
    if not start or not events:
        return lines
    sub = stage_lines(events, start, t.get("ray_data", 0.0))
    return lines + [f"      {p}" for p in sub]


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="images (default 3000; --quick 600)")
    ap.add_argument("--quick", action="store_true", help="N=600")
    ap.add_argument("--change", type=float, default=0.01,
                    help="fraction of N to touch in the refresh: half overwritten, half added (default 0.01)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--override", action="append", default=[], help="extra config override (key=value)")
    ap.add_argument("--trace", dest="trace", action="store_true", default=True,
                    help="record the encoder actor's start-up and per-shard decode/encode times (default)")
    ap.add_argument("--no-trace", dest="trace", action="store_false", help="no wrappers inside Ray tasks/actors")
    ap.add_argument("--progress", action="store_true", help="keep Ray Data's progress bars")
    ap.add_argument("-v", "--verbose", action="store_true", help="pipeline INFO logs")
    ap.add_argument("--workdir", default=None, help="where data and the store go (default: a temp dir, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the temp workdir")
    ap.add_argument("--json", default=None, help="also write every number to this JSON file")
    args = ap.parse_args()
    if args.n is None:
        args.n = 600 if args.quick else 3000
    n = args.n
    n_touch = max(2, round(args.change * n))
    n_change = n_touch - n_touch // 2
    n_add = n_touch // 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.pop("RAY_ADDRESS", None)  # never attach to someone else's cluster

    t = time.perf_counter()
    import ray
    import ray.data
    import torch  # noqa: F401 - imported before the clock, as a long-lived refresh service would have it

    import pipeline.encoders  # noqa: F401
    from pipeline.config import ExtractConfig, load_config
    from pipeline.sources.demo import write_shapes
    from pipeline.stores import FeatureStore
    t_import = time.perf_counter() - t

    own_tmp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_refresh_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_header("bench_refresh"))
    print(f"# {ENCODER} (bundled pretrained) fp32, layers {','.join(LAYERS)} avg-pooled, float16 features, "
          f"native 224 px preprocessing of {IMAGE_SIZE} px PNGs; batch {args.batch_size}; store shard_rows="
          f"{SHARD_ROWS} chunk_rows={CHUNK_ROWS}, local disk; N={n}; refresh touches {n_touch} "
          f"({n_change} overwritten + {n_add} added); workdir {workdir}", flush=True)
    results: dict[str, dict] = {}
    problems: list[str] = []
    try:
        data, spare = workdir / "data", workdir / "spare"
        for d in (data, spare):
            if d.exists():
                shutil.rmtree(d)
        t = time.perf_counter()
        write_shapes(data, n=n, size=IMAGE_SIZE, seed=0)
        write_shapes(spare, n=n_touch, size=IMAGE_SIZE, seed=1)  # other renders, for changed and added files
        print(f"# generated {n} + {n_touch} images in {time.perf_counter() - t:.1f} s; imports before the "
              f"clock {t_import:.1f} s", flush=True)
        images = data / "images"
        store_root = workdir / "stores"
        if store_root.exists():
            shutil.rmtree(store_root)
        cfg = load_config(ExtractConfig, None, [
            "source.kind=folder", f"source.uri={images}", f"store.root={store_root}", "store.dtype=float16",
            f"store.shard_rows={SHARD_ROWS}", f"store.chunk_rows={CHUNK_ROWS}",
            f"encoder.name={ENCODER}", f"encoder.layers=[{','.join(LAYERS)}]", "encoder.pooling=avg",
            "encoder.compute_dtype=fp32", f"encoder.batch_size={args.batch_size}", *args.override,
        ])

        t = time.perf_counter()
        # address="local": a fresh local Ray for this process, even where another cluster runs on the machine
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)
        ray_init = time.perf_counter() - t
        if not args.progress:
            ray.data.DataContext.get_current().enable_progress_bars = False
        if not args.verbose:
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset "Starting execution" lines
        print(f"# ray.init {ray_init:.1f} s (once, outside every timed run)", flush=True)
        try:
            # (a) full extraction into an empty store root
            full = results["full"] = timed_refresh("full", cfg, workdir, args.trace)
            problems += check_full(full, n)
            print(f"#   full     {full['seconds']:7.2f} s  {full['encoded']:>5} encoded  "
                  f"({full['encoded'] / full['seconds']:.1f} images/s)", flush=True)

            v1 = FeatureStore(full["summary"].store_uri)
            sample = sorted({f"{i:05d}.png" for i in (0, 1, n // 3, n // 2, n - 1)})
            changed, added = change_images(images, spare / "images", n, n_change, n_add)
            before = {i: x for i, x in zip([*sample, *changed], v1.get([*sample, *changed], LAYERS[-1]))}

            # (b) 1% touched: only those are encoded
            inc = results["refresh"] = timed_refresh("refresh", cfg, workdir, args.trace)
            problems += check_refresh(inc, full, n, changed, added, before)
            print(f"#   refresh  {inc['seconds']:7.2f} s  {inc['encoded']:>5} encoded  ({inc['summary']})",
                  flush=True)

            # (c) nothing changed
            noop = results["no-op"] = timed_refresh("no-op", cfg, workdir, args.trace)
            problems += check_noop(noop)
            print(f"#   no-op    {noop['seconds']:7.2f} s  {noop['encoded']:>5} encoded  ({noop['summary']})",
                  flush=True)
        finally:
            t = time.perf_counter()
            ray.shutdown()
            ray_shutdown = time.perf_counter() - t

        print()
        print(f"{'variant':<9} {'images encoded':>14} {'seconds':>8} {'/ full':>7}  notes")
        for name, r in results.items():
            s = r["summary"]
            note = {"full": f"run_refresh on an empty store: full extraction, version {s.version}",
                    "refresh": f"{s.added} added + {s.changed} changed of {n}, version {s.version}",
                    "no-op": f"nothing changed, stays at version {s.version}"}[name]
            print(f"{name:<9} {r['encoded']:>14} {r['seconds']:>8.2f} {r['seconds'] / full['seconds']:>7.3f}  {note}")
        print(f"(ray.init {ray_init:.1f} s and ray.shutdown {ray_shutdown:.1f} s, once, in none of the rows)")
        print()
        ratio = inc["seconds"] / full["seconds"]
        noop_ratio = noop["seconds"] / full["seconds"]
        ideal = inc["encoded"] / (full["encoded"] / full["seconds"])
        print(f"refresh/full = {ratio:.3f} (target <= {TARGET_REFRESH_VS_FULL}: "
              f"{_flag(ratio <= TARGET_REFRESH_VS_FULL)}); no-op/full = {noop_ratio:.3f}; "
              f"refresh if it cost only its share of the full run's time per image: {ideal:.2f} s "
              f"({inc['seconds'] - ideal:.1f} s fixed cost)")
        print("checks: " + ("all passed (counts, encoded only added+changed, "
                            f"{n + n_add} rows in version 2, kept features bit-identical, changed ones re-encoded, "
                            "no-op commits nothing)" if not problems else "FAILED"))
        for p in problems:
            print(f"  FAIL {p}")
        print("\nwhere the time goes (driver phases of run_refresh; Ray Data offsets from its start)")
        for r in results.values():
            for line in breakdown(r):
                print(line)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "header": machine_header("bench_refresh"), "args": vars(args), "n": n, "n_change": n_change, "n_add": n_add,
                "ray_init": ray_init, "ray_shutdown": ray_shutdown, "import": t_import, "problems": problems,
                "results": [{**{k: v for k, v in r.items() if k != "summary"}, "summary": str(r["summary"])}
                            for r in results.values()]}, indent=1, default=str))
            print(f"\nresults: {args.json}")
    finally:
        if own_tmp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"# kept {workdir}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
