"""Versions: immutable once published, committed by compare-and-swap with rebase, read exactly by plain tools."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import pipeline.stores.commit as commit_mod
from pipeline import storage
from pipeline.stores import CommitConflict, FeatureStore, compact_store
from storekit import LAYERS, expected, job, records, target


def _version_files(base: Path, version: int) -> dict[str, str]:
    """sha256 of every file version ``version`` references, Zarr shards of its blocks included."""
    doc = json.loads((base / "_manifest" / "versions" / f"v{version:08d}.json").read_text())
    paths = [p for s in doc["segments"] for p in [s["index"], s["errors"], *s["parquet"].values()]]
    paths += [f"features.zarr/{layer}/c/{s['block']}/0" for s in doc["segments"] for layer in LAYERS]
    return {p: hashlib.sha256((base / p).read_bytes()).hexdigest() for p in paths} | \
        {"doc": hashlib.sha256((base / "_manifest" / "versions" / f"v{version:08d}.json").read_bytes()).hexdigest()}


def _snapshot(uri: str, version: int) -> tuple:
    store = FeatureStore(uri, version=version)
    index = store.index_table(include_errors=True).to_pylist()
    return index, {layer: store.layer(layer) for layer in LAYERS}, store.errors().to_pylist()


def _assert_same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[2] == b[2]
    for layer in LAYERS:
        np.testing.assert_array_equal(a[1][layer], b[1][layer])


def test_a_pinned_version_never_changes(tmp_path):
    t = target(str(tmp_path / "s"))
    base = tmp_path / "s" / "fs1"
    v1_listing = records(24, prefix="m")
    assert job(t, v1_listing).version == 1
    files, snap = _version_files(base, 1), _snapshot(t.uri, 1)

    # a second extract whose listing gained 8 images that sort first: appended, nothing renumbered
    early = records(8, prefix="a")
    out = job(t, early + v1_listing)
    assert out.version == 2 and out.counts["added"] == 8 and out.counts["unchanged"] == 24
    # a refresh with changed, deleted and relabelled images
    listing = [dict(r) for r in early + v1_listing if r["image_id"] not in ("m-0003", "a-0001")]
    listing[2] = dict(listing[2], fingerprint="changed")
    listing[5] = dict(listing[5], labels={"digit": 42, "parity": "odd"})
    out = job(t, listing, operation="refresh")
    assert (out.version, out.counts["changed"], out.counts["deleted"], out.counts["relabelled"]) == (3, 1, 2, 1)
    # a label-only refresh encodes nothing and still publishes
    relabelled = [dict(r, split="test") if r["image_id"].startswith("m-001") else r for r in listing]
    out = job(t, relabelled, operation="refresh")
    assert out.version == 4 and not out.written and out.counts["relabelled"] == 10
    latest = FeatureStore(t.uri)
    assert set(latest.index()[lambda d: d.split == "test"].image_id) == {f"m-{i:04d}" for i in range(10, 20)}
    assert latest.index().set_index("image_id").loc[listing[5]["image_id"], "digit"] == 42

    from pipeline.stores.retention import retain

    result = retain(t.uri, keep=10, grace=0)
    assert result.removed_versions == [] and FeatureStore(t.uri).versions()[:4] == [1, 2, 3, 4]
    assert _version_files(base, 1) == files
    _assert_same(_snapshot(t.uri, 1), snap)


def _plain_pyarrow(fs, base: str, version: int, layer: str) -> pa.Table:
    """The README's pyarrow recipe, no strata import: the live rows of one version with their vectors."""
    v = json.loads(fs.cat_file(f"{base}/_manifest/versions/v{version:08d}.json"))
    index = pa.concat_tables([pq.read_table(f"{base}/{p}", filesystem=fs) for p in v["index_files"]])
    deleted = pa.array(v["deleted_rows"], pa.int64())
    live = index.filter(pc.and_(pc.equal(index["status"], "ok"), pc.invert(pc.is_in(index["row"], deleted))))
    vectors = pa.concat_tables([pq.read_table(f"{base}/{p}", filesystem=fs) for p in v["parquet_files"][layer]])
    vectors = vectors.filter(pc.is_in(vectors["row"], live["row"])).sort_by("row")  # rows are unique
    return live.sort_by("row").append_column("vector", vectors["vector"])


