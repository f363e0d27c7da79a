"""Distributed extraction on a real local Ray: every image exactly once or in the errors table."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, ExtractConfig, load_config
from pipeline.encoders import build_encoder
from pipeline.extract import run_extract
from pipeline.images import decode_rgb
from pipeline.sources.demo import write_shapes
from pipeline.stores import FeatureStore

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1,layer3]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "encoder.batch_size=32",
        "store.shard_rows=64", "store.chunk_rows=16"]
BAD = {"bad/truncated.png", "bad/empty.png", "bad/not_an_image.png", "bad/bomb.png"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """About 200 rendered demo images plus one of each kind of broken file."""
    root = tmp_path_factory.mktemp("data")
    write_shapes(root / "shapes", n=196, size=40, seed=1)
    folder = root / "shapes" / "images"
    bad = folder / "bad"
    bad.mkdir()
    good = (folder / "00000.png").read_bytes()
    (bad / "truncated.png").write_bytes(good[: len(good) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "not_an_image.png").write_bytes(b"this is text, not pixels\n" * 10)
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    (bad / "bomb.png").write_bytes(buf.getvalue())
    return folder


def _config(source_uri, store_root, *extra, storage_options=None):
    cfg = load_config(ExtractConfig, None, ["source.kind=folder", f"source.uri={source_uri}",
                                            f"store.root={store_root}", "run.max_image_pixels=100000000",
                                            "run.max_error_fraction=0.05", *TINY, *extra])
    if storage_options:
        from dataclasses import replace

        cfg = replace(cfg, store=replace(cfg.store, storage_options=storage_options))
    return cfg


def _reference(cfg, store, ids, source_root):
    enc = build_encoder(cfg.encoder, device="cpu")
    px = enc.preprocessing.batch([decode_rgb((source_root / i).read_bytes()) for i in ids])
    return {k: v.numpy().astype(np.float16).astype(np.float32) for k, v in enc.encode(px).items()}


def _check_store(cfg, store: FeatureStore, images):
    listed = sorted(str(p.relative_to(images)) for p in images.rglob("*.png"))
    index = store.index()
    errors = store.errors().to_pandas()
    stored = list(index.image_id)
    assert len(stored) == len(set(stored))
    assert sorted(stored + list(errors.image_id)) == listed  # every image exactly once
    assert set(errors.image_id) == BAD
    reasons = dict(zip(errors.image_id, errors.reason))
    assert reasons["bad/empty.png"] == "empty file"
    assert reasons["bad/bomb.png"].startswith("decompression bomb")
    sample = stored[::17]
    ref = _reference(cfg, store, sample, images)
    for layer in ref:
        np.testing.assert_allclose(store.get(sample, layer), ref[layer], rtol=2e-2, atol=2e-3)
    return index


def test_extract_local_store(ray_local, images, tmp_path):
    cfg = _config(str(images), str(tmp_path / "stores"), "run.max_image_pixels=100000000")
    summary = run_extract(cfg)
    assert summary.version == 1 and summary.images == 200 and summary.errors == 4
    store = FeatureStore(summary.store_uri)
    index = _check_store(cfg, store, images)
    # folder labels: only the 'bad' subfolder has one, and none of its files made it into the store
    assert store.label_columns == ["label"] and index["label"].isna().all()
    # Zarr and Parquet agree
    import pyarrow.dataset as ds

    t = ds.dataset(f"{summary.store_uri}/parquet/layer=layer3", format="parquet").to_table().sort_by("row")
    vec = np.stack(t.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_array_equal(vec, store.layer("layer3"))
    assert store.provenance["preprocessing"]["crop_size"] == 32

    # a re-run finds nothing changed and publishes nothing new
    again = run_extract(cfg)
    assert again.version == 1 and again.encoded == 0 and again.images == 0
    assert store.versions() == [1]


def test_encoder_cpus_leave_room_for_decode_and_write_tasks():
    from pipeline.extract.run import encoder_cpus

    assert encoder_cpus(16, 4) == 1.0
    assert encoder_cpus(2, 1) == 1.0
    assert encoder_cpus(2, 2) == 0.5  # two whole CPUs would starve the decode tasks: the job would hang
    assert encoder_cpus(1, 1) == 0.0


@pytest.mark.timeout(300)
def test_as_many_encoders_as_cpus_still_finishes(ray_local, images, tmp_path):
    # the local Ray has 2 CPUs; 2 encoder actors holding one each used to leave decode waiting forever
    cfg = _config(str(images), str(tmp_path / "stores"), "run.num_encoders=2")
    summary = run_extract(cfg)
    assert summary.images == 200 and summary.encoded == 196 and summary.errors == 4


def test_extract_from_parquet_bytes(ray_local, images, tmp_path):
    """An HF-style Parquet export (image bytes in row groups) through the Ray pipeline, bad rows included."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(images.rglob("*.png"))[:90] + [images / "bad" / "truncated.png"]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [{"bytes": p.read_bytes(), "path": str(p.relative_to(images))} for p in paths] + [None]
    table = pa.table({"image": pa.array(rows, type=image_type), "shape": [p.parent.name for p in paths] + ["x"]})
    pq.write_table(table, str(tmp_path / "train.parquet"), row_group_size=16)
    cfg = _config(str(tmp_path / "train.parquet"), str(tmp_path / "stores"), "source.kind=parquet",
                  "run.max_error_fraction=0.1", "run.local_max_images=0")
    summary = run_extract(cfg)
    store = FeatureStore(summary.store_uri)
    errors = store.errors().to_pandas()
    assert summary.images == 92 and summary.errors == 2
    # a null image has no path, so ids fall back to <file stem>/<row> for every row
    assert dict(zip(errors.image_id, errors.stage)) == {"train/90": "decode", "train/91": "decode"}
    stored = list(store.index().image_id)
    assert sorted(stored, key=lambda i: int(i.split("/")[1])) == [f"train/{i}" for i in range(90)]
    assert list(store.index().set_index("image_id").loc[["train/3", "train/40"], "shape"]) == \
        [paths[3].parent.name, paths[40].parent.name]
    sample = stored[::11]
    files = {f"train/{i}": p for i, p in enumerate(paths)}
    enc = build_encoder(cfg.encoder, device="cpu")
    px = enc.preprocessing.batch([decode_rgb(files[i].read_bytes()) for i in sample])
    for layer, ref in enc.encode(px).items():
        np.testing.assert_allclose(store.get(sample, layer), ref.numpy().astype(np.float16).astype(np.float32),
                                   rtol=2e-2, atol=2e-3)


