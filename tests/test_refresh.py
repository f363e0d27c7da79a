"""Scheduled refresh: only new or changed images are encoded, deleted ones tombstoned, versions pinnable."""
from __future__ import annotations

import os
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


def _manifest_cfg(manifest, root, *extra):
    return load_config(ExtractConfig, None, ["source.kind=manifest", f"source.uri={manifest}",
                                             f"store.root={root}", *TINY, "run.local_max_images=1000", *extra])


def test_label_and_split_edits_are_data(tmp_path):
    write_shapes(tmp_path / "src", n=20, size=32, seed=9)
    manifest = tmp_path / "src" / "manifest.csv"
    cfg = _manifest_cfg(manifest, tmp_path / "stores")
    first = run_refresh(cfg)
    assert first.version == 1 and first.added == 20
    lines = manifest.read_text().splitlines()
    header, rows = lines[0] + ",split", [line + ",train" for line in lines[1:]]
    rows[3] = rows[3].replace(",train", ",test")
    rows[5] = ",".join([*rows[5].split(",")[:2], "hexagon", *rows[5].split(",")[3:]])
    manifest.write_text("\n".join([header, *rows]) + "\n")
    second = run_refresh(cfg)
    assert (second.version, second.relabeled, second.added, second.changed) == (2, 20, 0, 0)
    assert second.extract is None  # nothing encoded
    v2, v1 = FeatureStore(first.store_uri), FeatureStore(first.store_uri, version=1)
    index = v2.index().set_index("image_id")
    assert index.loc["images/00005.png", "shape"] == "hexagon" and index.loc["images/00003.png", "split"] == "test"
    assert set(index.split) == {"train", "test"}
    assert "split" not in v1.index().columns and "hexagon" not in set(v1.index().shape)
    np.testing.assert_array_equal(v2.layer("layer2"), v1.layer("layer2"))
    assert run_refresh(cfg).nothing_changed


def test_the_dataset_fingerprint_follows_image_content_where_units_have_no_fingerprint(tmp_path):
    """A manifest without a fingerprint column lists units without one: the version's dataset fingerprint then
    stands on the digests their tasks compute, so new pixels under the same path give a new one."""
    write_shapes(tmp_path / "src", n=12, size=32, seed=9)
    write_shapes(tmp_path / "spare", n=12, size=32, seed=4)
    cfg = _manifest_cfg(tmp_path / "src" / "manifest.csv", tmp_path / "stores")
    first = run_refresh(cfg)
    shutil.copy(tmp_path / "spare" / "images" / "00004.png", tmp_path / "src" / "images" / "00003.png")
    second = run_refresh(cfg)
    assert (second.version, second.changed, second.added) == (2, 1, 0)
    v1, v2 = FeatureStore(first.store_uri, version=1), FeatureStore(first.store_uri, version=2)
    assert v1.info.dataset_fingerprint and v2.info.dataset_fingerprint != v1.info.dataset_fingerprint


def test_another_source_naming_the_same_feature_set_is_refused(tmp_path):
    """train.csv and test.csv side by side name the same feature set: the second job must not drop the first's
    images unless told the data moved."""
    from pipeline.config import ConfigError
    from pipeline.extract import run_extract

    write_shapes(tmp_path / "src", n=12, size=32, seed=4)
    lines = (tmp_path / "src" / "manifest.csv").read_text().splitlines()
    (tmp_path / "src" / "train.csv").write_text("\n".join(lines[:9]) + "\n")
    (tmp_path / "src" / "test.csv").write_text("\n".join([lines[0], *lines[9:]]) + "\n")
    first = run_extract(_manifest_cfg(tmp_path / "src" / "train.csv", tmp_path / "stores"))
    with pytest.raises(ConfigError, match=r"built from source manifest:.*train\.csv.*store\.featureset="):
        run_extract(_manifest_cfg(tmp_path / "src" / "test.csv", tmp_path / "stores"))
    assert FeatureStore(first.store_uri).versions() == [1] and len(FeatureStore(first.store_uri)) == 8
    again = run_extract(_manifest_cfg(tmp_path / "src" / "train.csv", tmp_path / "stores"))
    assert "version 1: nothing to encode, 8 images unchanged" in str(again)

    own = run_extract(_manifest_cfg(tmp_path / "src" / "test.csv", tmp_path / "stores", "store.featureset=test"))
    assert len(FeatureStore(own.store_uri)) == 4 and len(FeatureStore(first.store_uri)) == 8
    moved = run_extract(_manifest_cfg(tmp_path / "src" / "test.csv", tmp_path / "stores",
                                      "store.allow_source_change=true"))
    assert moved.store_uri == first.store_uri and moved.deleted == 8 and "8 images gone" in str(moved)
    assert len(FeatureStore(first.store_uri)) == 4


