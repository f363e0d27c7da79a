"""Retention: compaction reclaims mostly-deleted blocks; old versions go; kept ones stay byte-identical."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import storage
from pipeline.cli import main
from pipeline.stores import FeatureStore, FeatureStoreWriter, allocate, shard_plan_hash
from pipeline.stores.job import BlockTask
from pipeline.stores.retention import retain
from storekit import LAYERS, encoded, expected, job, records, target


def _store(tmp_path: Path):
    t = target(str(tmp_path / "s"), shard_rows=16, chunk_rows=16)
    listing = records(48)
    job(t, listing)                                                        # v1: blocks 0, 1, 2
    kept = [r for r in listing if int(r["image_id"][4:]) % 16 < 3]
    job(t, kept, operation="refresh")                                      # v2: 81% of every block deleted
    job(t, kept + records(5, prefix="new"), operation="refresh")           # v3: block 3 added
    return t, tmp_path / "s" / "fs1"


def _files(base: Path) -> dict[str, str]:
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in base.rglob("*") if p.is_file()}


def _check(store: FeatureStore) -> None:
    index = store.index()
    for layer, dim in LAYERS.items():
        np.testing.assert_array_equal(store.layer(layer), np.stack(
            [expected(i, fp, dim) for i, fp in zip(index.image_id, index.fingerprint)]))


def test_retain_compacts_and_reclaims(tmp_path):
    t, base = _store(tmp_path)
    before = FeatureStore(t.uri)
    ids = sorted(before.index().image_id)
    size_before = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    result = retain(t.uri, keep=1, grace=0)
    assert result.compaction.segments_rewritten == [0, 1, 2] and result.compaction.rows_moved == 9
    assert result.kept_versions == [4] and result.removed_versions == [1, 2, 3]
    assert result.removed_shards == [0, 1, 2] and result.bytes_freed > 0
    after = FeatureStore(t.uri)
    assert after.versions() == [4] and sorted(after.index().image_id) == ids
    _check(after)
    assert len(after.info.segments) == 2 and min(s.block for s in after.info.segments) > 2
    for layer in LAYERS:
        assert not (base / "features.zarr" / layer / "c" / "0" / "0").exists()
    assert not [d for d in (base / "features.zarr").rglob("*") if d.is_dir() and not any(d.iterdir())]
    assert not list(base.glob("index/shard-00000000-*")) and not list(base.glob("_manifest/shards/shard-00000001*"))
    size_after = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    assert size_before - size_after >= result.bytes_freed * 0.9
    with pytest.raises(ValueError, match="version 1 not found"):
        FeatureStore(t.uri, version=1)
    for wrong in ("4", True, 4.0):  # "4" read 'version 4 not found; committed versions: [4]'; True opened v1
        with pytest.raises(TypeError, match=r"version must be a committed version number \(int\), got"):
            FeatureStore(t.uri, version=wrong)
    assert FeatureStore(t.uri, version=np.int64(4)).version == 4


def test_kept_versions_stay_byte_identical(tmp_path):
    t, base = _store(tmp_path)
    pinned = FeatureStore(t.uri, version=2)
    snapshot = (pinned.index_table().to_pylist(), pinned.layer("late"))
    doc = base / "_manifest" / "versions" / "v00000002.json"
    doc_bytes = doc.read_bytes()
    files_v2 = {p: (base / p).read_bytes() for s in pinned.info.segments for p in s.files()}
    zarr_v2 = {f"features.zarr/{layer}/c/{s.block}/0": (base / f"features.zarr/{layer}/c/{s.block}/0").read_bytes()
               for s in pinned.info.segments for layer in LAYERS}
    result = retain(t.uri, keep=3, grace=0)  # compaction adds v4; v2..v4 kept
    assert result.kept_versions == [2, 3, 4] and result.removed_versions == [1]
    assert doc.read_bytes() == doc_bytes
    assert all((base / p).read_bytes() == b for p, b in {**files_v2, **zarr_v2}.items())
    again = FeatureStore(t.uri, version=2)
    assert again.index_table().to_pylist() == snapshot[0]
    np.testing.assert_array_equal(again.layer("late"), snapshot[1])


def test_strays_and_a_running_jobs_blocks_are_left_alone(tmp_path):
    t, base = _store(tmp_path)
    # a killed writer's temporaries, and blocks of a job that has not committed yet
    (base / "index" / ".shard-00000009-abc.parquet.0123.tmp").write_bytes(b"partial")
    (base / "_manifest" / "versions" / ".v00000009.json.4567.tmp").write_bytes(b"{")
    writer = FeatureStoreWriter(t)
    recs = tuple(records(3, prefix="running"))
    alloc = allocate(writer.fs, writer.base, [shard_plan_hash(recs)], job_id="running")
    writer.grow(alloc.blocks.stop * 16)
    writer.write_shard(encoded(BlockTask(alloc.first_block, alloc.first_block * 16, recs, shard_plan_hash(recs))))
    running = {p for p in _files(base) if f"shard-{alloc.first_block:08d}" in p}
    assert running
    result = retain(t.uri, keep=1, compact_first=False)  # default grace: a day
    assert result.kept_recent >= len(running) + 1
    assert running <= set(_files(base)) and (base / "index" / ".shard-00000009-abc.parquet.0123.tmp").exists()
    _check(FeatureStore(t.uri))
    old = time.time() - 3 * 24 * 3600
    for p in base.rglob("*"):
        if p.is_file() and (p.name.endswith(".tmp") or f"shard-{alloc.first_block:08d}" in p.name):
            os.utime(p, (old, old))
    result = retain(t.uri, keep=1, compact_first=False)
    assert not running & set(_files(base))
    assert not (base / "index" / ".shard-00000009-abc.parquet.0123.tmp").exists()
    assert alloc.first_block in result.removed_shards
    _check(FeatureStore(t.uri))


def test_retain_dry_run_and_cli(tmp_path, capsys):
    t, base = _store(tmp_path)
    files = _files(base)
    assert main(["retain", t.uri, "--keep", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would compact 3 segment(s) (9 live rows) into version 4" in out
    assert "kept versions [4]; would remove versions [1, 2, 3]" in out  # what the real run below does
    would = out.split("would remove versions [1, 2, 3], ")[1].split(" blocks")[0]
    assert _files(base) == files and FeatureStore(t.uri).versions() == [1, 2, 3]
    assert main(["versions", t.uri]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert main(["retain", t.uri, "--keep", "1", "--grace-hours", "0"]) == 0
    out = capsys.readouterr().out
    assert "compacted 3 segment(s) (9 live rows) into version 4" in out and "MB freed" in out
    assert "kept versions [4]; removed versions [1, 2, 3]" in out
    assert out.split("removed versions [1, 2, 3], ")[1].split(" blocks")[0] == would  # files, MB and blocks
    assert main(["retain", t.uri, "--keep", "0"]) == 2
    assert main(["retain", t.uri, "--keep", "1", "--grace-hours", "-5"]) == 2
    capsys.readouterr()
    assert main(["retain", str(tmp_path / "nope"), "--keep", "1"]) == 3
    assert capsys.readouterr().err.strip() == (f"strata retain: error: no strata feature set at {tmp_path / 'nope'} "
                                               f"(missing _manifest/featureset.json)")


@pytest.mark.s3
def test_retain_on_an_object_store_under_the_read_back_protocol(s3_bucket, monkeypatch):
    """Versions young enough to wait out the read-back settle time, bulk deletes on S3: the same outcome."""
    monkeypatch.setenv("STRATA_COMMIT_MODE", "verify")
    t = target(s3_bucket.url("s"), s3_bucket.storage_options, shard_rows=16, chunk_rows=16)
    listing = records(48)
    job(t, listing)
    kept = [r for r in listing if int(r["image_id"][4:]) % 16 < 3]
    job(t, kept, operation="refresh")
    job(t, kept + records(5, prefix="new"), operation="refresh")
    opts = s3_bucket.storage_options
    ids = sorted(FeatureStore(t.uri, storage_options=opts).index().image_id)
    fs, base = storage.resolve(t.uri, opts)
    gone = [p for p in fs.find(base) if "shard-00000000" in p or p.endswith("v00000001.json")]
    assert gone
    result = retain(t.uri, keep=1, grace=0, storage_options=opts)
    assert result.kept_versions == [4] and result.removed_versions == [1, 2, 3]
    assert result.removed_shards == [0, 1, 2]
    fs.invalidate_cache()
    left = set(fs.find(base))
    assert not left & set(gone) and len(result.removed_paths) >= len(gone)
    assert not {f"{base}/{p}" for p in result.removed_paths} & left
    after = FeatureStore(t.uri, storage_options=opts)
    assert after.versions() == [4] and sorted(after.index().image_id) == ids
    _check(after)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_remove_files_skips_those_already_gone(where, tmp_path, request):
    if where == "local":
        fs, base = storage.resolve(str(tmp_path / "r"))
    else:
        bucket = request.getfixturevalue("s3_bucket")
        fs, base = storage.resolve(bucket.url("r"), bucket.storage_options)
    paths = [f"{base}/d{i % 2}/f{i}" for i in range(5)]
    for p in paths:
        storage.atomic_write_bytes(fs, p, b"x")
    storage.remove_files(fs, [paths[0], f"{base}/d0/never-there", *paths[1:4]])
    fs.invalidate_cache()
    assert [p for p in paths if fs.exists(p)] == [paths[4]]
    storage.remove_files(fs, [])