@pytest.mark.s3
def test_extract_to_s3(ray_local, images, s3_bucket):
    cfg = _config(str(images), s3_bucket.url("features"), storage_options=s3_bucket.storage_options)
    summary = run_extract(cfg)
    assert summary.store_uri.startswith("s3://")
    store = FeatureStore(summary.store_uri, storage_options=s3_bucket.storage_options)
    _check_store(cfg, store, images)


def test_error_budget_stops_the_job_and_keeps_committed_shards(ray_local, images, tmp_path):
    cfg = _config(str(images), str(tmp_path / "stores"), "run.max_error_fraction=0.01")
    with pytest.raises(Exception, match=r"4 of 200 images failed|images failed so far") as info:
        run_extract(cfg)
    assert "errors/*.parquet" in str(info.value)
    (featureset,) = (tmp_path / "stores").iterdir()
    written = list(featureset.glob("_manifest/shards/*.json"))
    assert written  # shards written before the stop stay, and a re-run would skip them
    assert not (featureset / "_manifest" / "versions").exists()  # nothing was published


def test_a_missing_source_is_named_by_its_key(tmp_path):
    from pipeline.config import SourceSpec
    from pipeline.extract.plan import list_units

    for kind in ("manifest", "folder"):
        with pytest.raises(FileNotFoundError, match=r"source.uri: .*nope.csv not found"):
            list_units(SourceSpec(kind=kind, uri=str(tmp_path / "nope.csv")))


def test_bad_config_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="unknown layer 'layer9'"):
        run_extract(_config(str(tmp_path), str(tmp_path / "s"), "encoder.layers=[layer9]"))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\] in store; valid"):
        load_config(ExtractConfig, None, ["store.colour=red"])
    with pytest.raises(ConfigError, match="multiple of store.chunk_rows"):
        run_extract(_config(str(tmp_path), str(tmp_path / "s"), "store.chunk_rows=48"))
    assert not (tmp_path / "s").exists()


def test_decode_and_gpu_settings_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"run.decode: 'quick' is not a valid choice; valid: \['exact', 'fast'\]"):
        run_extract(_config(str(tmp_path), str(tmp_path / "s"), "run.decode=quick"))
    for bad in ("1.5", "-1"):
        with pytest.raises(ConfigError, match="run.gpus_per_encoder must be 0, a fraction of one GPU"):
            run_extract(_config(str(tmp_path), str(tmp_path / "s"), f"run.gpus_per_encoder={bad}"))
    from pipeline.config import validate_extract

    for good in ("0.25", "0.5", "2"):
        validate_extract(_config(str(tmp_path), str(tmp_path / "s"), f"run.gpus_per_encoder={good}"))


