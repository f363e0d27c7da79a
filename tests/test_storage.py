"""Tests for pipeline.storage on local disk, memory:// and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import logging
import os
import threading
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zarr
from fsspec.implementations.local import LocalFileSystem

from pipeline import storage
from s3server import SeaweedS3Server


@dataclass(frozen=True)
class Root:
    """A backend under test: a root URI and the options that open it."""

    uri: str
    options: dict[str, Any]

    def url(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])


@pytest.fixture(
    params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)],
)
def root(request: pytest.FixtureRequest, tmp_path) -> Iterator[Root]:
    if request.param == "local":
        yield Root(str(tmp_path), {})
    elif request.param == "memory":
        uri = f"memory://strata-{uuid.uuid4().hex}"
        yield Root(uri, {})
        memory = fsspec.filesystem("memory")  # process-global: clean up after ourselves
        if memory.exists(uri):
            memory.rm(uri, recursive=True)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        yield Root(bucket.uri, bucket.storage_options)


# --------------------------------------------------------------------------- resolve


def test_resolve_round_trip(root: Root) -> None:
    fs, path = storage.resolve(root.url("a", "b.bin"), root.options)
    storage.atomic_write_bytes(fs, path, b"payload")
    fs2, path2 = storage.resolve(root.url("a", "b.bin"), root.options)
    assert path2 == path
    assert fs2.cat_file(path2) == b"payload"


def test_plain_paths_and_file_uris_are_local(tmp_path) -> None:
    fs_plain, p_plain = storage.resolve(str(tmp_path / "x"))
    fs_uri, p_uri = storage.resolve((tmp_path / "x").as_uri())
    assert storage.is_local(fs_plain) and storage.is_local(fs_uri)
    assert isinstance(fs_plain, LocalFileSystem)
    assert p_plain == p_uri == str(tmp_path / "x")


def test_unknown_protocol_is_a_clear_error_without_secrets() -> None:
    with pytest.raises(ValueError) as info:
        storage.resolve("nosuchproto://b/x", {"key": "AKIA-ID", "secret": "hunter2-secret"})
    assert "nosuchproto" in str(info.value)
    assert "hunter2-secret" not in str(info.value) and "AKIA-ID" not in str(info.value)


# --------------------------------------------------------------------------- env


def test_endpoint_env_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://aws-env:1")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("STRATA_S3_ENDPOINT_URL", raising=False)
    opts = storage.storage_options_for("s3://b/x")
    assert opts["client_kwargs"]["endpoint_url"] == "http://aws-env:1"
    monkeypatch.setenv("STRATA_S3_ENDPOINT_URL", "http://strata-env:2")
    assert storage.storage_options_for("s3://b")["client_kwargs"]["endpoint_url"] == (
        "http://strata-env:2"
    )
    explicit = {"client_kwargs": {"endpoint_url": "http://explicit:3", "region_name": "r"}}
    retry = {"config_kwargs": storage.client_retry_config()}
    assert storage.storage_options_for("s3://b", explicit) == {**explicit, **retry}
    assert storage.storage_options_for("s3://b", {"endpoint_url": "http://e:4"}) == {
        "endpoint_url": "http://e:4", **retry
    }
    assert storage.storage_options_for("memory://b") == {}
    # one retry policy: botocore's, configured once; a user's own botocore settings win
    monkeypatch.setenv("STRATA_STORAGE_ATTEMPTS", "3")
    assert storage.storage_options_for("s3://b")["config_kwargs"]["retries"] == {"max_attempts": 3, "mode": "standard"}
    mine = storage.storage_options_for("s3://b", {"config_kwargs": {"retries": {"max_attempts": 9}}})
    assert mine["config_kwargs"]["retries"] == {"max_attempts": 9} and mine["config_kwargs"]["connect_timeout"] == 10
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(storage.storage_options_for("s3://b"))


@pytest.mark.s3
def test_env_endpoint_and_credentials_are_picked_up(s3_env: SeaweedS3Server, s3_bucket) -> None:
    fs, path = storage.resolve(s3_bucket.url("env", "obj"))  # no options at all
    storage.atomic_write_bytes(fs, path, b"from-env")
    assert fs.cat_file(path) == b"from-env"
    assert "secret" not in fs.storage_options  # credentials stayed in the environment


# --------------------------------------------------------------------------- writes


def test_atomic_write_is_visible_whole(root: Root) -> None:
    fs, path = storage.resolve(root.url("blob.bin"), root.options)
    old, new = b"a" * 3_000_000, b"b" * 3_000_001
    storage.atomic_write_bytes(fs, path, old)
    seen: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            data = fs.cat_file(path)
            assert data in (old, new), f"partial read of {len(data)} bytes"
            seen.add(len(data))

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(reader)
        for i in range(6):
            storage.atomic_write_bytes(fs, path, new if i % 2 == 0 else old)
        storage.atomic_write_bytes(fs, path, new)
        stop.set()
        future.result()
    assert fs.cat_file(path) == new
    assert [p for p in fs.ls(root.url(), detail=False) if p.endswith(".tmp")] == []


def test_json_round_trip(root: Root) -> None:
    fs, path = storage.resolve(root.url("meta", "manifest.json"), root.options)
    doc = {"version": 3, "shards": ["s0", "s1"], "name": "caf\u00e9"}
    storage.write_json_atomic(fs, path, doc)
    assert storage.read_json(fs, path) == doc
    with pytest.raises(FileNotFoundError):
        storage.read_json(fs, path + ".missing")


def test_put_if_absent_second_call_returns_false(root: Root) -> None:
    fs, path = storage.resolve(root.url("commit", "v1.json"), root.options)
    assert storage.put_if_absent(fs, path, b"first") is True
    assert storage.put_if_absent(fs, path, b"second") is False
    assert fs.cat_file(path) == b"first"


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_put_if_absent_race_has_one_winner(backend: str, request, tmp_path) -> None:
    if backend == "local":
        uri, options = str(tmp_path / "race.json"), {}
    else:
        bucket = request.getfixturevalue("s3_bucket")
        uri, options = bucket.url("race.json"), bucket.storage_options
    fs, path = storage.resolve(uri, options)
    # SeaweedFS serialises same-key conditional PUTs with ~1 s lock back-off: keep it small.
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda i: storage.put_if_absent(fs, path, b"w%d" % i), range(6)))
    assert results.count(True) == 1
    assert fs.cat_file(path) == b"w%d" % results.index(True)


# --------------------------------------------------------------------------- redaction


def test_redact_masks_nested_secrets() -> None:
    opts = {
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t-value",
        "token": "tok-value",
        "client_kwargs": {"endpoint_url": "http://u:pw-value@host:1", "region_name": "eu"},
        "config_kwargs": {"proxy_password": "pp-value", "retries": {"max_attempts": 2}},
        "list": [{"session_token": "st-value"}],
    }
    text = repr(storage.redact(opts))
    for secret in ("AKIAEXAMPLE", "s3cr3t-value", "tok-value", "pw-value", "pp-value", "st-value"):
        assert secret not in text
    assert "eu" in text and "max_attempts" in text
    assert opts["secret"] == "s3cr3t-value"  # the input is not modified


def test_secrets_never_reach_logs(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    calls = []

    def leaky() -> None:
        calls.append(1)
        raise ConnectionError(
            "cannot reach s3://AKIA:url-secret@bucket signature=sig-value "
            "with env-secret-value"
        )

    with caplog.at_level(logging.DEBUG, logger="pipeline.storage"):
        with pytest.raises(ConnectionError):
            storage.retrying(leaky, attempts=2, base_delay=0.001)
    logged = caplog.text
    assert len(calls) == 2 and "attempt 1/2" in logged
    for secret in ("url-secret", "sig-value", "env-secret-value"):
        assert secret not in logged


# --------------------------------------------------------------------------- retrying


class Flaky:
    """Fails with ``error`` the first ``failures`` calls, then returns ``value``."""

    def __init__(self, failures: int, error: BaseException, value: object = "ok") -> None:
        self.failures, self.error, self.value, self.calls = failures, error, value, 0

    def __call__(self) -> object:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.value


def test_retrying_succeeds_after_transient_failures() -> None:
    flaky = Flaky(3, ConnectionResetError("reset by peer"))
    assert storage.retrying(flaky, attempts=5, base_delay=0.001) == "ok"
    assert flaky.calls == 4


def test_retrying_gives_up_with_the_last_error() -> None:
    errors = iter([TimeoutError("t1"), TimeoutError("t2"), TimeoutError("t3")])

    def always_failing() -> None:
        raise next(errors)

    with pytest.raises(TimeoutError, match="t3"):
        storage.retrying(always_failing, attempts=3, base_delay=0.001)


def test_retrying_does_not_retry_answers() -> None:
    flaky = Flaky(3, FileNotFoundError("gone"))
    with pytest.raises(FileNotFoundError):
        storage.retrying(flaky, attempts=5, base_delay=0.001)
    assert flaky.calls == 1
    other = Flaky(1, ValueError("bug"))  # not a transient error type
    with pytest.raises(ValueError):
        storage.retrying(other, attempts=5, base_delay=0.001)


@pytest.mark.s3
def test_retrying_rides_out_a_server_restart(s3_server: SeaweedS3Server, s3_bucket) -> None:
    options = dict(s3_bucket.storage_options, config_kwargs={"retries": {"max_attempts": 1}})
    fs, path = storage.resolve(s3_bucket.url("outage.bin"), options)
    storage.atomic_write_bytes(fs, path, b"durable")
    s3_server.stop()
    restarter = threading.Timer(1.0, s3_server.start)
    restarter.start()
    try:
        got = storage.retrying(lambda: fs.cat_file(path), attempts=12, base_delay=0.2, max_delay=1)
    finally:
        restarter.join()
    assert got == b"durable"


# --------------------------------------------------------------------------- zarr, parquet


def test_zarr_round_trip(root: Root) -> None:
    uri = root.url("features.zarr")
    data = np.arange(40, dtype="float16").reshape(10, 4)
    group = zarr.open_group(storage.zarr_store(uri, root.options, read_only=False), mode="w")
    arr = group.create_array("layer1", shape=data.shape, chunks=(5, 4), dtype="float16")
    arr[:] = data
    group.attrs["encoder"] = "tiny"
    reread = zarr.open_group(storage.zarr_store(uri, root.options, read_only=True), mode="r")
    np.testing.assert_array_equal(reread["layer1"][:], data)
    assert reread.attrs["encoder"] == "tiny"


@pytest.mark.s3
def test_zarr_readable_by_plain_zarr(s3_bucket) -> None:
    """Downstream readers need only zarr + s3fs, not this library."""
    uri = s3_bucket.url("plain.zarr")
    store = storage.zarr_store(uri, s3_bucket.storage_options, read_only=False)
    zarr.create_array(store, shape=(6,), chunks=(3,), dtype="int32")[:] = np.arange(6)
    arr = zarr.open_array(uri, mode="r", storage_options=s3_bucket.storage_options)
    np.testing.assert_array_equal(arr[:], np.arange(6))


def test_parquet_round_trip(root: Root) -> None:
    fs, path = storage.resolve(root.url("vectors.parquet"), root.options)
    table = pa.table({"image_id": ["a", "b"], "vec": pa.array([[1.0, 2.0], [3.0, 4.0]],
                                                              pa.list_(pa.float32(), 2))})
    fs.makedirs(fs._parent(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


# --------------------------------------------------------------------------- server


def _listening(pid: int) -> set[str]:
    """Hex local addresses of TCP sockets in LISTEN state owned by ``pid`` (Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    addresses = set()
    for table in ("tcp", "tcp6"):
        if not os.path.exists(f"/proc/{pid}/net/{table}"):
            continue  # no IPv6 here
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    addresses.add(fields[1].rsplit(":", 1)[0])
    return addresses


@pytest.mark.s3
@pytest.mark.skipif(not os.path.isdir("/proc/self/net"), reason="needs Linux /proc")
def test_s3_server_listens_on_loopback_only(s3_server: SeaweedS3Server) -> None:
    assert s3_server.pid is not None
    assert _listening(s3_server.pid) == {"0100007F"}  # 127.0.0.1, nothing else
    assert "secret" not in repr(s3_server) and s3_server.secret_key not in repr(s3_server)


@pytest.mark.s3
def test_auth_errors_do_not_carry_the_secret(s3_bucket) -> None:
    wrong = dict(s3_bucket.storage_options, secret="wrong-secret-value-123")
    fs, path = storage.resolve(s3_bucket.url("x"), wrong)
    with pytest.raises(PermissionError) as info:
        storage.retrying(lambda: fs.cat_file(path), attempts=2, base_delay=0.001)
    text = "".join(traceback.format_exception(info.value))
    assert "wrong-secret-value-123" not in text
    assert "wrong-secret-value-123" not in repr(storage.redact(fs.storage_options))


def test_unknown_s3_options_are_refused_by_name_before_any_request():
    """s3fs hands unknown names on to aiobotocore, which fails at the first request with a bare TypeError."""
    from pipeline import storage as st

    with pytest.raises(ValueError, match=r"unknown S3 option\(s\) \['bogus_opt'\] in storage_options; valid: .*'anon'"):
        st.resolve("s3://bucket/x", {"bogus_opt": 1})
    with pytest.raises(ValueError, match=r"\['bogus'\] in storage_options.client_kwargs; valid: .*'endpoint_url'"):
        st.resolve("s3://bucket/x", {"client_kwargs": {"bogus": 1}})
    with pytest.raises(ValueError, match=r"\['bogus'\] in storage_options.config_kwargs; valid: .*'read_timeout'"):
        st.resolve("s3://bucket/x", {"config_kwargs": {"bogus": 1}})
    fs, path = st.resolve("s3://bucket/x", {"key": "k", "secret": "s", "client_kwargs": {"region_name": "eu-west-1"},
                                             "config_kwargs": {"read_timeout": 5}, "use_listings_cache": False})
    assert path == "bucket/x"


def test_an_endpoint_variable_without_a_scheme_is_named(monkeypatch):
    from pipeline import storage as st

    monkeypatch.setenv("STRATA_S3_ENDPOINT_URL", "127.0.0.1:8333")
    with pytest.raises(ValueError, match=r"STRATA_S3_ENDPOINT_URL='127.0.0.1:8333' is not a URL: give its scheme, "
                                         r"e.g. http://127.0.0.1:8333"):
        st.resolve("s3://bucket/x")
