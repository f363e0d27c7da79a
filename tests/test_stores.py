"""Feature store: concurrent whole-shard writes, commit protocol, versions, reader, plain-tool reads."""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from pipeline.stores import (
    EncodedShard,
    FeatureStore,
    FeatureStoreWriter,
    NoCommittedVersionError,
    StoreTarget,
    label_schema,
    shard_plan_hash,
)

LAYERS = {"early": 8, "late": 24}
N_ROWS = 300  # 5 shards of 64 rows: the last one partial


def _records(n=N_ROWS):
    return [{"image_id": f"img-{i:04d}", "uri": f"file:///data/img-{i:04d}.png", "fingerprint": f"sha256:{i}",
             "split": None, "labels": {"digit": i % 10, "parity": "even" if i % 2 == 0 else "odd"}}
            for i in range(n)]


def _features(row: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(row * 1000 + dim + seed).normal(size=dim).astype(np.float32)


def _shard(records, shard_id, shard_rows, *, bad=(), seed=0):
    start = shard_id * shard_rows
    recs = records[start:start + shard_rows]
    ok = np.array([start + i not in bad for i in range(len(recs))])
    feats = {layer: np.stack([_features(start + i, dim, seed) for i in np.flatnonzero(ok)] or
                             [np.zeros(dim, np.float32)])[: ok.sum()] for layer, dim in LAYERS.items()}
    errors = [{"image_id": r["image_id"], "uri": r["uri"], "stage": "decode", "reason": "truncated"}
              for i, r in enumerate(recs) if not ok[i]]
    return EncodedShard(shard_id, start, recs, ok, feats, errors, shard_plan_hash(recs))


def _target(root, storage_options=None, **kw):
    return StoreTarget(root=root, featureset="fs1", storage_options=storage_options or {},
                       shard_rows=64, chunk_rows=16, **kw)


def _write_one(target, shard):
    return FeatureStoreWriter(target).write_shard(shard)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "stores"), {}
    bucket = request.getfixturevalue("s3_bucket")
    return bucket.url("stores"), bucket.storage_options


def _write_store(root, storage_options, *, bad=(), formats=("zarr", "parquet"), dtype="float16"):
    records = _records()
    target = _target(root, storage_options, formats=formats, dtype=dtype)
    writer = FeatureStoreWriter(target)
    writer.prepare(n_rows=len(records), layer_dims=LAYERS, provenance={"encoder": "toy"},
                   labels=label_schema(records))
    shards = [_shard(records, s, 64, bad=bad) for s in range(5)]
    # concurrent writers in separate processes, each owning whole shards
    with cf.ProcessPoolExecutor(max_workers=3) as pool:
        list(pool.map(_write_one, [target] * len(shards), shards))
    version = writer.commit_version(range(5), dataset_fingerprint="fp", config={"k": 1})
    return target, records, version


def test_concurrent_shard_writes_keep_every_row(root):
    uri, so = root
    bad = {3, 64, 299}
    target, records, version = _write_store(uri, so, bad=bad)
    store = FeatureStore(target.uri, storage_options=so)
    assert store.version == version == 1
    index = store.index()
    assert len(index) == N_ROWS - len(bad)
    assert set(index.image_id) == {r["image_id"] for i, r in enumerate(records) if i not in bad}
    for layer, dim in LAYERS.items():
        feats = store.layer(layer)
        assert feats.shape == (N_ROWS - len(bad), dim)
        expected = np.stack([_features(int(r), dim, 0) for r in index.row])
        np.testing.assert_allclose(feats, expected.astype(np.float16).astype(np.float32))
    errs = store.errors()
    assert sorted(errs.column("image_id").to_pylist()) == sorted(records[i]["image_id"] for i in bad)
    assert store.labels("digit").tolist() == [int(r) % 10 for r in index.row]


def test_zarr_and_parquet_agree_and_plain_tools_read(root):
    uri, so = root
    target, records, _ = _write_store(uri, so)
    import zarr

    from pipeline import storage

    zstore = storage.zarr_store(f"{target.uri}/features.zarr", so, read_only=True)
    group = zarr.open_group(zstore, mode="r")
    assert group.attrs["provenance"]["encoder"] == "toy"
    zlate = group["late"][:]
    assert zlate.dtype == np.float16 and zlate.shape == (N_ROWS, 24)

    import pyarrow.dataset as ds

    fs, base = storage.resolve(target.uri, so)
    # one layer per dataset: each layer's vectors have their own fixed size
    late = ds.dataset(f"{base}/parquet/layer=late", filesystem=fs, format="parquet").to_table().sort_by("row")
    vec = np.stack(late.column("vector").to_numpy(zero_copy_only=False)).astype(np.float16)
    np.testing.assert_array_equal(vec, zlate[late.column("row").to_numpy()])


def test_duckdb_reads_local_store(tmp_path):
    import duckdb

    target, _, _ = _write_store(str(tmp_path / "s"), {})
    base = target.uri
    n = duckdb.sql(f"select count(*) from read_parquet('{base}/parquet/*/*.parquet', hive_partitioning=true) "
                   "where layer = 'early'").fetchall()[0][0]
    assert n == N_ROWS
    joined = duckdb.sql(
        f"select i.digit, len(p.vector) from read_parquet('{base}/parquet/*/*.parquet', hive_partitioning=true) p "
        f"join read_parquet('{base}/index/*.parquet') i using (image_id) where p.layer = 'late' limit 1").fetchall()[0]
    assert joined[1] == 24