def test_fast_decode_makes_its_own_feature_set(images, tmp_path):
    """Features that differ slightly never land in the exact path's feature set; the exact one keeps its name."""
    exact_cfg = _config(str(images), str(tmp_path / "stores"), "run.local_max_images=100000")
    fast_cfg = _config(str(images), str(tmp_path / "stores"), "run.local_max_images=100000", "run.decode=fast")
    from pipeline.extract.plan import build_target
    from pipeline.extract.run import prepare_encoder
    from pipeline.stores import featureset_name

    exact_provenance = prepare_encoder(exact_cfg).provenance()
    assert "decode" not in exact_provenance["preprocessing"]
    assert build_target(exact_cfg, exact_provenance).featureset == featureset_name(
        "shapes", exact_provenance, "float16")
    summary = run_extract(fast_cfg)  # in the driver: no Ray start-up for a test of names
    store = FeatureStore(summary.store_uri)
    assert store.provenance["preprocessing"]["decode"] == "fast"
    assert store.summary()["featureset"] != build_target(exact_cfg, exact_provenance).featureset
    index = _check_store(fast_cfg, store, images)  # within the tolerance of the exact reference
    assert len(index) == 196


def test_store_as_ray_dataset(ray_local, images, tmp_path):
    from pipeline.extract.datasets import read_layer

    summary = run_extract(_config(str(images), str(tmp_path / "stores")))
    store = FeatureStore(summary.store_uri)
    rows = read_layer(store, "layer1").take_all()
    assert len(rows) == 196
    by_id = {r["image_id"]: r for r in rows}
    some = store.index().image_id[:5].tolist()
    np.testing.assert_array_equal(np.stack([np.asarray(by_id[i]["vector"], np.float32) for i in some]),
                                  store.get(some, "layer1"))
    assert all("label" in r for r in rows[:3])


def test_stale_encoder_card_is_refused_before_any_shard_is_written(ray_local, images, tmp_path, monkeypatch):
    """A card that no longer matches what the workers build (weights changed behind its back) stops the job."""
    import json

    from pipeline.encoders.card import CACHE_ENV, _card_path, save_card

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cfg = _config(str(images), str(tmp_path / "stores"), "run.local_max_images=0")
    path = save_card(cfg.encoder, build_encoder(cfg.encoder, device="cpu"))
    data = json.loads(path.read_text())
    data["card"]["provenance"]["weights_sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    assert path == _card_path(cfg.encoder)
    with pytest.raises(Exception, match="differs from the one the driver planned"):
        run_extract(cfg)
    assert not list((tmp_path / "stores").glob("*/_manifest/shards/*.json"))


def test_decode_threads_run_nicer_than_their_caller():
    import os
    import threading

    from pipeline.extract.stages import lower_thread_priority

    if not hasattr(os, "setpriority"):
        pytest.skip("no per-thread priorities on this platform")
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = {}

    def decode_thread():
        lower_thread_priority(5)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=decode_thread)
    thread.start()
    thread.join()
    assert seen["nice"] == min(19, base + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    with pytest.raises(ConfigError, match=r"decode_niceness must be within \[0, 19\]"):
        run_extract(_config("/nowhere", "/nowhere", "run.decode_niceness=40"))


def test_float16_overflow_stops_before_writing_and_float32_holds_it(tmp_path):
    """An encoder whose activations exceed float16's range: refused with the layer named, nothing published."""
    import torch
    import torchvision

    from pipeline.stores import FeatureOverflowError

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    state["conv1.weight"] = state["conv1.weight"] * 1e6  # activations far beyond +-65504
    ckpt = tmp_path / "loud.pth"
    torch.save(state, ckpt)
    write_shapes(tmp_path / "src", n=12, size=32, seed=4)
    overrides = ["encoder.weights=" + str(ckpt), "run.local_max_images=1000"]
    cfg = _config(str(tmp_path / "src" / "images"), str(tmp_path / "stores"), *overrides)
    with pytest.raises(FeatureOverflowError, match=r"layer 'layer1' has activations up to .*store.dtype=float32"):
        run_extract(cfg)
    assert not list((tmp_path / "stores").glob("*/_manifest/versions/*.json"))
    assert not list((tmp_path / "stores").glob("*/index/*.parquet"))
    summary = run_extract(_config(str(tmp_path / "src" / "images"), str(tmp_path / "stores"), *overrides,
                                  "store.dtype=float32"))
    store = FeatureStore(summary.store_uri)
    assert store.meta["dtype"] == "float32" and np.isfinite(store.layer("layer1")).all()
    assert np.abs(store.layer("layer1")).max() > 65504


def test_decoding_in_the_encoder_gives_the_same_store(ray_local, images, tmp_path):
    """run.decode_in=encoder: blocks travel without pixels and the actor decodes them batch by batch."""
    base = _config(str(images), str(tmp_path / "a"), "run.local_max_images=0", "encoder.batch_size=16")
    deferred = _config(str(images), str(tmp_path / "b"), "run.local_max_images=0", "encoder.batch_size=16",
                       "run.decode_in=encoder")
    a, b = FeatureStore(run_extract(base).store_uri), FeatureStore(run_extract(deferred).store_uri)
    assert list(a.index().image_id) == list(b.index().image_id) and len(a) == 196
    assert sorted(a.errors().column("image_id").to_pylist()) == sorted(b.errors().column("image_id").to_pylist())
    for layer in a.layers:
        np.testing.assert_array_equal(a.layer(layer), b.layer(layer))
