"""A small committed feature set written with the real writer: 3 shards (the last one short), failed rows,
string / integer / float labels with gaps. For reader tests that need no encoder."""
from __future__ import annotations

import numpy as np

from pipeline.stores import FeatureStore, FeatureStoreWriter, StoreTarget, label_schema, shard_plan_hash
from pipeline.stores.writer import EncodedShard

N, SHARD_ROWS, DIMS = 150, 64, {"a": 6, "b": 3}


def failed(i: int) -> bool:
    return i % 13 == 5


def write_toy_store(root, *, formats=("zarr", "parquet"), seed=0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    records = [{"image_id": f"img/{i:04d}.png", "uri": f"file:///data/{i:04d}.png", "fingerprint": str(i),
                "split": None,
                "labels": {"shape": None if i == 7 else f"s{i % 3}", "count": i % 5,
                           "weight": None if i == 9 else float(i) / 10}}
               for i in range(N)]
    target = StoreTarget(root=str(root), featureset="toy", shard_rows=SHARD_ROWS, chunk_rows=16, formats=formats)
    writer = FeatureStoreWriter(target)
    writer.prepare(n_rows=N, layer_dims=DIMS, provenance={"encoder": "toy", "layers": list(DIMS)},
                   labels=label_schema(records))
    shards = range((N + SHARD_ROWS - 1) // SHARD_ROWS)
    for s in shards:
        recs = records[s * SHARD_ROWS:(s + 1) * SHARD_ROWS]
        ok = np.array([not failed(s * SHARD_ROWS + j) for j in range(len(recs))])
        feats = {layer: rng.normal(0, 1, (int(ok.sum()), dim)).astype(np.float32) for layer, dim in DIMS.items()}
        errors = [{"image_id": r["image_id"], "uri": r["uri"], "stage": "decode", "reason": "toy"}
                  for r, good in zip(recs, ok) if not good]
        writer.write_shard(EncodedShard(s, s * SHARD_ROWS, recs, ok, feats, errors, shard_plan_hash(recs)))
    writer.commit_version(list(shards), dataset_fingerprint="toy", config={})
    return FeatureStore(target.uri)
