"""Driver phases of one extraction job, shared by the extraction and refresh benchmarks.

`instrumented` wraps the pipeline's own functions (they run unchanged) so that each call adds its seconds to a
phase; everything is put back on exit. `sync.py`, `stores/job.py` and `run.py` look these names up in their
module at call time, so replacing the module attributes (and a few methods of the store classes) is enough.
`phase_sum` writes a run's seconds as the sum of its phases.
"""
from __future__ import annotations

import contextlib
import time

from _trace import traced_stages

PHASES = (  # (key, label) in the order a job goes through them
    ("validate", "validate"),
    ("listing", "listing"),
    ("encoder_build", "driver encoder card or build"),  # in a thread, overlapped with the listing
    ("fingerprint", "dataset fingerprint"),
    ("store_prepare", "store prepare"),
    ("plan_units", "plan units (latest version, unit diff, block reservation)"),
    ("driver_unit_plans", "unit plans in the driver (small jobs)"),
    ("ray_data", "Ray Data execution"),
    ("local_encode", "local encode"),
    ("verify", "verify blocks"),
    ("commit", "commit"),
)
OVERLAPPED = ("listing", "encoder_build")  # they run at the same time: a run spends the longer of the two
LABELS = dict(PHASES)


@contextlib.contextmanager
def instrumented(timings: dict, counts: dict | None = None, trace_path: str | None = None):
    """Time the driver phases of sync_store (run_extract, run_refresh) into `timings` (seconds per key);
    `counts` gets the list of per-call seconds; `timings["ray_data_start_wall"]` is the wall clock at which
    the first Ray Data execution started, `timings["local_encoder_build"]` the part of a local encode spent
    building the encoder (the driver held only its card). With `trace_path`, the per-shard decode/encode
    events too."""
    from pipeline.extract import run as run_mod
    from pipeline.extract import sync as sync_mod
    from pipeline.stores import FeatureStoreWriter
    from pipeline.stores import job as job_mod

    counts = {} if counts is None else counts
    saved: list[tuple[object, str, object]] = []

    def patch(owner, name, new):
        saved.append((owner, name, owner.__dict__[name]))  # the descriptor itself: classmethods stay so
        setattr(owner, name, new)

    def timed(key, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t
                timings[key] = timings.get(key, 0.0) + dt
                counts.setdefault(key, []).append(dt)
        return wrapper

    def module_fn(mod, name, key):
        patch(mod, name, timed(key, getattr(mod, name)))

    module_fn(sync_mod, "validate_extract", "validate")
    module_fn(sync_mod, "prepare_encoder", "encoder_build")
    module_fn(sync_mod, "list_units", "listing")
    module_fn(sync_mod, "dataset_fingerprint", "fingerprint")
    patch(FeatureStoreWriter, "prepare", timed("store_prepare", FeatureStoreWriter.prepare))
    module_fn(sync_mod, "plan_job", "plan_units")
    module_fn(run_mod, "_plan_in_driver", "driver_unit_plans")
    orig_pipeline = run_mod._run_pipeline

    def run_pipeline(*a, **kw):
        timings.setdefault("ray_data_start_wall", time.time())
        return orig_pipeline(*a, **kw)

    patch(run_mod, "_run_pipeline", timed("ray_data", run_pipeline))
    local = timed("local_encode", run_mod._run_local)

    def run_local(*a, **kw):
        timings["local_encode_open"] = True  # a driver encoder built now is part of the local encode
        try:
            return local(*a, **kw)
        finally:
            del timings["local_encode_open"]

    patch(run_mod, "_run_local", run_local)
    build = timed("local_encoder_build", run_mod.build_driver_encoder)
    orig_build = run_mod.build_driver_encoder
    patch(run_mod, "build_driver_encoder",
          lambda *a, **kw: (build if "local_encode_open" in timings else orig_build)(*a, **kw))
    module_fn(run_mod, "_verify", "verify")
    module_fn(job_mod, "commit_change", "commit")
    if trace_path:
        expand_unit, EncodeShard = traced_stages(trace_path)
        patch(run_mod, "expand_unit", expand_unit)
        patch(run_mod, "EncodeShard", EncodeShard)
    try:
        yield
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


def known_seconds(timings: dict) -> float:
    """Seconds the phases account for: the overlapped ones count once, as the longer of them."""
    serial = sum(timings.get(k, 0.0) for k, _ in PHASES if k not in OVERLAPPED)
    return serial + max(timings.get(k, 0.0) for k in OVERLAPPED)


def _calls(seconds: list[float]) -> str:
    if len(seconds) > 3:
        return f" ({len(seconds)} calls)"
    return f" ({'+'.join(f'{x:.2f}' for x in seconds)})" if len(seconds) > 1 else ""


def phase_sum(timings: dict, counts: dict, total: float, *, digits: int = 2,
              share_of: str | None = None) -> str:
    """'validate a + max(listing b, driver encoder c; overlapped) + store prepare d + ... + other e': the phases
    a run went through (one it never entered is left out; one called several times shows its calls) and the
    rest (target, chunking, bookkeeping, summary).
    With `share_of` ("run_extract"), the Ray Data execution also shows its share of `total`."""
    t, f = timings, f".{digits}f"
    parts = []
    for key, label in PHASES:
        if key in OVERLAPPED:
            if key != OVERLAPPED[0]:
                continue  # the group goes where its first phase does
            present = [k for k in OVERLAPPED if k in t]
            inner = ", ".join(f"{LABELS[k]} {t[k]:{f}}{_calls(counts.get(k, []))}" for k in present)
            if present:
                parts.append(f"max({inner}; overlapped)" if len(present) > 1 else inner)
        elif key in t:
            share = f" ({t[key] / total:.0%} of {share_of})" if share_of and key == "ray_data" and total else ""
            if key == "local_encode" and "local_encoder_build" in t:
                share = f" (of which building the encoder in the driver {t['local_encoder_build']:{f}})"
            parts.append(f"{label} {t[key]:{f}}{_calls(counts.get(key, []))}{share}")
    parts.append(f"other {total - known_seconds(t):{f}}")
    return " + ".join(parts)
