"""Images that move between units (a Hugging Face dataset re-sharded or appended to) keep their vectors: a
refresh copies them from the rows that hold the same bytes, and encodes only images the store has never seen."""
from __future__ import annotations

import io
import logging
from dataclasses import replace
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractConfig, load_config
from pipeline.extract import run_extract
from pipeline.extract.refresh import run_refresh
from pipeline.extract.sync import dry_run
from pipeline.stores import FeatureStore
from pipeline.stores.job import donor_units

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1,layer2]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "store.shard_rows=8", "store.chunk_rows=4"]


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(24, 60)), int(rng.integers(24, 60)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _dataset(seeds: list[int], bad: tuple[int, ...] = (), paths: bool = False,
             kinds: dict[int, int] | None = None) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "kind": datasets.ClassLabel(names=["x", "y", "z"])})
    images = [{"bytes": b"not an image %d" % s if s in bad else _jpeg(s), "path": f"img{s}.jpg" if paths else None}
              for s in seeds]
    kind = [(kinds or {}).get(s, s % 3) for s in seeds]
    return datasets.Dataset.from_dict({"image": images, "kind": kind}, features=features)


def _save(data: datasets.Dataset, root: Path, shards: int, layout: str) -> None:
    """Arrow files of `save_to_disk`, or Parquet shards as the Hub names them (their sizes are known to the
    driver, which then plans and encodes a small job itself)."""
    if layout == "arrow":
        data.save_to_disk(str(root), num_shards=shards)
        return
    for old in root.glob("data/*.parquet"):
        old.unlink()
    (root / "data").mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        data.shard(shards, k, contiguous=True).to_parquet(str(root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"))


def _by_content(store: FeatureStore, layer: str) -> dict[str, np.ndarray]:
    return dict(zip(store.index()["fingerprint"], store.layer(layer)))


@pytest.mark.parametrize("layout", ["parquet", pytest.param("arrow", marks=pytest.mark.slow)])
def test_a_resharded_and_appended_dataset_encodes_only_its_new_images(tmp_path: Path, layout, request):
    """Parquet shards run in the driver; Arrow files (of unknown size) on Ray, where one bad image among the
    23 the job leaves stays within a 5% error budget, though it is one of the 4 images encoded."""
    run = ["run.local_max_images=1000"]
    if layout == "arrow":
        request.getfixturevalue("ray_local")
        run = ["run.local_max_images=0", "run.num_encoders=1", "run.max_error_fraction=0.05"]
    ds = tmp_path / "ds"
    _save(_dataset(list(range(20))), ds, 2, layout)
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={ds}", f"store.root={tmp_path}/s",
                                            *TINY, *run])
    first = run_extract(cfg)
    before = FeatureStore(first.store_uri)
    old = {layer: _by_content(before, layer) for layer in ("layer1", "layer2")}

    appended = [100, 101, 102] + ([103] if layout == "arrow" else [])
    _save(_dataset(list(range(20)) + appended, bad=(103,)), ds, 3, layout)  # re-cut into 3, rows appended
    if layout == "parquet":  # units of known size: the dry run lists and diffs them as the job will
        plan = dry_run(cfg)
        assert (plan.diff["added"], plan.diff["deleted"], plan.diff["copied"], plan.to_encode) == (23, 20, 20, 3)
        assert "23 new, 0 changed, 20 deleted, 0 relabelled, 0 unchanged: 3 to encode, 20 to copy" in str(plan)
    if layout == "parquet":  # 23 images in new units, more than the driver takes, but 20 of them are copies
        caplog = request.getfixturevalue("caplog")
        with caplog.at_level(logging.INFO, logger="pipeline.extract.run"):
            summary = run_refresh(replace(cfg, run=replace(cfg.run, local_max_images=10)))
        assert "encoding 3 images in the driver" in caplog.text  # planned, copied and encoded there: no Ray
    else:
        summary = run_refresh(cfg)
    assert summary.version == 2
    assert summary.copied == 20 and summary.extract.encoded == 3  # only the appended images are encoded
    assert summary.extract.errors == len(appended) - 3
    assert "20 of the added and changed were stored already under other rows" in str(summary)
    after = FeatureStore(first.store_uri)
    index = after.index()
    assert len(index) == 23 and index["image_id"].str.contains("-of-00003/").all()
    assert after.errors().num_rows == len(appended) - 3  # the bad image, recorded
    assert sorted(index["kind"].tolist()) == sorted(s % 3 for s in list(range(20)) + [100, 101, 102])
    for layer in ("layer1", "layer2"):
        now = _by_content(after, layer)
        for fp, vector in old[layer].items():  # the same image's bytes: exactly its stored vector
            np.testing.assert_array_equal(now[fp], vector)
    fresh = FeatureStore(run_extract(load_config(ExtractConfig, None, [
        "source.kind=hf", f"source.uri={ds}", f"store.root={tmp_path}/fresh", *TINY, *run])).store_uri)
    fresh_x = _by_content(fresh, "layer2")
    for fp, vector in _by_content(after, "layer2").items():  # what encoding them again would have stored
        np.testing.assert_allclose(vector, fresh_x[fp], rtol=2e-2, atol=2e-2)
    if layout == "parquet":
        assert "nothing changed: no version would be committed" in str(dry_run(cfg))
    assert run_refresh(cfg).nothing_changed


