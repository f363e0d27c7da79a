"""What bench_extract reads back from its runs: the features compared, steady throughput, strata's phases."""
from __future__ import annotations

from pathlib import Path

from _baselines import LAYERS
from _phases import phase_sum
from _trace import stage_lines


def check_same_features(tutorial: dict, strata: dict) -> dict:
    """The tutorial's and strata's bn2/blocks.2 features for the same images: they must be the same work."""
    import numpy as np

    from pipeline.stores import FeatureStore

    store = FeatureStore(strata["store_uri"])
    ids = [str(i) for i in np.load(Path(tutorial["outputs"]) / "image_ids.npy")]
    out = {}
    for layer in (LAYERS[0], LAYERS[-1]):
        ref = np.load(Path(tutorial["outputs"]) / f"{layer}.npy").astype(np.float32)
        got = store.get(ids, layer)
        out[layer] = float(np.max(np.abs(ref - got)) / (np.max(np.abs(ref)) + 1e-12))
    return out


def steady_ips(r: dict) -> float:
    """Images/s once the pipeline runs: from the end of the first encoded shard to the end of the last
    (start-up excluded: the encoder actor's imports and model build, the first shard's warm-up)."""
    shards = sorted((e for e in r.get("trace") or [] if e["ev"] == "encode"), key=lambda e: e["t1"])
    if len(shards) < 2:
        return float("nan")
    return sum(e["n"] for e in shards[1:]) / (shards[-1]["t1"] - shards[0]["t1"])


def strata_breakdown(r: dict) -> list[str]:
    t = r["timings"]
    total = r["seconds"]
    exe = t.get("ray_data", 0.0)
    lines = [
        f"  N={r['n']}: ray.init {r['ray_init']:.1f} s (outside run_extract) | run_extract {total:.1f} s = "
        f"{phase_sum(t, r.get('counts', {}), total, share_of='run_extract')} | "
        f"ray.shutdown {t.get('ray_shutdown', 0):.1f} s"
    ]
    start = t.get("ray_data_start_wall")
    events = r.get("trace") or []
    if not start or not events:
        return lines
    parts = stage_lines(events, start, exe)
    written = r.get("shard_record_times") or []
    if written:
        parts.append(f"shard records written: first +{written[0] - start:.1f} s, last +{written[-1] - start:.1f} s "
                     f"({len(written)} shards)")
    lines += [f"      {p}" for p in parts]
    return lines
