"""Feature stores as Ray Datasets, for distributed reads of one committed version."""
from __future__ import annotations

import ray

from .. import storage
from ..stores import FeatureStore


def read_layer(store: FeatureStore, layer: str, *, with_labels: bool = True) -> "ray.data.Dataset":
    """Rows of (image_id, row, vector[, labels...]) for one layer of the store's pinned version."""
    if layer not in store.layer_dims:
        raise ValueError(f"layer {layer!r} not in this feature set; layers: {store.layers}")
    if "parquet" not in store.meta["formats"]:
        raise ValueError("this feature set was written without Parquet; read it with FeatureStore.iter_layer")
    paths = [f"{store.base}/{s.parquet[layer]}" for s in store.info.segments]
    filesystem = None if storage.is_local(store.fs) else store.fs
    ds = ray.data.read_parquet(paths, filesystem=filesystem)
    deleted = {r for s in store.info.segments for r in s.deleted}
    if deleted:
        ds = ds.filter(lambda r: r["row"] not in deleted)
    columns = store.label_columns
    if with_labels and columns:
        labels = store.index_table().select(["image_id", *columns]).to_pylist()
        by_id = ray.put({r.pop("image_id"): r for r in labels})

        def attach(batch):
            table = ray.get(by_id)
            for col in columns:
                batch[col] = [table[i][col] for i in batch["image_id"]]
            return batch

        ds = ds.map_batches(attach, batch_format="pandas")
    return ds
