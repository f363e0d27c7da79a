"""Feature store: concurrent whole-block writes, versions, the reader, plain-tool reads, compatibility."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import storage
from pipeline.stores import FeatureStore, FeatureStoreWriter, NoCommittedVersionError, label_schema
from pipeline.stores.job import BlockTask
from storekit import LAYERS, PROVENANCE, encoded, expected, job, records, target

N_ROWS = 300  # 5 blocks of 64 rows: the last one partial


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "stores"), {}
    bucket = request.getfixturevalue("s3_bucket")
    return bucket.url("stores"), bucket.storage_options


def _check_vectors(store: FeatureStore, dtype=np.float16) -> None:
    index = store.index()
    for layer, dim in LAYERS.items():
        want = np.stack([expected(i, fp, dim, dtype) for i, fp in zip(index.image_id, index.fingerprint)])
        np.testing.assert_array_equal(store.layer(layer), want)


def test_concurrent_block_writes_keep_every_row(root):
    uri, so = root
    recs = records(N_ROWS)
    bad = {"img-0003", "img-0064", "img-0299"}
    t = target(uri, so)
    outcome = job(t, recs, bad=bad, processes=3)  # writers in separate processes, each owning whole blocks
    assert outcome.version == 1 and len(outcome.written) == 5
    store = FeatureStore(t.uri, storage_options=so)
    index = store.index()
    assert len(index) == N_ROWS - len(bad)
    assert set(index.image_id) == {r["image_id"] for r in recs} - bad
    _check_vectors(store)
    assert sorted(store.errors().column("image_id").to_pylist()) == sorted(bad)
    assert store.labels("digit").tolist() == [int(i[4:]) % 10 for i in index.image_id]


def test_zarr_and_parquet_agree_and_plain_zarr_reads(root):
    uri, so = root
    t = target(uri, so)
    job(t, records(N_ROWS))
    import pyarrow.dataset as ds
    import zarr

    group = zarr.open_group(storage.zarr_store(f"{t.uri}/features.zarr", so, read_only=True), mode="r")
    assert group.attrs["provenance"]["encoder"] == "toy"
    zlate = group["late"][:]
    assert zlate.dtype == np.float16 and zlate.shape == (5 * 64, 24)  # whole blocks; rows past the data are NaN
    fs, base = storage.resolve(t.uri, so)
    late = ds.dataset(f"{base}/parquet/layer=late", filesystem=fs, format="parquet").to_table().sort_by("row")
    vec = np.stack(late.column("vector").to_numpy(zero_copy_only=False)).astype(np.float16)
    np.testing.assert_array_equal(vec, zlate[late.column("row").to_numpy()])


def test_written_blocks_are_invisible_until_committed(tmp_path):
    t = target(str(tmp_path / "s"))
    writer = FeatureStoreWriter(t)
    recs = records(64)
    writer.prepare(n_rows=128, layer_dims=LAYERS, provenance=PROVENANCE, labels=label_schema(recs))
    from pipeline.stores import shard_plan_hash

    writer.write_shard(encoded(BlockTask(0, 0, tuple(recs), shard_plan_hash(recs))))
    with pytest.raises(NoCommittedVersionError):
        FeatureStore(t.uri)
    assert job(t, records(10, prefix="other")).version == 1
    assert set(FeatureStore(t.uri).index().image_id) == {f"other-{i:04d}" for i in range(10)}


def test_rewriting_a_block_writes_the_same_bytes(tmp_path):
    t = target(str(tmp_path / "s"))
    writer = FeatureStoreWriter(t)
    recs = records(64)
    writer.prepare(n_rows=64, layer_dims=LAYERS, provenance=PROVENANCE, labels=label_schema(recs))
    from pipeline.stores import shard_plan_hash

    shard = encoded(BlockTask(0, 0, tuple(recs), shard_plan_hash(recs)))
    writer.write_shard(shard)
    files = lambda: {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "s").rglob("*")  # noqa: E731
                     if p.is_file() and "shards" not in p.parts}
    first = files()
    writer.write_shard(shard)
    assert files() == first
    with pytest.raises(ValueError, match="block 1 must start at row 64"):
        writer.write_shard(encoded(BlockTask(1, 0, tuple(recs), shard_plan_hash(recs))))


def test_versions_are_pinnable_and_errors_name_the_choices(tmp_path):
    t = target(str(tmp_path / "s"))
    job(t, records(128))
    job(t, records(300), operation="refresh")
    assert len(FeatureStore(t.uri)) == 300
    assert len(FeatureStore(t.uri, version=1)) == 128
    with pytest.raises(ValueError, match=r"version 9 not found; committed versions: \[1, 2\]"):
        FeatureStore(t.uri, version=9)
    store = FeatureStore(t.uri)
    with pytest.raises(ValueError, match=r"layer 'mid' not in this feature set; layers: \['early', 'late'\]"):
        store.layer("mid")
    with pytest.raises(ValueError, match="unknown label column 'colour'; label columns"):
        store.labels("colour")
    with pytest.raises(FileNotFoundError, match="no strata feature set"):
        FeatureStore(str(tmp_path / "nothing"))
    np.testing.assert_array_equal(store.get(["img-0010", "img-0002"], "early"), store.layer("early")[[10, 2]])


def test_other_features_are_refused_but_not_another_weights_path(tmp_path):
    t = target(str(tmp_path / "s"))
    job(t, records(10))
    writer = FeatureStoreWriter(t)
    recs = records(10)
    with pytest.raises(ValueError, match="already holds other features .provenance encoder differs"):
        writer.prepare(n_rows=0, layer_dims=LAYERS, provenance={**PROVENANCE, "encoder": "other"},
                       labels=label_schema(recs))
    with pytest.raises(ValueError, match="already holds other features .dtype differs"):
        FeatureStoreWriter(target(str(tmp_path / "s"), dtype="float32")).prepare(
            n_rows=0, layer_dims=LAYERS, provenance=PROVENANCE, labels=label_schema(recs))
    # the same weights found at another path (another venv, another machine) are the same features
    writer.prepare(n_rows=0, layer_dims=LAYERS, provenance={**PROVENANCE, "weights_source": "/elsewhere/w.pth"},
                   labels=label_schema(recs))


def test_parquet_only_store_reads_the_same(tmp_path):
    t = target(str(tmp_path / "p"), formats=("parquet",), dtype="float32")
    job(t, records(N_ROWS), bad={"img-0005"})
    store = FeatureStore(t.uri)
    _check_vectors(store, np.float32)
    assert store.get(["img-0007"], "late").shape == (1, 24)
    assert not (tmp_path / "p" / "fs1" / "features.zarr").exists()


def test_layers_come_back_in_network_order(tmp_path):
    t = target(str(tmp_path / "s"))
    job(t, records(4), provenance={**PROVENANCE, "layers": ["late", "early"]})  # not alphabetical
    store = FeatureStore(t.uri)
    assert store.layers == ["late", "early"] and list(store.layer_dims) == ["late", "early"]


def test_float16_overflow_is_refused_before_the_block_is_written(tmp_path):
    from pipeline.stores import FeatureOverflowError

    t = target(str(tmp_path / "s"))
    with pytest.raises(FeatureOverflowError, match=r"layer 'early' has activations up to .* store.dtype=float32"):
        job(t, records(10), scale=1e6)
    assert not list((tmp_path / "s" / "fs1").glob("index/*.parquet"))
    assert not (tmp_path / "s" / "fs1" / "_manifest" / "versions").exists()
    t32 = target(str(tmp_path / "s"), featureset="fs32", dtype="float32")
    job(t32, records(10), scale=1e6)
    assert np.isfinite(FeatureStore(t32.uri).layer("late")).all()