def _plain_duckdb(base: str, version: int, layer: str) -> list[tuple]:
    """The README's duckdb recipe."""
    import duckdb

    return duckdb.sql(f"""
        with v as (select * from read_json_auto('{base}/_manifest/versions/v{version:08d}.json'))
        select i.image_id, i.digit, p.vector
        from read_parquet('{base}/index/*.parquet', filename = true) i
        join read_parquet('{base}/parquet/layer={layer}/*.parquet') p on p."row" = i."row"
        where i.status = 'ok'
          and regexp_extract(i.filename, 'index/[^/]+$') in (select unnest(index_files) from v)
          and i."row" not in (select unnest(deleted_rows) from v)
        order by i.image_id""").fetchall()


def _plain_polars(doc: dict, base: str, layer: str, storage_options: dict | None = None):
    """The README's polars recipe (polars reads the files itself; the version document is plain JSON)."""
    import polars as pl

    so = {"storage_options": storage_options} if storage_options else {}
    live = (pl.scan_parquet([f"{base}/{p}" for p in doc["index_files"]], **so)
              .filter((pl.col("status") == "ok") & ~pl.col("row").is_in(doc["deleted_rows"])))
    vectors = pl.scan_parquet([f"{base}/{p}" for p in doc["parquet_files"][layer]], **so).select("row", "vector")
    return live.join(vectors, on="row").sort("row").collect()


def _polars_s3_options(fsspec_options: dict) -> dict:
    """polars' own S3 settings for the test server (plain HTTP on 127.0.0.1)."""
    client = fsspec_options["client_kwargs"]
    return {"aws_access_key_id": fsspec_options["key"], "aws_secret_access_key": fsspec_options["secret"],
            "aws_endpoint_url": client["endpoint_url"], "aws_region": client["region_name"], "aws_allow_http": "true"}


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_plain_tools_read_exactly_one_version(backend, tmp_path, request):
    if backend == "local":
        uri, so = str(tmp_path / "s"), {}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        uri, so = bucket.url("s"), bucket.storage_options
    t = target(uri, so)
    listing = records(150)
    job(t, listing, bad={"img-0007"})
    listing = [dict(r) for r in listing if r["image_id"] not in ("img-0011", "img-0100")]
    listing[0] = dict(listing[0], fingerprint="new")
    listing[1] = dict(listing[1], labels={"digit": 77, "parity": "odd"})
    job(t, listing + records(5, start=900), operation="refresh")
    fs, base = storage.resolve(t.uri, so)
    for version in (1, 2):
        store = FeatureStore(t.uri, storage_options=so, version=version)
        want = {i: (d, store.get([i], "late")[0]) for i, d in zip(store.index().image_id, store.index().digit)}
        table = _plain_pyarrow(fs, base, version, "late")
        got_ids = table.column("image_id").to_pylist()
        assert len(got_ids) == len(set(got_ids)) == len(want) and set(got_ids) == set(want)
        vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False)).astype(np.float32)
        np.testing.assert_array_equal(vectors, np.stack([want[i][1] for i in got_ids]))
        assert table.column("digit").to_pylist() == [want[i][0] for i in got_ids]
        doc = json.loads(fs.cat_file(f"{base}/_manifest/versions/v{version:08d}.json"))
        frame = _plain_polars(doc, t.uri.rstrip("/"), "late", _polars_s3_options(so) if so else None)
        assert frame["image_id"].to_list() == got_ids and frame["digit"].to_list() == table.column("digit").to_pylist()
        np.testing.assert_array_equal(frame["vector"].to_numpy().astype(np.float32), vectors)
        if backend == "local":
            rows = _plain_duckdb(base, version, "late")
            assert [r[0] for r in rows] == sorted(want)
            assert all(r[1] == want[r[0]][0] for r in rows)
            np.testing.assert_array_equal(np.array([r[2] for r in rows], np.float32),
                                          np.stack([want[r[0]][1] for r in rows]))
    assert "img-0011" in set(FeatureStore(t.uri, storage_options=so, version=1).index().image_id)
    assert FeatureStore(t.uri, storage_options=so).index().set_index("image_id").loc["img-0001", "digit"] == 77


# --------------------------------------------------------------------------- racing committers