def test_a_relative_source_is_recorded_absolute_so_a_job_elsewhere_finds_the_same_source(tmp_path, monkeypatch):
    """The nightly cron runs from another directory than the person who built the store did."""
    from pipeline.extract import run_extract

    write_shapes(tmp_path / "src", n=6, size=32, seed=6)
    monkeypatch.chdir(tmp_path)
    first = run_extract(_manifest_cfg("src/manifest.csv", "stores"))
    recorded = FeatureStore(str(tmp_path / first.store_uri)).info.config["source"]["uri"]
    assert recorded == str(tmp_path / "src" / "manifest.csv")
    (tmp_path / "cron").mkdir()
    monkeypatch.chdir(tmp_path / "cron")
    again = run_refresh(_manifest_cfg(tmp_path / "src" / "manifest.csv", tmp_path / "stores"))
    assert again.nothing_changed and again.version == 1


def test_a_label_named_like_an_index_column_is_refused_and_a_corrected_rerun_starts_afresh(tmp_path):
    """A manifest column 'status' would have overwritten the index's own; the refused first run leaves no
    metadata that binds the corrected one."""
    import pyarrow as pa

    from pipeline.extract import run_extract
    from pipeline.stores import FeatureStoreWriter, StoreTarget

    write_shapes(tmp_path / "src", n=6, size=32, seed=5)
    manifest = tmp_path / "src" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    (tmp_path / "src" / "m.csv").write_text("\n".join([lines[0] + ",status", *(r + ",bar" for r in lines[1:])]) + "\n")
    with pytest.raises(ValueError, match=r"label column\(s\) \['status'\] collide with index columns"):
        run_extract(_manifest_cfg(tmp_path / "src" / "m.csv", tmp_path / "stores", "store.featureset=fs"))
    assert not (tmp_path / "stores" / "fs").exists()
    # a first run that died after writing the feature set's metadata, with other labels and features
    first = FeatureStoreWriter(StoreTarget(root=str(tmp_path / "stores"), featureset="fs", shard_rows=32,
                                           chunk_rows=16))
    first.prepare(n_rows=0, layer_dims={"layer1": 3}, provenance={"encoder": "other"},
                  labels=pa.schema([("img", pa.string())]))
    good = run_extract(_manifest_cfg(tmp_path / "src" / "m.csv", tmp_path / "stores", "store.featureset=fs",
                                     "source.options={label_columns: [shape]}"))
    store = FeatureStore(good.store_uri)
    assert len(store) == 6 and store.label_columns == ["shape"] and set(store.index()["status"]) == {"ok"}


def test_unknown_source_option_is_refused_with_the_valid_ones(tmp_path):
    from pipeline.config import ConfigError, validate_extract

    cfg = _manifest_cfg(tmp_path / "m.csv", tmp_path / "stores", "source.options={bogus: 1}")
    with pytest.raises(ConfigError, match=r"unknown option 'bogus' for source kind 'manifest'.*'uri_column'"):
        validate_extract(cfg)


