"""A small committed feature set written with the real writer: 3 shards (the last one short), failed rows,
string / integer / float labels with gaps. For reader tests that need no encoder."""
from __future__ import annotations

import numpy as np

from pipeline.stores import FeatureStore, FeatureStoreWriter, StoreTarget
from pipeline.stores.job import update_from_records
from pipeline.stores.writer import EncodedShard

N, SHARD_ROWS, DIMS = 150, 64, {"a": 6, "b": 3}


def failed(i: int) -> bool:
    return i % 13 == 5


def write_toy_store(root, *, formats=("zarr", "parquet"), seed=0, blank_shapes=()) -> FeatureStore:
    """``blank_shapes``: images whose shape label is a blank string (a CSV's empty cell), not a null."""
    rng = np.random.default_rng(seed)
    records = [{"image_id": f"img/{i:04d}.png", "uri": f"file:///data/{i:04d}.png", "fingerprint": str(i),
                "split": None,
                "labels": {"shape": None if i == 7 else " " if i in blank_shapes else f"s{i % 3}", "count": i % 5,
                           "weight": None if i == 9 else float(i) / 10}}
               for i in range(N)]
    target = StoreTarget(root=str(root), featureset="toy", shard_rows=SHARD_ROWS, chunk_rows=16, formats=formats)
    writer = FeatureStoreWriter(target)
    vectors = {layer: rng.normal(0, 1, (N, dim)).astype(np.float32) for layer, dim in DIMS.items()}
    position = {r["image_id"]: i for i, r in enumerate(records)}

    def write_blocks(tasks):
        out = {}
        for task in tasks:
            rows = [position[r["image_id"]] for r in task.records]
            ok = np.array([not failed(i) for i in rows])
            feats = {layer: v[[i for i in rows if not failed(i)]] for layer, v in vectors.items()}
            errors = [{"image_id": r["image_id"], "uri": r["uri"], "stage": "decode", "reason": "toy"}
                      for r, good in zip(task.records, ok) if not good]
            out[task.block] = writer.write_shard(EncodedShard(task.block, task.row_start, list(task.records), ok,
                                                              feats, errors, task.content, task.unit))
        return out

    update_from_records(writer, records, operation="extract", write_blocks=write_blocks, layer_dims=DIMS,
                      provenance={"encoder": "toy", "layers": list(DIMS)})
    return FeatureStore(target.uri)


def drop_images(store: FeatureStore, *, keep: int) -> None:
    """Commit a version holding only the first ``keep`` images of ``store`` (a refresh that deleted the rest)."""
    index = store.index_table(include_errors=True).sort_by("image_id").to_pylist()[:keep]
    labels = store.label_columns
    records = [{"image_id": r["image_id"], "uri": r["uri"], "fingerprint": r["fingerprint"], "split": r["split"],
                "labels": {c: r[c] for c in labels}} for r in index]
    writer = FeatureStoreWriter(StoreTarget(root=store.uri.rsplit("/", 1)[0], featureset=store.meta["featureset"],
                                            shard_rows=store.meta["shard_rows"], chunk_rows=store.meta["chunk_rows"],
                                            formats=tuple(store.meta["formats"])))
    update_from_records(writer, records, operation="refresh", write_blocks=lambda tasks: {}, layer_dims=DIMS,
                      provenance=store.provenance)
