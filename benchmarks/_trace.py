"""Per-shard timing of the extraction stages, shared by the extraction and refresh benchmarks.

`traced_stages` wraps the pipeline's own decode function and encoder actor class (they run unchanged)
so that each appends a JSON line per shard to a trace file, from whichever process runs it;
`stage_lines` turns those events into the "where the time goes" lines.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _append(path: str, event: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(event) + "\n")


def traced_stages(trace_path: str):
    """(expand_unit, EncodeShard) that behave as pipeline.extract's and record their timings: one decode
    event per source unit (its blocks' images), one encode event per block."""
    from pipeline.extract import stages, unit_stage

    orig_expand, base = unit_stage.expand_unit, stages.EncodeShard

    def expand_unit(item, **kw):  # a generator, like the pipeline's: counting must not consume its rows
        t, n = time.time(), 0
        for r in orig_expand(item, **kw):
            n += len(r["ok"])
            yield r
        _append(trace_path, {"ev": "decode", "shard": json.loads(item["unit"])["unit_id"], "t0": t,
                             "t1": time.time(), "pid": os.getpid(), "n": int(n)})

    class EncodeShard(base):
        def __init__(self, **kw):
            t = time.time()
            import torch  # noqa: F401 - what base.__init__ imports first, timed on its own
            t_import = time.time()
            base.__init__(self, **kw)
            _append(trace_path, {"ev": "actor_init", "t0": t, "t_import": t_import, "t1": time.time(),
                                 "pid": os.getpid()})

        def __call__(self, row):
            t = time.time()
            out = base.__call__(self, row)
            _append(trace_path, {"ev": "encode", "shard": int(row["shard_id"]), "t0": t, "t1": time.time(),
                                 "pid": os.getpid(), "n": int(len(row["ok"]))})
            return out

    return expand_unit, EncodeShard


def read_trace(path: str | None) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _busy(events: list[dict]) -> tuple[float, int]:
    """(seconds spent in these per-shard events, images they handled)."""
    return sum(e["t1"] - e["t0"] for e in events), sum(e["n"] for e in events)


def stage_lines(events: list[dict], start: float, execution: float) -> list[str]:
    """Actor start-up, decode and encode, as offsets from `start` (wall clock of the Ray Data execution)."""
    rel = lambda x: x - start  # noqa: E731
    dec = sorted((e for e in events if e["ev"] == "decode"), key=lambda e: e["t1"])
    enc = sorted((e for e in events if e["ev"] == "encode"), key=lambda e: e["t1"])
    init = [e for e in events if e["ev"] == "actor_init"]
    lines = []
    if init:
        a = init[0]
        lines.append(f"encoder actor __init__ +{rel(a['t0']):.1f}..+{rel(a['t1']):.1f} s (process start and imports "
                     f"before it: {rel(a['t0']):.1f} s; import torch {a['t_import'] - a['t0']:.1f} s, build "
                     f"{a['t1'] - a['t_import']:.1f} s)")
    if dec:
        busy, n_dec = _busy(dec)
        lines.append(f"decode: {len(dec)} unit(s), first done +{rel(dec[0]['t1']):.1f} s, last "
                     f"+{rel(dec[-1]['t1']):.1f} s, {busy:.1f} task-s for {n_dec} images "
                     f"({n_dec / busy if busy else 0:.0f} img/s per task)")
    if enc:
        busy, n_enc = _busy(enc)
        lines.append(f"encode: first shard starts +{rel(enc[0]['t0']):.1f} s, ends +{rel(enc[0]['t1']):.1f} s, last "
                     f"ends +{rel(enc[-1]['t1']):.1f} s; actor busy {busy:.1f} s = "
                     f"{busy / execution if execution else 0:.0%} of the execution, "
                     f"{n_enc / busy if busy else 0:.1f} img/s while busy; execution ends +{execution:.1f} s")
    return lines