@pytest.mark.slow
def test_resume_and_refresh_from_another_install(tmp_path):
    """A store made by one copy of strata (its weights at one path) is resumed and refreshed by another copy
    in another directory, with the same weights at another path: the same feature set, nothing re-encoded."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    import torchvision
    import yaml

    repo = Path(__file__).resolve().parents[1]
    installs = []
    for name in ("install-a", "install-b"):
        copy = tmp_path / name
        for pkg in ("pipeline", "jobs"):
            shutil.copytree(repo / pkg, copy / pkg, ignore=shutil.ignore_patterns("__pycache__"))
        (copy / "weights").mkdir()
        installs.append(copy)
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), installs[0] / "weights" / "r18.pth")
    shutil.copy(installs[0] / "weights" / "r18.pth", installs[1] / "weights" / "r18.pth")
    write_shapes(tmp_path / "src", n=40, size=32, seed=6)
    images = tmp_path / "src" / "images"
    (images / "broken.png").write_bytes(b"not a png")

    def run(install: Path, command: str, **store) -> subprocess.CompletedProcess:
        cfg = {"source": {"kind": "folder", "uri": str(images)},
               "encoder": {**yaml.safe_load(TINY_YAML), "weights": str(install / "weights" / "r18.pth")},
               "store": {"root": str(tmp_path / "stores"), "shard_rows": 16, "chunk_rows": 16},
               "run": {"local_max_images": 1000, **store}}
        (install / "job.yaml").write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(install), "STRATA_CACHE_DIR": str(install / "cache")}
        return subprocess.run([sys.executable, "-m", f"jobs.{command}", "--config", str(install / "job.yaml")],
                              cwd=install, env=env, capture_output=True, text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=installs[1],
                           env={**os.environ, "PYTHONPATH": str(installs[1])}, capture_output=True, text=True)
    assert where.stdout.startswith(str(installs[1]))
    failed = run(installs[0], "extract", max_error_fraction=0.0)  # one bad image: stops before publishing
    assert failed.returncode != 0 and "nothing was published" in failed.stderr + failed.stdout
    (featureset,) = (tmp_path / "stores").iterdir()
    written = len(list(featureset.glob("_manifest/shards/*.json")))
    assert written == 3 and not (featureset / "_manifest" / "versions").exists()

    resumed = run(installs[1], "extract", max_error_fraction=0.1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 shards already written" in resumed.stdout + resumed.stderr
    store = FeatureStore(str(featureset))
    assert store.versions() == [1] and len(store) == 40
    assert store.provenance["weights_source"].startswith(str(installs[0]))

    shutil.copy(images / "00001.png", images / "extra.png")
    refreshed = run(installs[1], "refresh", max_error_fraction=0.1)
    assert refreshed.returncode == 0, refreshed.stderr[-3000:]
    assert "1 added" in refreshed.stdout and [p.name for p in (tmp_path / "stores").iterdir()] == [featureset.name]
    assert FeatureStore(str(featureset)).versions() == [1, 2] and len(FeatureStore(str(featureset))) == 41


TINY_YAML = """
name: resnet18
layers: [layer1, layer2]
preprocessing: {resize_size: 32, crop_size: 32, interpolation: bilinear, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
"""


def test_error_budget_is_over_the_dataset_not_only_what_a_refresh_encodes(dataset, tmp_path):
    """One corrupt image added to 80 good ones: 1 of 81 (1.2%), not '1 of 1 images failed (100%)' every night."""
    from pipeline.extract.sink import ErrorBudgetExceeded

    images, _ = dataset
    line = ["source.kind=folder", f"source.uri={images}", f"store.root={tmp_path / 'stores'}", *TINY,
            "run.local_max_images=1000"]
    assert run_refresh(load_config(ExtractConfig, None, line)).version == 1
    (images / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ErrorBudgetExceeded, match=r"1 of 1 images failed \(1\.2% of the 81 images the job leaves\)"):
        run_refresh(load_config(ExtractConfig, None, [*line, "run.max_error_fraction=0.01"]))
    out = run_refresh(load_config(ExtractConfig, None, [*line, "run.max_error_fraction=0.05"]))
    assert out.version == 2
    assert "zz-corrupt.png" not in set(FeatureStore(out.store_uri).index().image_id)


def test_a_label_that_changes_kind_is_refused_naming_the_column(tmp_path):
    """A numeric label column that now holds text: one line naming the column, its type and the ways out, before
    any work (was pyarrow's "Could not convert '0' with type str"); integers read back as floats are fine."""
    from pipeline.config import ConfigError

    write_shapes(tmp_path / "src", n=12, size=32, seed=9)
    manifest = tmp_path / "src" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([lines[0] + ",score", *[f"{line},{k}" for k, line in enumerate(lines[1:])]]) + "\n")
    cfg = _manifest_cfg(manifest, tmp_path / "stores")
    assert run_refresh(cfg).version == 1
    as_floats = [lines[0] + ",score", *[f"{line},{k}.0" for k, line in enumerate(lines[1:])]]
    manifest.write_text("\n".join(as_floats) + "\n")
    same = run_refresh(cfg)  # 3.0 is the 3 the store holds: a version records the new listing, no image changes
    assert (same.added, same.changed, same.deleted, same.relabeled, same.version) == (0, 0, 0, 0, 2)
    assert "no image changed" in str(same)
    manifest.write_text("\n".join([*as_floats[:-1], as_floats[-1].replace(",11.0", ",high")]) + "\n")
    with pytest.raises((ValueError, ConfigError), match=r"label column 'score' holds int64 in feature set .*, and the "
                                                        r"source now gives string values; a store keeps each label's"):
        run_refresh(cfg)
    manifest.write_text("\n".join([*as_floats[:-1], as_floats[-1].replace(",11.0", ",11.5")]) + "\n")
    with pytest.raises(ValueError, match=r"label column 'score' holds int64 in this feature set, and the source now "
                                         r"gives 11.5"):
        run_refresh(cfg)
    store = FeatureStore(str(next((tmp_path / "stores").iterdir())))
    assert store.versions() == [1, 2]  # 2: the manifest's new listing state, its data as in 1; nothing after
    assert sorted(store.index()["score"]) == list(range(12))