def _race_listing(i: int, who: str) -> list[dict]:
    """Iteration ``i``'s listing as ``who`` sees it: the common state before the iteration, plus its own
    change (a: adds one image and re-encodes another; b: adds one image and deletes another)."""
    common = {r["image_id"]: r for r in records(40)}
    for j in range(i):
        common.update({r["image_id"]: r for r in records(1, prefix=f"a{j}") + records(1, prefix=f"b{j}")})
        common[f"img-{j:04d}"] = dict(common[f"img-{j:04d}"], fingerprint=f"changed{j}")
        common.pop(f"img-{20 + j:04d}")
    if who == "a":
        common.update({r["image_id"]: r for r in records(1, prefix=f"a{i}")})
        common[f"img-{i:04d}"] = dict(common[f"img-{i:04d}"], fingerprint=f"changed{i}")
    else:
        common.update({r["image_id"]: r for r in records(1, prefix=f"b{i}")})
        common.pop(f"img-{20 + i:04d}")
    return list(common.values())


def _racer(who, uri, so, iterations, barrier, results, env, pages):
    os.environ.update(env)
    import pipeline.stores.commit as c

    waiting = {"on": True}

    def hook(_version):
        if waiting["on"]:
            waiting["on"] = False
            barrier.wait(timeout=120)  # both committers publish at the same moment

    c.before_publish = hook
    try:
        for i in range(iterations):
            waiting["on"] = True
            out = job(target(uri, so), _race_listing(i, who), operation="refresh", page_images=pages)
            results.put((who, i, out.version, out.commit.attempts))
            barrier.wait(timeout=120)  # the next iteration starts from both commits
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.put((who, -1, repr(e), 0))
        barrier.abort()


@pytest.mark.parametrize("mode", ["conditional", "verify"])
@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_racing_refreshes_both_land(backend, mode, tmp_path, request):
    if backend == "local":
        uri, so = str(tmp_path / "s"), {}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        uri, so = bucket.url("s"), bucket.storage_options
    # small pages: the racers' changes mostly fall in different units (merged without reading images);
    # one page: every race is a unit both changed (merged image by image)
    pages = 8 if mode == "conditional" else 4096
    job(target(uri, so), records(40), page_images=pages)
    iterations = 6 if mode == "conditional" else 2
    env = {"STRATA_COMMIT_MODE": "verify"} if mode == "verify" else {}
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(who, uri, so, iterations, barrier, results, env, pages)) for who in "ab"]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(2 * iterations)]
    for p in procs:
        p.join(timeout=60)
    assert all(i >= 0 for _, i, _, _ in got), got
    for i in range(iterations):
        versions = sorted(v for _, j, v, _ in got if j == i)
        assert versions == [2 + 2 * i, 3 + 2 * i]  # both published, one after the other
        assert sorted(a for _, j, _, a in got if j == i)[-1] >= 2  # the loser rebased
    store = FeatureStore(target(uri, so).uri, storage_options=so)
    final = {r["image_id"]: r for r in _race_listing(iterations, "a") if not r["image_id"].startswith(f"a{iterations}")}
    final.pop(f"img-{iterations:04d}")
    final[f"img-{iterations:04d}"] = records(iterations + 1)[iterations]
    index = store.index()
    assert sorted(index.image_id) == sorted(final)
    assert dict(zip(index.image_id, index.fingerprint)) == {k: r["fingerprint"] for k, r in final.items()}
    late = store.layer("late")
    np.testing.assert_array_equal(late, np.stack([expected(i, fp, 24) for i, fp in zip(index.image_id,
                                                                                      index.fingerprint)]))


def test_a_reader_always_sees_one_whole_version(tmp_path):
    t = target(str(tmp_path / "s"))

    def listing(k: int) -> list[dict]:
        return records(30 + 5 * k)[2 * k:]  # each version adds 5 images and deletes 2

    job(t, listing(1))
    stop, seen, failures = threading.Event(), set(), []

    def reader():
        while not stop.is_set():
            try:
                store = FeatureStore(t.uri)
                index = store.index()
                assert set(index.image_id) == {r["image_id"] for r in listing(store.version)}
                np.testing.assert_array_equal(store.layer("early"), np.stack(
                    [expected(i, fp, 8) for i, fp in zip(index.image_id, index.fingerprint)]))
                seen.add(store.version)
            except Exception as e:  # noqa: BLE001
                failures.append(e)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for th in threads:
        th.start()
    for k in range(2, 9):
        assert job(t, listing(k), operation="refresh").version == k
    stop.set()
    for th in threads:
        th.join()
    assert not failures, failures[0]
    assert len(seen) >= 3


