"""Commit and refresh cost as a feature set grows, on a real S3 server (SeaweedFS on 127.0.0.1).

For stores of 10, 100 and 1,000 shards (16 rows each, two small layers, synthetic features: this measures the
store protocol, not encoding), one refresh that adds one shard's worth of images is timed twice:

  commit    the publishing step alone (today: a compare-and-swap of one version document, rebase-ready;
            format 1: list every shard record, then create the next version);
  refresh   the whole store side of a refresh: read the latest version and its index, diff, allocate, write
            the new shard, verify it, commit.

Every S3 request is counted by type (GET, PUT, HEAD, LIST, DELETE) by wrapping s3fs's request method. The
baseline is strata's format-1 protocol (before immutable versions), run from its source at git commit
b7c7641 on the same server in the same run. The target: a commit's requests do not grow with the store.

    .venv/bin/python benchmarks/bench_commit.py                 # 10, 100, 1000 shards (a few minutes)
    .venv/bin/python benchmarks/bench_commit.py --sizes 10 100  # quicker
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import subprocess
import sys
import tempfile
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

BASELINE_COMMIT = "b7c7641"
SHARD_ROWS = 16
_COUNTS: collections.Counter = collections.Counter()
_KINDS = {"get_object": "GET", "put_object": "PUT", "head_object": "HEAD", "list_objects_v2": "LIST",
          "delete_object": "DELETE", "delete_objects": "DELETE", "copy_object": "PUT"}


def _count_requests() -> None:
    import s3fs

    original = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        name = getattr(method, "__name__", str(method))
        _COUNTS[_KINDS.get(name, name)] += 1
        return await original(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted


@contextlib.contextmanager
def measured(row: dict, key: str):
    """Seconds and S3 requests of the ``with`` body (nested measurements each see their own)."""
    before = collections.Counter(_COUNTS)
    t = time.perf_counter()
    yield
    row[f"{key}_s"] = time.perf_counter() - t
    row[f"{key}_req"] = {k: v for k, v in (_COUNTS - before).items() if v}


def _fmt(req: dict) -> str:
    total = sum(req.values())
    parts = " ".join(f"{k}{v}" for k, v in sorted(req.items()))
    return f"{total:>5} ({parts})"


# --------------------------------------------------------------------------- today's protocol


def bench_current(uri: str, options: dict, shards: int) -> dict:
    from storekit import job, records, target

    t = target(uri, options, shard_rows=SHARD_ROWS, chunk_rows=SHARD_ROWS)
    listing = records(shards * SHARD_ROWS)
    # units of about a block each, as a real listing's pages are (a refresh then reads only its own unit)
    job(t, listing, processes=0, page_images=SHARD_ROWS)
    row: dict = {"protocol": "strata (format 2)", "shards": shards}
    new = listing + records(SHARD_ROWS, prefix="new")

    import pipeline.stores.job as job_mod

    original = job_mod.commit_change

    def commit_timed(writer, change):
        with measured(row, "commit"):
            return original(writer, change)

    job_mod.commit_change = commit_timed
    try:
        with measured(row, "refresh"):
            out = job(t, new, operation="refresh", page_images=SHARD_ROWS)
    finally:
        job_mod.commit_change = original
    assert out.version == 2 and out.counts["added"] == SHARD_ROWS, out
    return row


# --------------------------------------------------------------------------- format 1 (the baseline)


def load_baseline():
    """strata's store package at BASELINE_COMMIT, importable beside today's (its `from .. import storage`
    uses today's storage package, whose functions it calls are unchanged)."""
    pkg = types.ModuleType("strata_v1_stores")
    pkg.__path__ = []
    root = Path(tempfile.mkdtemp(prefix="strata-v1-")) / "strata_v1_stores"
    root.mkdir()
    for name in ("__init__", "layout", "writer", "reader"):
        text = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:pipeline/stores/{name}.py"], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout
        text = text.replace("from .. import storage", "from pipeline import storage")
        if name == "__init__":
            text = "\n".join(line for line in text.splitlines() if "retention" not in line)
        (root / f"{name}.py").write_text(text)
    sys.path.insert(0, str(root.parent))
    import strata_v1_stores

    return strata_v1_stores


def bench_baseline(v1, uri: str, options: dict, shards: int) -> dict:
    import numpy as np

    from storekit import LAYERS, features, records

    target = v1.StoreTarget(root=uri, featureset="fs1", storage_options=options, shard_rows=SHARD_ROWS,
                            chunk_rows=SHARD_ROWS)
    listing = records(shards * SHARD_ROWS)
    writer = v1.FeatureStoreWriter(target)
    writer.prepare(n_rows=len(listing), layer_dims=LAYERS, provenance={"encoder": "toy"},
                   labels=v1.label_schema(listing))

    def shard(sid: int, recs: list[dict], start: int):
        ok = np.ones(len(recs), bool)
        feats = {layer: np.stack([features(r["image_id"], r["fingerprint"], dim) for r in recs])
                 for layer, dim in LAYERS.items()}
        return v1.EncodedShard(sid, start, recs, ok, feats, [], v1.shard_plan_hash(recs))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: writer.write_shard(shard(s, listing[s * SHARD_ROWS:(s + 1) * SHARD_ROWS],
                                                         s * SHARD_ROWS)), range(shards)))
    writer.commit_version(range(shards), dataset_fingerprint="a", config={})
    row: dict = {"protocol": "format 1 (b7c7641)", "shards": shards}
    new = records(SHARD_ROWS, prefix="new")
    with measured(row, "refresh"):
        # the store side of format 1's run_refresh + execute: open the version, read its whole index, list
        # every shard record, prepare, write the new shard, check it, commit (which lists the records again)
        current = v1.FeatureStore(target.uri, storage_options=options)
        current.index_table(include_errors=True)
        committed = writer.committed_shards()
        writer.prepare(n_rows=(shards + 1) * SHARD_ROWS, layer_dims=LAYERS, provenance={"encoder": "toy"},
                       labels=v1.label_schema(listing))
        record = writer.write_shard(shard(shards, new, shards * SHARD_ROWS))
        writer.check_shard(record)
        committed[shards] = record
        with measured(row, "commit"):
            writer.commit_version(list(range(shards + 1)), dataset_fingerprint="b", config={})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    from _machine import machine_header
    from s3server import SeaweedS3Server

    print(machine_header("bench_commit"))
    _count_requests()
    v1 = load_baseline()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = SeaweedS3Server(Path(tmp) / "weed")
        server.start()
        try:
            options = server.storage_options()
            for shards in args.sizes:
                for fn in (lambda u: bench_current(u, options, shards), lambda u: bench_baseline(v1, u, options, shards)):
                    bucket = server.make_bucket(f"b-{uuid.uuid4().hex[:12]}")
                    rows.append(fn(f"s3://{bucket}/stores"))
                    print(f"  done: {rows[-1]['protocol']} at {shards} shards", flush=True)
        finally:
            server.close()
    print()
    print(f"{'shards':>6}  {'protocol':<20} {'commit s':>9} {'commit requests':<40} {'refresh s':>9}  refresh requests")
    for r in rows:
        print(f"{r['shards']:>6}  {r['protocol']:<20} {r['commit_s']:>9.3f} {_fmt(r['commit_req']):<40} "
              f"{r['refresh_s']:>9.3f}  {_fmt(r['refresh_req'])}")
    print()
    for proto in ("strata (format 2)", "format 1 (b7c7641)"):
        mine = sorted((r for r in rows if r["protocol"] == proto), key=lambda r: r["shards"])
        small, big = mine[0], mine[-1]
        growth = sum(big["commit_req"].values()) / max(1, sum(small["commit_req"].values()))
        print(f"{proto}: commit requests at {big['shards']} shards / at {small['shards']} shards = {growth:.2f}x; "
              f"commit seconds {big['commit_s'] / max(small['commit_s'], 1e-9):.2f}x")
    now = {r["shards"]: r for r in rows if r["protocol"].startswith("strata")}
    old = {r["shards"]: r for r in rows if r["protocol"].startswith("format 1")}
    for n in sorted(now):
        print(f"at {n} shards: commit requests today / format 1 = "
              f"{sum(now[n]['commit_req'].values()) / max(1, sum(old[n]['commit_req'].values())):.3f}, "
              f"refresh seconds today / format 1 = {now[n]['refresh_s'] / max(old[n]['refresh_s'], 1e-9):.2f}")


if __name__ == "__main__":
    main()
