"""The GPU check: strata's `gpu` tests, model throughput, the box's decode rate and strata end to end, in one table.

Sections (each against the time left of `--budget` seconds; a section that would not fit is shrunk or skipped,
and says so):
  tests        pytest -m gpu tests/test_encoders_gpu.py (they skip without CUDA)
  throughput   images/s at 224 px, batch 256, bf16 on CUDA: the bare `model(x)` on normalised tensors already on
               the device, the same `torch.compile`d, and strata's FrozenEncoder with 4 taps pooled, fed uint8
               batches from host memory (pinned upload, prefetch, normalisation on the device included);
               efficientnet_lite0 (bundled weights) and resnet50 (random weights: throughput only)
  decode       the box's CPU decode + preprocess rate, all cores, on 500-800 px JPEG photos: exact and fast
  end to end   `run_extract` on synthetic JPEGs (efficientnet_lite0, 4 layers, bf16 on CUDA), decode exact and fast,
               with the encoder actor's busy share: below ~70 % the pipeline waits on decoding

    benchmarks/gpu_check.sh            # on a CUDA machine: under 8 minutes
    benchmarks/gpu_check.sh --cpu      # anywhere: scaled-down sizes, fp32, a few minutes
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "benchmarks")]

from _machine import machine_header  # noqa: E402
from _trace import read_trace, traced_stages  # noqa: E402

ROWS: list[tuple[str, str, str, str]] = []  # section, what, value, note
NOTES: list[str] = []


def row(section: str, what: str, value: str, note: str = "") -> None:
    ROWS.append((section, what, value, note))
    print(f"  {section:<11} {what:<44} {value:>14}  {note}", flush=True)


class Clock:
    def __init__(self, budget: float) -> None:
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()


# -- tests ---------------------------------------------------------------------------------------------------
def run_tests(clock: Clock, py: str) -> None:
    xml = Path(tempfile.mkdtemp()) / "gpu.xml"
    t = time.perf_counter()
    limit = max(60, int(min(300, clock.left() - 200)))
    try:
        proc = subprocess.run([py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_encoders_gpu.py", "-p",
                               "no:cacheprovider", f"--junitxml={xml}", "-o", "log_level=WARNING"],
                              cwd=REPO, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        row("tests", "pytest -m gpu", "timed out", f"after {limit} s")
        return
    seconds = time.perf_counter() - t
    if not xml.exists():
        row("tests", "pytest -m gpu", "did not run", proc.stdout[-300:].replace("\n", " | "))
        return
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    row("tests", "pytest -m gpu tests/test_encoders_gpu.py",
        f"{n - failed - skipped}/{n} passed", f"{failed} failed, {skipped} skipped, {seconds:.0f} s")
    skips = set()
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            NOTES.append(f"FAILED {case.get('name')}: {(bad.get('message') or '')[:300]}")
            print(f"  {NOTES[-1]}", flush=True)  # here too: a later crash must not lose which test failed
        if case.find("skipped") is not None:
            skips.add(case.find("skipped").get("message") or "")
    NOTES.extend(f"skipped: {m}" for m in sorted(skips))


# -- throughput ----------------------------------------------------------------------------------------------
MODELS = {"efficientnet_lite0": ("imagenet", ("blocks.2", "blocks.4", "blocks.6", "bn2")),
          "resnet50": ("random:0", ("layer1", "layer2", "layer3", "layer4"))}


def _rate(fn, n_images: int, sync, repeats: int = 2) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return n_images / best


def run_throughput(clock: Clock, *, cuda: bool, batch: int, batches: int, dtype: str) -> None:
    import torch

    g = torch.Generator().manual_seed(0)
    host = [torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, generator=g).numpy()
            for _ in range(min(batches, 4))]
    feed = [host[i % len(host)] for i in range(batches)]
    for name, (weights, layers) in MODELS.items():
        if clock.left() < 60:
            row("throughput", name, "skipped", "out of time")
            continue
        _throughput_one(clock, name, weights, layers, feed, cuda=cuda, dtype=dtype)
        if cuda:
            torch.cuda.empty_cache()


def _throughput_one(clock: Clock, name: str, weights: str, layers, feed: list, *, cuda: bool, dtype: str) -> None:
    import torch

    from pipeline.config import EncoderSpec
    from pipeline.encoders import build_encoder

    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batch, batches = len(feed[0]), len(feed)
    n = batch * batches
    enc = build_encoder(EncoderSpec(name=name, weights=weights, layers=layers, compute_dtype=dtype,
                                    batch_size=batch), device=device)
    x = enc.preprocessing.normalize(torch.from_numpy(feed[0]).to(device)).contiguous(memory_format=enc.memory_format)

    def bare(model=enc.model):
        with torch.inference_mode(), enc._autocast():
            for _ in range(batches):
                model(x)

    bare_rate = _rate(bare, n, sync)
    row("throughput", f"{name}: bare model(x)", f"{bare_rate:,.0f} img/s", f"{dtype}, batch {batch}, {device}")
    if clock.left() > 150:
        t = time.perf_counter()
        compiled = torch.compile(enc.model)
        bare(compiled)  # compiles
        sync()
        row("throughput", f"{name}: torch.compile(model)(x)", f"{_rate(lambda: bare(compiled), n, sync):,.0f} img/s",
            f"compile {time.perf_counter() - t:.0f} s")
    else:
        row("throughput", f"{name}: torch.compile(model)(x)", "skipped", "out of time")
    strata = _rate(lambda: list(enc.encode_batches(iter(feed))), n, sync)
    row("throughput", f"{name}: strata, {len(layers)} taps pooled", f"{strata:,.0f} img/s",
        f"{strata / bare_rate:.2f}x bare; uint8 from host, normalised on the device")
    # Blocks reach the actor with sizes that vary (units' remainders): each batch here has a size not seen
    # before, run once, as in an extraction; unpadded, then padded to the encoder's shape multiple (the
    # default). Unpadded far below padded: per-shape set-up (cuDNN plans) is what padding saves.
    default = enc.shape_multiple
    for multiple, offset in ((1, 1), (default, 1 + batches)):
        enc.shape_multiple = multiple
        sizes = [batch - offset - k for k in range(batches)]
        ragged = [feed[k][:m] for k, m in enumerate(sizes)]
        t = time.perf_counter()
        list(enc.encode_batches(iter(ragged)))
        sync()
        seconds = time.perf_counter() - t
        row("throughput", f"{name}: strata, new batch sizes, padded to x{multiple}",
            f"{sum(sizes) / seconds:,.0f} img/s",
            f"{batches} batches of {sizes[-1]}-{sizes[0]} images, each size run once (no warm-up)")
    enc.shape_multiple = default


# -- decode --------------------------------------------------------------------------------------------------
def _init_decoder() -> None:
    import importlib

    import torch

    torch.set_num_threads(1)
    importlib.import_module("pipeline.encoders.fast_decode")  # its imports happen before the clock

def _decode_chunk(args) -> int:
    mode, blobs = args
    from pipeline.encoders.fast_decode import decode_fast
    from pipeline.encoders.preprocess import Preprocessing
    from pipeline.images import decode_rgb

    pre = Preprocessing(256, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)  # efficientnet_lite0's resize and crop
    for b in blobs:
        if mode == "fast":
            decode_fast(b, pre, max_pixels=10**9)
        else:
            pre.to_uint8(decode_rgb(b))
    return len(blobs)


def run_decode(clock: Clock, *, images: int) -> dict[str, float]:
    from photos import photo_jpegs

    cores = os.cpu_count() or 1
    blobs = photo_jpegs(images, seed=0)
    chunks = [blobs[i::cores * 4] for i in range(cores * 4)]
    rates = {}
    with ProcessPoolExecutor(cores, initializer=_init_decoder) as pool:
        list(pool.map(_decode_chunk, [("exact", blobs[:cores])] * cores))  # workers up and warm
        for mode in ("exact", "fast"):
            t = time.perf_counter()
            done = sum(pool.map(_decode_chunk, [(mode, c) for c in chunks]))
            rates[mode] = done / (time.perf_counter() - t)
            row("decode", f"CPU decode+preprocess, {mode}, {cores} cores", f"{rates[mode]:,.0f} img/s",
                f"{rates[mode] / cores:.0f}/core; {len(blobs)} photos 500-800 px")
    return rates


# -- end to end ----------------------------------------------------------------------------------------------
def _write_jpegs(args) -> int:
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    folder, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        w, h = int(rng.integers(320, 640)), int(rng.integers(320, 640))
        base = rng.integers(0, 255, 3)
        ramp = np.linspace(0, 1, w)[None, :, None] * rng.integers(-120, 120, 3)
        pixels = np.clip(base + ramp + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            draw.ellipse((x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))),
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=88)
        label = folder / f"c{i % 10}"
        label.mkdir(exist_ok=True)
        (label / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    return stop - start


def run_end_to_end(clock: Clock, *, images: int, cuda: bool, batch: int, dtype: str, shard_rows: int,
                   decode_rate: float | None) -> None:
    import ray

    from pipeline.config import ExtractConfig, load_config
    from pipeline.extract import run as run_mod
    from pipeline.extract import run_extract

    if decode_rate:  # "or fewer if the time is short": what the decode rate allows in half the time left
        affordable = int(decode_rate * max(30.0, clock.left() - 60) / 3)
        if affordable < images:
            row("end to end", "images", f"{affordable:,}", f"of {images:,} asked: the time left allows no more")
            images = max(affordable, shard_rows)
    work = Path(tempfile.mkdtemp(prefix="strata-gpu-check-"))
    folder = work / "jpegs"
    folder.mkdir()
    cores = os.cpu_count() or 1
    step = max(1, images // (cores * 4))
    t = time.perf_counter()
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(_write_jpegs, [(folder, s, min(images, s + step)) for s in range(0, images, step)]))
    row("end to end", "synthetic JPEGs written", f"{images:,}", f"320-640 px, {time.perf_counter() - t:.0f} s")
    trace = work / "trace.jsonl"
    saved = run_mod.expand_unit, run_mod.EncodeShard
    run_mod.expand_unit, run_mod.EncodeShard = traced_stages(str(trace))
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for decode in ("exact", "fast"):
            if clock.left() < 45:
                row("end to end", f"run_extract, decode {decode}", "skipped", "out of time")
                continue
            trace.unlink(missing_ok=True)
            cfg = load_config(ExtractConfig, None, [
                "source.kind=folder", f"source.uri={folder}", f"store.root={work / 'stores'}",
                "encoder.name=efficientnet_lite0", "encoder.layers=[blocks.2,blocks.4,blocks.6,bn2]",
                f"encoder.compute_dtype={dtype}", f"encoder.batch_size={batch}",
                f"store.shard_rows={shard_rows}", f"store.chunk_rows={min(256, shard_rows)}",
                "run.local_max_images=0", f"run.decode={decode}"])
            t = time.perf_counter()
            try:
                summary = run_extract(cfg)
            except Exception as e:  # noqa: BLE001 - one mode failing must not lose the other's row and the table
                _failed("end to end", f"run_extract, decode {decode}", e)
                continue
            seconds = time.perf_counter() - t
            events = read_trace(str(trace))
            enc = [e for e in events if e["ev"] == "encode"]
            dec = [e for e in events if e["ev"] == "decode"]
            busy = sum(e["t1"] - e["t0"] for e in enc)
            span = (max(e["t1"] for e in enc) - min(e["t0"] for e in enc)) if enc else 0.0
            dec_rate = sum(e["n"] for e in dec) / max(1e-9, sum(e["t1"] - e["t0"] for e in dec))
            share = busy / span if span else 0.0
            row("end to end", f"run_extract, decode {decode}", f"{summary.encoded / seconds:,.0f} img/s",
                f"{summary.encoded:,} images in {seconds:.0f} s; once running {summary.encoded / span if span else 0:,.0f} "
                f"img/s; encoder busy {share:.0%}, {summary.encoded / busy if busy else 0:,.0f} img/s while busy; "
                f"decode {dec_rate:,.0f} img/s per task -> {'decode' if share < 0.7 else 'encoder'}-bound")
    finally:
        run_mod.expand_unit, run_mod.EncodeShard = saved
        ray.shutdown()


def _failed(section: str, what: str, e: BaseException) -> None:
    """A FAILED row and note for what raised e; its traceback on stderr."""
    traceback.print_exc()
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    first = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]
    row(section, what, "FAILED", first)
    NOTES.append(f"FAILED {what}: {first}")


def _section(name: str, fn, *args, **kwargs):
    """Run one section; an exception becomes a FAILED row and a note, and the next sections still run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        _failed(name, f"section {name}", e)
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="scaled-down sizes on the CPU, fp32")
    ap.add_argument("--budget", type=float, default=None, help="seconds for everything (default 450; --cpu 900)")
    ap.add_argument("--images", type=int, default=None, help="end-to-end JPEGs (default 20000; --cpu 256)")
    ap.add_argument("--skip", nargs="*", default=(), choices=("tests", "throughput", "decode", "e2e"))
    args = ap.parse_args()

    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("no CUDA device here: use --cpu for the scaled-down check", file=sys.stderr)
        return 2
    clock = Clock(args.budget or (900 if args.cpu else 450))
    dtype = "bf16" if cuda else "fp32"
    batch, batches = (256, 12) if cuda else (16, 2)
    print(machine_header("gpu_check" + (" --cpu" if args.cpu else "")))
    if cuda:
        print(f"# {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)")
    print("progress:")
    if "tests" not in args.skip:
        _section("tests", run_tests, clock, sys.executable)
    if "throughput" not in args.skip:
        _section("throughput", run_throughput, clock, cuda=cuda, batch=batch, batches=batches, dtype=dtype)
    rates = {}
    if "decode" not in args.skip:
        rates = _section("decode", run_decode, clock, images=800 if cuda else 48) or {}
    if "e2e" not in args.skip:
        _section("end to end", run_end_to_end, clock, images=args.images or (20000 if cuda else 256), cuda=cuda,
                 batch=batch if cuda else 32, dtype=dtype, shard_rows=1024 if cuda else 64,
                 decode_rate=rates.get("exact"))

    print()
    print(machine_header("gpu_check" + (" --cpu" if args.cpu else "")))
    width = max(len(r[1]) for r in ROWS) if ROWS else 10
    print(f"{'section':<11} {'what':<{width}} {'result':>14}  notes")
    for section, what, value, note in ROWS:
        print(f"{section:<11} {what:<{width}} {value:>14}  {note}")
    for note in NOTES:
        print(f"  {note}")
    return 1 if any(n.startswith("FAILED") for n in NOTES) else 0


if __name__ == "__main__":
    sys.exit(main())