def test_images_that_keep_their_ids_count_as_moved_not_added_and_deleted(tmp_path: Path):
    """Ids from image paths stay when the shards are re-cut: such images are unchanged (moved to other files,
    their vectors copied), and only the appended ones are added, in the dry run and the refresh alike."""
    ds = tmp_path / "ds"
    _save(_dataset(list(range(20)), paths=True), ds, 2, "parquet")
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={ds}", f"store.root={tmp_path}/s",
                                            *TINY, "run.local_max_images=1000"])
    store = FeatureStore(run_extract(cfg).store_uri)
    assert sorted(store.index()["image_id"]) == sorted(f"img{s}.jpg" for s in range(20))
    _save(_dataset(list(range(1, 20)) + [100, 101], paths=True), ds, 3, "parquet")  # re-cut, 1 gone, 2 new
    plan = dry_run(cfg)
    assert {k: plan.diff[k] for k in ("added", "deleted", "unchanged", "copied")} == {
        "added": 2, "deleted": 1, "unchanged": 19, "copied": 0}
    assert plan.to_encode == 2
    summary = run_refresh(cfg)
    assert (summary.added, summary.changed, summary.deleted, summary.unchanged) == (2, 0, 1, 19)
    assert (summary.moved, summary.copied, summary.extract.encoded) == (19, 0, 2)
    assert "19 unchanged kept without re-encoding" in str(summary)
    assert "19 moved to other files under their ids" in str(summary)
    assert sorted(FeatureStore(store.uri).index()["image_id"]) == sorted(
        f"img{s}.jpg" for s in [*range(1, 20), 100, 101])
    # re-cut again, two images relabelled on the way: relabelled, not unchanged
    _save(_dataset(list(range(1, 20)) + [100, 101], paths=True, kinds={5: 0, 6: 1}), ds, 2, "parquet")
    plan = dry_run(cfg)
    assert (plan.diff["relabelled"], plan.diff["unchanged"], plan.diff["moved"]) == (2, 19, 21)
    assert "21 moved to other files under their ids" in str(plan)
    summary = run_refresh(cfg)
    assert (summary.added, summary.deleted, summary.relabeled, summary.unchanged, summary.moved) == (0, 0, 2, 19, 21)
    index = FeatureStore(store.uri).index().set_index("image_id")
    assert (index.loc["img5.jpg", "kind"], index.loc["img6.jpg", "kind"], index.loc["img7.jpg", "kind"]) == (0, 1, 1)


def test_donors_are_the_changed_units_at_the_same_relative_position():
    old = [f"train/data-{i:05d}-of-00004.arrow" for i in range(4)]
    new = [f"train/data-{i:05d}-of-00006.arrow" for i in range(6)]
    val = "validation/data-00000-of-00001.arrow"
    donors = donor_units(new, [*new, val], [*old, val], set(old), cap=3)  # more changed than cap: by position
    assert donors[new[0]] == old[:2] and donors[new[-1]] == old[2:]
    assert all(len(d) <= 3 for d in donors.values()) and val not in {u for d in donors.values() for u in d}
    unchanged = donor_units([old[1]], old, old, {old[1], old[2]}, cap=1)  # a unit gives nothing to itself
    assert unchanged == {old[1]: [old[2]]}
    rgs = [f"f.parquet#rg{i}" for i in range(12)]
    groups = donor_units(["f.parquet#rg10"], rgs, rgs, set(rgs), cap=4)
    assert groups == {"f.parquet#rg10": ["f.parquet#rg9", "f.parquet#rg11"]}  # numbers read as numbers
    # few changed units (at most cap): all are donors, nearest first; a row that went from train to validation
    # or from the first shard to the last is found
    few = donor_units(new, [*new, val], [*old, val], set(old) | {val})
    assert few[new[0]] == [*old[:2], *old[2:], val] and few[new[-1]] == [*old[2:], *old[:2], val]
    assert donor_units([val], [*old, val], [*old, val], {old[0], val}) == {val: [old[0]]}