def test_uncommitted_shards_are_invisible(tmp_path):
    records = _records()
    target = _target(str(tmp_path / "s"))
    writer = FeatureStoreWriter(target)
    writer.prepare(n_rows=N_ROWS, layer_dims=LAYERS, provenance={"encoder": "toy"}, labels=label_schema(records))
    writer.write_shard(_shard(records, 0, 64))
    with pytest.raises(NoCommittedVersionError):
        FeatureStore(target.uri)
    writer.commit_version([0], dataset_fingerprint="a", config={})
    writer.write_shard(_shard(records, 1, 64))
    assert len(FeatureStore(target.uri)) == 64  # shard 1 written but not in a version


def test_rewriting_a_shard_is_harmless_and_identical(tmp_path):
    records = _records()
    target = _target(str(tmp_path / "s"))
    writer = FeatureStoreWriter(target)
    writer.prepare(n_rows=N_ROWS, layer_dims=LAYERS, provenance={"encoder": "toy"}, labels=label_schema(records))
    shard = _shard(records, 2, 64)
    writer.write_shard(shard)
    first = {p.name: p.read_bytes() for p in (tmp_path / "s" / "fs1").rglob("*") if p.is_file()
             and "shards" not in str(p)}
    writer.write_shard(shard)
    second = {p.name: p.read_bytes() for p in (tmp_path / "s" / "fs1").rglob("*") if p.is_file()
              and "shards" not in str(p)}
    assert first == second


def test_versions_are_pinnable(tmp_path):
    records = _records()
    target = _target(str(tmp_path / "s"))
    writer = FeatureStoreWriter(target)
    writer.prepare(n_rows=N_ROWS, layer_dims=LAYERS, provenance={"encoder": "toy"}, labels=label_schema(records))
    for s in range(5):
        writer.write_shard(_shard(records, s, 64))
    v1 = writer.commit_version([0, 1], dataset_fingerprint="a", config={})
    v2 = writer.commit_version(range(5), dataset_fingerprint="b", config={})
    assert len(FeatureStore(target.uri)) == N_ROWS
    assert len(FeatureStore(target.uri, version=v1)) == 128
    with pytest.raises(ValueError, match=r"version 9 not found; committed versions: \[1, 2\]"):
        FeatureStore(target.uri, version=9)
    assert v2 == 2


def test_other_features_cannot_be_mixed_in(tmp_path):
    records = _records()
    writer = FeatureStoreWriter(_target(str(tmp_path / "s")))
    writer.prepare(n_rows=N_ROWS, layer_dims=LAYERS, provenance={"encoder": "toy"}, labels=label_schema(records))
    with pytest.raises(ValueError, match="already holds other features"):
        writer.prepare(n_rows=N_ROWS, layer_dims=LAYERS, provenance={"encoder": "other"},
                       labels=label_schema(records))


def test_parquet_only_store_reads_the_same(tmp_path):
    target, _, _ = _write_store(str(tmp_path / "p"), {}, formats=("parquet",), dtype="float32")
    store = FeatureStore(target.uri)
    index = store.index()
    np.testing.assert_allclose(store.layer("early"), np.stack([_features(int(r), 8, 0) for r in index.row]))
    assert store.get(["img-0007"], "late").shape == (1, 24)


def test_reader_errors_name_the_choices(tmp_path):
    target, _, _ = _write_store(str(tmp_path / "s"), {})
    store = FeatureStore(target.uri)
    with pytest.raises(ValueError, match=r"layer 'mid' not in this feature set; layers: \['early', 'late'\]"):
        store.layer("mid")
    with pytest.raises(ValueError, match="unknown label column 'colour'; label columns"):
        store.labels("colour")
    with pytest.raises(FileNotFoundError, match="no strata feature set"):
        FeatureStore(str(tmp_path / "nothing"))
    np.testing.assert_array_equal(store.get(["img-0010", "img-0002"], "early"),
                                  store.layer("early")[[10, 2]])


def test_layers_come_back_in_network_order(tmp_path):
    records = _records(64)
    target = _target(str(tmp_path / "s"))
    writer = FeatureStoreWriter(target)
    dims = {"layer_b": 8, "layer_a": 24}  # network order is not alphabetical
    writer.prepare(n_rows=64, layer_dims=dims, provenance={"encoder": "toy", "layers": list(dims)},
                   labels=label_schema(records))
    writer.write_shard(EncodedShard(0, 0, records, np.ones(64, bool),
                                    {k: np.zeros((64, d), np.float32) for k, d in dims.items()}, [],
                                    shard_plan_hash(records)))
    writer.commit_version([0], dataset_fingerprint="x", config={})
    store = FeatureStore(target.uri)
    assert store.layers == ["layer_b", "layer_a"] and list(store.layer_dims) == ["layer_b", "layer_a"]
