"""Scheduled refresh: only new or changed images are encoded, deleted ones tombstoned, versions pinnable."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from pipeline.config import ExtractConfig, load_config
from pipeline.extract.refresh import run_refresh
from pipeline.sources.demo import write_shapes
from pipeline.stores import FeatureStore

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1,layer2]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "store.shard_rows=32", "store.chunk_rows=16"]


@pytest.fixture
def dataset(tmp_path):
    write_shapes(tmp_path / "src", n=80, size=32, seed=2)
    spare = tmp_path / "spare"
    write_shapes(spare, n=90, size=32, seed=7)  # other pixels, for "changed" and "added" images
    return tmp_path / "src" / "images", spare / "images"


def _cfg(images, root):
    return load_config(ExtractConfig, None, ["source.kind=folder", f"source.uri={images}",
                                             f"store.root={root}", *TINY])


def test_add_change_delete_then_noop(ray_local, dataset, tmp_path, caplog):
    images, spare = dataset
    cfg = _cfg(images, tmp_path / "stores")
    first = run_refresh(cfg)  # no store yet: a full extraction
    assert first.version == 1 and first.added == 80
    v1 = FeatureStore(first.store_uri)
    before = {i: v1.get([i], "layer2")[0] for i in ["00010.png", "00011.png", "00020.png"]}

    shutil.copy(spare / "00085.png", images / "00011.png")          # changed content
    (images / "00020.png").unlink()                                   # deleted
    for k in (81, 82, 83):
        shutil.copy(spare / f"000{k}.png", images / f"new-{k}.png")   # added
    with caplog.at_level("INFO", logger="pipeline.extract.run"):
        second = run_refresh(cfg)
    assert "encoding 4 images in the driver" in caplog.text  # too few to be worth Ray's start-up
    assert (second.added, second.changed, second.deleted, second.unchanged) == (3, 1, 1, 78)
    assert second.version == 2
    assert second.extract.images == 4  # only added + changed were encoded

    v2 = FeatureStore(first.store_uri)
    ids = list(v2.index().image_id)
    assert len(ids) == len(set(ids)) == 82
    assert "00020.png" not in ids and "new-82.png" in ids
    np.testing.assert_array_equal(v2.get(["00010.png"], "layer2")[0], before["00010.png"])  # kept, not re-encoded
    assert not np.allclose(v2.get(["00011.png"], "layer2")[0], before["00011.png"])         # re-encoded
    assert v2.index().set_index("image_id").loc["00011.png", "row"] >= 80

    # pinning the old version still shows the old rows
    old = FeatureStore(first.store_uri, version=1)
    assert len(old) == 80 and "00020.png" in set(old.index().image_id)
    np.testing.assert_array_equal(old.get(["00011.png"], "layer2")[0], before["00011.png"])

    t0 = time.perf_counter()
    third = run_refresh(cfg)
    assert third.nothing_changed and third.version == 2
    assert time.perf_counter() - t0 < 30
    assert FeatureStore(first.store_uri).versions() == [1, 2]


def test_reader_open_during_refresh_keeps_its_version(ray_local, dataset, tmp_path):
    images, spare = dataset
    cfg = _cfg(images, tmp_path / "stores")
    first = run_refresh(cfg)
    reader = FeatureStore(first.store_uri)
    snapshot = reader.layer("layer1").copy()
    for k in range(5):
        shutil.copy(spare / f"0000{k}.png", images / f"late-{k}.png")
    run_refresh(cfg)
    assert reader.version == 1
    np.testing.assert_array_equal(reader.layer("layer1"), snapshot)
    assert len(FeatureStore(first.store_uri)) == 85


def test_changing_the_encoder_makes_a_new_featureset(ray_local, dataset, tmp_path):
    images, _ = dataset
    a = run_refresh(_cfg(images, tmp_path / "stores"))
    cfg_b = load_config(ExtractConfig, None, ["source.kind=folder", f"source.uri={images}",
                                              f"store.root={tmp_path / 'stores'}", *TINY, "encoder.pooling=max"])
    b = run_refresh(cfg_b)
    assert a.store_uri != b.store_uri and b.version == 1 and b.added == 80