def test_only_content_fingerprints_of_encoded_rows_are_matched():
    import pyarrow as pa

    from pipeline.stores.copy import copy_sources
    from pipeline.stores.live import LiveIndex

    stored = pa.table({"image_id": ["a", "b", "c", "d"], "row": [0, 1, 2, 3], "shard": [0, 0, 0, 0],
                       "fingerprint": ["sha256:11", "size:5-mtime:9", "etag:x", "sha256:22"],
                       "status": ["ok", "ok", "ok", "error"], "uri": ["u"] * 4, "split": [None] * 4})
    live = LiveIndex(None, {0: stored}, [])
    listed = [{"image_id": "n1", "fingerprint": "sha256:11"}, {"image_id": "n2", "fingerprint": "size:5-mtime:9"},
              {"image_id": "n3", "fingerprint": "etag:x"}, {"image_id": "n4", "fingerprint": "sha256:22"},
              {"image_id": "n5", "fingerprint": "sha256:33"}]
    assert copy_sources(live, listed) == {"n1": (0, 0, "a", False)}  # a file's size+mtime or ETag, or a failed row: never


def test_a_copy_that_fails_is_encoded_and_counted_as_such(tmp_path: Path, caplog):
    """A copy block whose stored vectors cannot be read (here: a lost Zarr shard, read back as NaN) is encoded
    instead. Its images that only moved still count as moved; the other copy block's images stay copies."""
    ds = tmp_path / "ds"
    _save(_dataset(list(range(16)), paths=True), ds, 2, "parquet")
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={ds}", f"store.root={tmp_path}/s",
                                            *TINY, "run.local_max_images=1000"])
    store = FeatureStore(run_extract(cfg).store_uri)
    index = store.index()
    lost = int(index.loc[index["image_id"] == "img0.jpg", "shard"].iloc[0])
    assert set(index.loc[index["shard"] == lost, "image_id"]) == {f"img{s}.jpg" for s in range(8)}
    # one file now: img0-7 keep their paths (moved), img8-15 come back under new paths (the same bytes: copies)
    data = datasets.Dataset.from_dict(
        {"image": [{"bytes": _jpeg(s), "path": f"img{s}.jpg" if s < 8 else f"new{s}.jpg"} for s in range(16)],
         "kind": [s % 3 for s in range(16)]}, features=_dataset([]).features)
    _save(data, ds, 1, "parquet")
    for chunk in (Path(store.uri) / "features.zarr").glob(f"*/c/{lost}/*"):
        chunk.unlink()  # the moved images' vectors are gone; the renamed ones' (another block) are not
    with caplog.at_level(logging.WARNING, logger="pipeline.extract.unit_stage"):
        summary = run_refresh(cfg)
    assert "vectors of 8 moved images could not be copied" in caplog.text
    assert (summary.added, summary.deleted, summary.unchanged) == (8, 8, 8)
    assert (summary.moved, summary.copied, summary.extract.encoded) == (8, 8, 8)
    after = FeatureStore(store.uri)
    assert np.isfinite(after.layer("layer2")).all()
    assert sorted(after.index()["image_id"]) == sorted([*(f"img{s}.jpg" for s in range(8)),
                                                         *(f"new{s}.jpg" for s in range(8, 16))])


