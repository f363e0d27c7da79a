"""The store's commit points: block allocation, the lease, create-if-absent on stores with and without it."""
from __future__ import annotations

import json
import threading
import time

import fsspec
import pytest

from pipeline import storage
from pipeline.stores import Version, allocate, latest_version, layout, read_version
from pipeline.stores import cas
from pipeline.stores.cas import conditional_writes, create_exclusive
from pipeline.stores.lock import StoreLockTimeout, store_lease


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_root(request, tmp_path):
    if request.param == "local":
        return storage.resolve(str(tmp_path / "fs"))
    bucket = request.getfixturevalue("s3_bucket")
    return storage.resolve(bucket.url("fs"), bucket.storage_options)


def test_conditional_create_is_detected(store_root, tmp_path):
    fs, base = store_root
    assert storage.honours_conditional_create(fs, base)
    assert conditional_writes(fs, base)
    memory = fsspec.filesystem("memory")
    assert storage.honours_conditional_create(memory, "/strata-probe")


@pytest.mark.parametrize("mode", ["conditional", "verify"])
def test_concurrent_allocations_never_share_a_block(store_root, mode, monkeypatch):
    fs, base = store_root
    if mode == "verify":  # the read-back protocol, with its real settle time (it is safe while a PUT is faster)
        monkeypatch.setenv("STRATA_COMMIT_MODE", "verify")
    got, errors = [], []

    def claim(k: int):
        try:
            got.append(allocate(fs, base, [f"c{k}-{i}" for i in range(k % 3 + 1)], job_id=str(k)))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    # the read-back protocol is safe while a writer's check-then-write takes less than its settle time: a
    # thread starved of the GIL for that long would break it, so that mode races fewer threads
    n = 6 if mode == "conditional" else 3
    threads = [threading.Thread(target=claim, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    blocks = [b for a in got for b in a.blocks]
    assert len(blocks) == len(set(blocks)) == sum(k % 3 + 1 for k in range(n))
    assert sorted(a.seq for a in got) == list(range(n))


def _race_overwrite(fs, path: str, first: bytes, second: bytes, after: float = 0.3) -> threading.Thread:
    """A writer inside its settle window (``first``), then a racing writer whose existence check came before that
    write replacing it ``after`` seconds later: what the read-back protocol allows."""
    storage.atomic_write_bytes(fs, path, cas._flagged(first))  # as the read-back protocol writes them
    racer = threading.Timer(after, storage.atomic_write_bytes, args=(fs, path, cas._flagged(second)))
    racer.start()
    return racer


def test_an_allocation_is_not_planned_on_a_marker_a_racing_writer_replaces(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_COMMIT_MODE", "verify")
    fs, base = storage.resolve(str(tmp_path / "fs"))
    marker = f"{layout.allocations_dir(base)}/seq-{0:010d}"
    doc = {"seq": 0, "first_block": 0, "job_id": "x", "created_at": ""}
    racer = _race_overwrite(fs, marker, json.dumps({**doc, "contents": ["a"]}).encode(),
                            json.dumps({**doc, "contents": ["b", "c", "d"]}).encode())
    got = allocate(fs, base, ["e"], job_id="late")
    racer.join()
    # planned on the tentative one-block marker, it would take block 1, which the surviving claim holds
    assert (got.seq, got.first_block) == (1, 3)


def test_a_reader_never_gets_a_version_a_racing_writer_replaces(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_COMMIT_MODE", "verify")
    fs, base = storage.resolve(str(tmp_path / "fs"))
    loser, winner = (Version(version=1, parent=None, created_at="", operation="extract", segments=(), job_id=j)
                     for j in ("loser", "winner"))
    racer = _race_overwrite(fs, layout.version_path(base, 1), loser.to_bytes(), winner.to_bytes())
    assert latest_version(fs, base).job_id == "winner"
    racer.join()
    assert read_version(fs, base, 1).job_id == "winner"


def test_reading_a_store_never_writes_to_it(tmp_path, monkeypatch):
    """Readers may hold read-only credentials: no conditional-write probe (a PUT) on the way to a version, and
    a document written by conditional create is read at once."""
    def no_probe(*_):
        raise AssertionError("a reader probed the store with a write")

    fs = fsspec.filesystem("memory")  # not local: a writer would probe it
    base = f"/read-only-{tmp_path.name}"
    storage.put_if_absent(fs, layout.version_path(base, 1), Version(
        version=1, parent=None, created_at="", operation="extract", segments=(), job_id="j").to_bytes())
    monkeypatch.setattr(storage, "honours_conditional_create", no_probe)
    monkeypatch.setattr(cas, "_support", {})
    assert latest_version(fs, base).job_id == "j"


def test_a_rerun_of_the_same_work_resumes_in_its_allocation(tmp_path):
    fs, base = storage.resolve(str(tmp_path / "fs"))
    first = allocate(fs, base, ["a", "b"], job_id="1")
    other = allocate(fs, base, ["c"], job_id="2")
    again = allocate(fs, base, ["a", "b"], job_id="3")
    assert again.reused and again.blocks == first.blocks and other.first_block == 2
    assert not allocate(fs, base, ["a", "b"], job_id="4", reuse=False).reused


def test_an_allocator_that_died_between_its_writes_blocks_nobody(tmp_path):
    fs, base = storage.resolve(str(tmp_path / "fs"))
    allocate(fs, base, ["a", "b"], job_id="1")
    # seq 1 claimed (its marker) but its named record never written: its blocks are still taken
    marker = {"seq": 1, "first_block": 2, "contents": ["x", "y", "z"], "job_id": "dead", "created_at": ""}
    storage.put_if_absent(fs, f"{layout.allocations_dir(base)}/seq-{1:010d}", json.dumps(marker).encode())
    nxt = allocate(fs, base, ["c"], job_id="2")
    assert nxt.seq == 2 and nxt.first_block == 5


def test_the_lease_is_exclusive_and_expires(tmp_path):
    fs, base = storage.resolve(str(tmp_path / "fs"))
    inside, overlaps = [], []

    def hold():
        with store_lease(fs, base, purpose="test"):
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps
    # a holder that died: its lease expires and the next taker breaks it
    path = layout.lock_path(base)
    fs.pipe_file(path, json.dumps({"owner": "dead", "purpose": "x", "expires_at": time.time() - 1}).encode())
    with store_lease(fs, base, purpose="after a crash", wait=5):
        assert json.loads(fs.cat_file(path))["purpose"] == "after a crash"
    assert not fs.exists(path)
    fs.pipe_file(path, json.dumps({"owner": "alive", "purpose": "x", "expires_at": time.time() + 60}).encode())
    with pytest.raises(StoreLockTimeout, match="stayed locked .*held by alive"):
        with store_lease(fs, base, purpose="blocked", wait=0.3):
            pass


def test_create_exclusive_read_back_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_COMMIT_MODE", "verify")
    monkeypatch.setattr("pipeline.stores.cas.SETTLE_SECONDS", 0.1)
    fs, base = storage.resolve(str(tmp_path / "fs"))
    fs.makedirs(base, exist_ok=True)
    assert not conditional_writes(fs, base)
    assert create_exclusive(fs, base, f"{base}/x", b"mine")
    assert not create_exclusive(fs, base, f"{base}/x", b"theirs")
    assert fs.cat_file(f"{base}/x") == b"mine"
