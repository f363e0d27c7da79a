"""Feature sets built with the stores API alone (no torch, no Ray): synthetic features that depend only on an
image's id and content fingerprint, so any reader's vectors can be checked against what they must be."""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import multiprocessing as mp
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from pipeline.stores import EncodedShard, FeatureStoreWriter, StoreTarget
from pipeline.stores.job import BlockTask, JobOutcome, update_from_records

LAYERS = {"early": 8, "late": 24}
PROVENANCE = {"encoder": "toy", "layers": list(LAYERS), "weights_sha256": "0" * 64, "weights_source": "here"}


def records(n: int, *, prefix: str = "img", start: int = 0, version: str = "a", labels: bool = True) -> list[dict]:
    return [{"image_id": f"{prefix}-{i:04d}", "uri": f"file:///data/{prefix}-{i:04d}.png",
             "fingerprint": f"sha256:{prefix}{i}{version}", "split": None,
             "labels": {"digit": i % 10, "parity": "even" if i % 2 == 0 else "odd"} if labels else {}}
            for i in range(start, start + n)]


def features(image_id: str, fingerprint: str, dim: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(f"{image_id}|{fingerprint}|{dim}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def expected(image_id: str, fingerprint: str, dim: int, dtype=np.float16) -> np.ndarray:
    return features(image_id, fingerprint, dim).astype(dtype).astype(np.float32)


def target(root: str, storage_options: Mapping | None = None, *, featureset: str = "fs1", **kw) -> StoreTarget:
    kw = {"shard_rows": 64, "chunk_rows": 16, **kw}
    return StoreTarget(root=root, featureset=featureset, storage_options=dict(storage_options or {}), **kw)


def encoded(task: BlockTask, *, bad: Iterable[str] = (), scale: float = 1.0) -> EncodedShard:
    bad = set(bad)
    recs = list(task.records)
    ok = np.array([r["image_id"] not in bad for r in recs])
    feats = {layer: np.stack([features(r["image_id"], r["fingerprint"], dim) * scale
                              for r, o in zip(recs, ok) if o] or [np.zeros(dim, np.float32)])[: ok.sum()]
             for layer, dim in LAYERS.items()}
    errors = [{"image_id": r["image_id"], "uri": r["uri"], "stage": "decode", "reason": "truncated"}
              for r, o in zip(recs, ok) if not o]
    return EncodedShard(task.block, task.row_start, recs, ok, feats, errors, task.content, task.unit)


def _write(t: StoreTarget, shard: EncodedShard) -> dict:
    return FeatureStoreWriter(t).write_shard(shard)


def job(t: StoreTarget, recs: Sequence[dict], *, operation: str = "extract", bad: Iterable[str] = (),
        processes: int = 0, scale: float = 1.0, provenance: Mapping | None = None,
        page_images: int = 4096) -> JobOutcome:
    """One job that brings feature set ``t`` in line with ``recs``; blocks written in ``processes`` processes."""
    writer = FeatureStoreWriter(t)
    bad = set(bad)

    def write_blocks(tasks: list[BlockTask]) -> dict[int, dict]:
        done = writer.written_records([x.block for x in tasks])
        todo = [x for x in tasks if done.get(x.block, {}).get("plan_hash") != x.content]
        shards = [encoded(x, bad=bad, scale=scale) for x in todo]
        if processes and shards:
            # spawned, as Ray's workers are. With fork, the parent's next S3 read after this pool (a HEAD through
            # zarr's event loop) got no answer and waited out the 120 s read timeout; the children's copies of the
            # parent's pooled connections and event loop are the suspects, not yet pinned down
            with cf.ProcessPoolExecutor(max_workers=processes, mp_context=mp.get_context("spawn")) as pool:
                written = list(pool.map(_write, [t] * len(shards), shards))
        else:
            written = [writer.write_shard(s) for s in shards]
        done.update({int(r["shard_id"]): r for r in written})
        return {x.block: done[x.block] for x in tasks}

    return update_from_records(writer, recs, page_images=page_images, operation=operation, write_blocks=write_blocks, layer_dims=LAYERS,
                             provenance=provenance or PROVENANCE, config={"store": {"storage_options": dict(t.storage_options)}})


def write_store(root: str, features: Mapping[str, np.ndarray], labels: Mapping[str, list], *, featureset: str = "fs",
                shard_rows: int = 64, ids: Sequence[str] | None = None, dtype: str = "float32",
                provenance: Mapping | None = None, uris: Sequence[str] | None = None,
                fingerprints: Sequence[str] | None = None):
    """A real committed feature store holding exactly these arrays, row i for image ``ids[i]`` (whose
    fingerprint is ``fingerprints[i]``, or a stand-in that no bytes hash to)."""
    from pipeline.stores import FeatureStore

    n = len(next(iter(features.values())))
    ids = list(ids or [f"img-{i:05d}" for i in range(n)])
    position = {image_id: i for i, image_id in enumerate(ids)}
    uris = list(uris or [f"file:///d/{i}.png" for i in ids])
    fingerprints = list(fingerprints or [f"sha256:{i}" for i in ids])
    recs = [{"image_id": ids[i], "uri": uris[i], "fingerprint": fingerprints[i],
             "split": None, "labels": {k: v[i] for k, v in labels.items()}} for i in range(n)]
    t = StoreTarget(root=root, featureset=featureset, shard_rows=shard_rows, chunk_rows=shard_rows // 4, dtype=dtype)
    writer = FeatureStoreWriter(t)

    def write_blocks(tasks: list[BlockTask]) -> dict[int, dict]:
        out = {}
        for task in tasks:
            rows = [position[r["image_id"]] for r in task.records]
            shard = EncodedShard(task.block, task.row_start, list(task.records), np.ones(len(rows), bool),
                                 {k: np.asarray(v)[rows].astype(np.float32) for k, v in features.items()}, [],
                                 task.content, task.unit)
            out[task.block] = writer.write_shard(shard)
        return out

    update_from_records(writer, recs, operation="extract", write_blocks=write_blocks,
                      layer_dims={k: int(np.asarray(v).shape[1]) for k, v in features.items()},
                      provenance=dict(provenance or {"encoder": "toy", "layers": list(features)}))
    return FeatureStore(t.uri)