def test_images_moved_to_another_split_or_reversed_are_copied(tmp_path: Path):
    """With few units changed, every changed unit is a donor: images moved from train to validation (another
    name pattern) and a shard's rows reversed keep their vectors."""
    ds = tmp_path / "ds" / "data"
    ds.mkdir(parents=True)

    def save(train: list[int], validation: list[int]) -> None:
        _dataset(train).to_parquet(str(ds / "train-00000-of-00001.parquet"))
        _dataset(validation).to_parquet(str(ds / "validation-00000-of-00001.parquet"))

    save(list(range(12)), [20, 21, 22, 23])
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'ds'}",
                                            f"store.root={tmp_path}/s", *TINY, "run.local_max_images=1000"])
    store = FeatureStore(run_extract(cfg).store_uri)
    old = _by_content(store, "layer2")
    save(list(range(8, -1, -1)), [20, 21, 22, 23, 9, 10, 11])  # 9-11 to validation, the rest reversed
    summary = run_refresh(cfg)
    assert summary.extract.encoded == 0 and summary.copied > 0
    after = FeatureStore(store.uri)
    index = after.index()
    assert sorted(index.loc[index["split"] == "validation", "kind"]) == sorted(s % 3 for s in [20, 21, 22, 23, 9, 10, 11])
    now = _by_content(after, "layer2")
    assert len(now) == 16 and all(np.array_equal(now[fp], v) for fp, v in old.items())


def test_the_driver_plans_new_units_only_when_their_donors_could_hold_their_images():
    """A new unit's images may be copies of its donors' rows, never of more: a large new split next to a few
    changed rows still goes to Ray, not through the driver (which would hash it only to give up)."""
    from pipeline.extract.run import _driver_may_plan
    from pipeline.sources.units import WorkUnit
    from pipeline.stores.job import UnitWork
    from pipeline.stores.manifest import Segment

    cfg = load_config(ExtractConfig, None, ["source.kind=hf", "source.uri=/nowhere", *TINY,
                                            "run.local_max_images=20"])

    def seg(block: int, rows: int, deleted: int = 0) -> Segment:
        return Segment(block, block * 64, rows, rows, "c", "i", "e", deleted=tuple(range(deleted)))

    def new(n: int, *donors: Segment) -> UnitWork:
        return UnitWork(WorkUnit(f"test-{n}.parquet", fingerprint="f", n_images=n), (), (9,), donors)

    shared = seg(1, 40)
    assert _driver_may_plan(cfg, [new(50, shared)])  # 10 at most to encode
    assert _driver_may_plan(cfg, [new(30, shared), new(25, shared)])  # the donor's rows count once: 15
    assert not _driver_may_plan(cfg, [new(50, seg(1, 40, deleted=15))])  # 25 > 20
    assert not _driver_may_plan(cfg, [new(50, seg(1, 10))])  # a large new split beside a small change
    assert _driver_may_plan(cfg, [new(20)]) and not _driver_may_plan(cfg, [new(21)])


def test_a_refresh_that_finds_nothing_new_in_units_of_unknown_content_grows_no_array(tmp_path: Path):
    """Rows that only name image files give their row group no fingerprint: it is checked image by image on
    every refresh. Its blocks are allocated by its task when it finds images to write, not reserved up front,
    so a nightly refresh of an unchanged dataset leaves the Zarr arrays (and the allocation log) as they were."""
    from pipeline.stores import layout
    from pipeline.stores.zarr_arrays import array_rows

    pics = tmp_path / "ds" / "pics"
    pics.mkdir(parents=True)
    for s in range(10):
        (pics / f"{s}.jpg").write_bytes(_jpeg(s))
    rows = datasets.Dataset.from_dict({"image": [f"pics/{s}.jpg" for s in range(10)], "kind": [s % 3 for s in range(10)]})
    rows.to_parquet(str(tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"))
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'ds'}",
                                            f"store.root={tmp_path}/s", *TINY, "run.local_max_images=1000"])
    store = FeatureStore(run_extract(cfg).store_uri)
    fs, base = store.fs, store.base

    def state() -> tuple[int, int]:
        return array_rows(fs, base, "layer1"), len(fs.ls(layout.allocations_dir(base)))

    before = state()
    assert dry_run(cfg).blocks == 0
    for _ in range(2):
        assert run_refresh(cfg).nothing_changed and state() == before
    (pics / "3.jpg").write_bytes(_jpeg(33))
    summary = run_refresh(cfg)
    assert (summary.changed, summary.extract.encoded, summary.version) == (1, 1, 2)
    assert state()[0] == before[0] + 8  # one block, allocated by the unit's task
    index = FeatureStore(store.uri).index()
    assert len(index) == 10 and np.isfinite(FeatureStore(store.uri).layer("layer1")).all()
