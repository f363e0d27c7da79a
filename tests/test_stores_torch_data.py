"""pipeline.stores.torch_dataset: map-style and iterable datasets round-trip FeatureStore.layer; the iterable
one gives each row exactly once per epoch across DataLoader workers and (simulated) DDP ranks."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.stores import FeatureStore, torch_dataset
from toystore import drop_images, write_toy_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return write_toy_store(tmp_path_factory.mktemp("toy"))


def _by_id(store: FeatureStore, layer: str) -> dict[str, np.ndarray]:
    return dict(zip(store.index_table().column("image_id").to_pylist(), store.layer(layer)))


def test_map_style_round_trips_the_layer_and_encodes_classes(store):
    ds = torch_dataset(store, "a", label="shape")
    assert isinstance(ds, torch.utils.data.Dataset) and len(ds) == len(store) == 150 - 12
    batches = list(DataLoader(ds, batch_size=16))
    features = torch.cat([b["features"] for b in batches])
    np.testing.assert_array_equal(features.numpy(), store.layer("a"))
    assert [i for b in batches for i in b["image_id"]] == store.index_table().column("image_id").to_pylist()
    assert ds.classes == ["s0", "s1", "s2"]
    raw = store.labels("shape")
    labels = torch.cat([b["label"] for b in batches]).numpy()
    assert labels.dtype == np.int64
    assert [ds.classes[k] if k >= 0 else None for k in labels] == list(raw)  # img 7 has no shape: -1


def test_a_blank_label_is_missing_as_in_the_probes(tmp_path):
    store = write_toy_store(tmp_path, blank_shapes=(3, 4))
    ds = torch_dataset(store, "a", label="shape")
    assert ds.classes == ["s0", "s1", "s2"]  # not ' ' as a class of its own
    labels = dict(zip(ds.image_ids, (int(ds[i]["label"]) for i in range(len(ds)))))
    assert labels["img/0003.png"] == labels["img/0004.png"] == labels["img/0007.png"] == -1
    others = {i: k for i, k in labels.items() if i not in ("img/0003.png", "img/0004.png", "img/0007.png")}
    assert all(ds.classes[k] == f"s{int(i[4:8]) % 3}" for i, k in others.items())


def test_numeric_labels(store):
    ds = torch_dataset(store, "b", label="weight")
    weights = torch.stack([ds[i]["label"] for i in range(len(ds))]).numpy()
    expected = np.array([np.nan if w is None else w for w in store.labels("weight")], np.float32)
    np.testing.assert_array_equal(weights, expected)  # NaN where missing (img 9), floats for regression
    assert ds.classes is None
    counts = torch_dataset(store, "b", label="count")
    assert counts.classes == [0, 1, 2, 3, 4] and counts[3]["label"].item() == store.labels("count")[3]
    with pytest.raises(ValueError, match=r"unknown label column 'colour'; label columns: \['count', 'shape', 'weight"):
        torch_dataset(store, "a", label="colour")


def _epoch(store, *, world_size: int, epoch: int = 0, **kw) -> list[list[dict]]:
    """Every rank's samples for one epoch, each rank read through a DataLoader with two workers."""
    per_rank = []
    for rank in range(world_size):
        ds = torch_dataset(store, "a", label="count", iterable=True, rank=rank, world_size=world_size,
                           unit_rows=10, **kw)
        ds.set_epoch(epoch)
        samples = []
        for batch in DataLoader(ds, batch_size=8, num_workers=2):
            samples += [{"image_id": i, "features": f, "label": y}
                        for i, f, y in zip(batch["image_id"], batch["features"].numpy(), batch["label"].tolist())]
        per_rank.append(samples)
    return per_rank


def test_iterable_sees_each_row_once_across_workers_and_ranks(store):
    expected = _by_id(store, "a")
    labels = dict(zip(expected, store.labels("count")))
    per_rank = _epoch(store, world_size=3)
    seen = Counter(s["image_id"] for rank in per_rank for s in rank)
    assert set(seen) == set(expected) and set(seen.values()) == {1}
    assert all(len(rank) > 20 for rank in per_rank)  # the work is spread, not all on one rank
    for rank in per_rank:
        for s in rank:
            np.testing.assert_array_equal(s["features"], expected[s["image_id"]])
            assert s["label"] == labels[s["image_id"]]


def test_iterable_shuffle_is_per_epoch_and_still_exactly_once(store):
    first = _epoch(store, world_size=2, shuffle=True, seed=3, epoch=0)
    again = _epoch(store, world_size=2, shuffle=True, seed=3, epoch=0)
    second = _epoch(store, world_size=2, shuffle=True, seed=3, epoch=1)
    order = [[s["image_id"] for s in rank] for rank in first]
    assert order == [[s["image_id"] for s in rank] for rank in again]  # reproducible
    assert order != [[s["image_id"] for s in rank] for rank in second]
    for run in (first, second):
        seen = Counter(s["image_id"] for rank in run for s in rank)
        assert len(seen) == len(store) and set(seen.values()) == {1}
    assert order[0] != sorted(order[0])


def test_iterable_reads_the_version_it_was_built_on(tmp_path):
    store = write_toy_store(tmp_path)
    ds = torch_dataset(store, "b", iterable=True, rank=0, world_size=1)
    drop_images(store, keep=100)  # v2 deletes the last 50 images
    assert len(FeatureStore(store.uri)) < len(store)
    ids = [s["image_id"] for s in DataLoader(ds, batch_size=None, num_workers=1)]
    assert sorted(ids) == sorted(store.index_table().column("image_id").to_pylist()) and len(ids) == len(store)


def test_rank_outside_world_is_refused(store):
    with pytest.raises(ValueError, match="rank 2 is not within world_size 2"):
        torch_dataset(store, "a", iterable=True, rank=2, world_size=2)