# --------------------------------------------------------------------------- conflicts


def _interleaved(other):
    """A before_publish hook that lets ``other`` commit first, once: this committer then has to rebase."""
    done = []

    def hook(_version):
        if not done:
            done.append(other())
    return hook


def test_conflicting_changes_stop_with_the_images_named(tmp_path, monkeypatch):
    t = target(str(tmp_path / "s"))
    base = records(20)
    job(t, base)
    mine = [dict(r, fingerprint="mine") if r["image_id"] == "img-0004" else r for r in base]
    theirs = [dict(r, fingerprint="theirs") if r["image_id"] == "img-0004" else r for r in base]
    monkeypatch.setattr(commit_mod, "before_publish", _interleaved(
        lambda: (setattr(commit_mod, "before_publish", None), job(t, theirs, operation="refresh"))))
    with pytest.raises(CommitConflict, match=r"1 image\(s\) were changed by another job .*img-0004"):
        job(t, mine, operation="refresh")
    store = FeatureStore(t.uri)
    assert store.versions() == [1, 2]
    assert store.index().set_index("image_id").loc["img-0004", "fingerprint"] == "theirs"


def test_identical_concurrent_jobs_do_not_duplicate_rows(tmp_path, monkeypatch):
    t = target(str(tmp_path / "s"))
    job(t, records(20))
    listing = records(26)
    monkeypatch.setattr(commit_mod, "before_publish", _interleaved(
        lambda: (setattr(commit_mod, "before_publish", None), job(t, listing, operation="refresh"))))
    out = job(t, listing, operation="refresh")
    assert not out.published and out.commit.deduplicated == 6
    ids = list(FeatureStore(t.uri).index().image_id)
    assert len(ids) == len(set(ids)) == 26


def test_compaction_yields_to_a_concurrent_refresh(tmp_path, monkeypatch):
    t = target(str(tmp_path / "s"), shard_rows=16, chunk_rows=16)
    listing = records(48)
    job(t, listing)
    kept = [r for r in listing if int(r["image_id"][4:]) % 16 < 4]  # blocks now 75% deleted
    job(t, kept, operation="refresh")
    other = [dict(r, labels={"digit": 7, "parity": "x"}) if r["image_id"] == "img-0001" else r
             for r in kept if r["image_id"] != "img-0002"]
    monkeypatch.setattr(commit_mod, "before_publish", _interleaved(
        lambda: (setattr(commit_mod, "before_publish", None), job(t, other, operation="refresh"))))
    result = compact_store(t.uri, min_deleted=0.5)
    assert result.commit.yielded >= 2 and result.version == 4
    store = FeatureStore(t.uri)
    index = store.index().set_index("image_id")
    assert set(index.index) == {r["image_id"] for r in other}
    assert index.loc["img-0001", "digit"] == 7  # the other job's relabel survives the move
    assert {s.block for s in store.info.segments}.isdisjoint({0, 1, 2})  # old blocks left the version
    np.testing.assert_array_equal(store.layer("late"), np.stack(
        [expected(i, fp, 24) for i, fp in zip(store.index().image_id, store.index().fingerprint)]))


def test_class_names_merge_three_ways_like_images():
    """A job that read the old names never writes them back over another job's rename; two different renames
    of one label are a conflict."""
    from pipeline.stores import JobChange, Version

    def version(n, names):
        return Version(version=n, parent=None, created_at="", operation="extract", segments=(), class_names=names)

    old, renamed, other = ["a", "b"], ["b", "a"], ["x", "y"]
    parent = version(1, {"kind": old, "gone": ["g"]})
    latest = version(2, {"kind": renamed, "gone": ["g"]})  # another job renamed kind meanwhile

    def merged(mine):
        return commit_mod._merge_class_names(JobChange("refresh", parent, class_names=mine), latest)

    assert merged(None) == ({"kind": renamed, "gone": ["g"]}, [])  # compaction and the like: names kept
    assert merged({"kind": old, "gone": ["g"]}) == ({"kind": renamed, "gone": ["g"]}, [])  # no stale write-back
    assert merged({"kind": renamed, "new": ["n"]}) == ({"kind": renamed, "new": ["n"]}, [])  # gone dropped, new added
    assert merged({"kind": other, "gone": ["g"]}) == ({"kind": renamed, "gone": ["g"]}, ["kind"])
