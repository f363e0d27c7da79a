"""pipeline.failures: which exit code and which one line an exception becomes; tracebacks kept out of logs."""
from __future__ import annotations

import io
import logging

import pytest

from pipeline import failures
from pipeline.stores.reader import ImageNotFoundError
from pipeline.schema import ConfigError


def test_ray_wrapped_error_budget_speaks_with_its_own_first_line():
    from ray.exceptions import RayTaskError

    from pipeline.extract.sink import ErrorBudgetExceeded

    cause = ErrorBudgetExceeded("9 of 100 images failed so far; see s3://b/fs/errors/*.parquet\n"
                                "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).")
    remote = RayTaskError("Write", "Traceback (most recent call last):\n  File \"sink.py\", line 60\n", cause)
    wrapped = remote.as_instanceof_cause()
    try:  # as Ray Data re-raises it
        raise wrapped from RuntimeError("internal")
    except RayTaskError as e:
        f = failures.classify(e)
    assert (f.code, f.expected) == (failures.JOB_FAILED, True)
    assert f.message == "9 of 100 images failed so far; see s3://b/fs/errors/*.parquet"


@pytest.mark.parametrize("exc, code, message", [
    (ConfigError("store.dtype: 'int8' is not a valid choice"), failures.USAGE,
     "store.dtype: 'int8' is not a valid choice"),
    (FileNotFoundError("no strata feature set at /x"), failures.NOT_FOUND, "no strata feature set at /x"),
    (KeyError("unknown head 'x'"), failures.USAGE, "unknown head 'x'"),
    (ImageNotFoundError("2 image ids not in version 1: ['a', 'b']"), failures.NOT_FOUND,
     "2 image ids not in version 1: ['a', 'b']"),
    (failures.JobFailed("3 probe group(s) failed"), failures.JOB_FAILED, "3 probe group(s) failed"),
    (ConnectionRefusedError(111, "Connection refused"), failures.STORAGE, "storage unreachable: [Errno 111]"),
    (PermissionError(13, "Permission denied"), failures.STORAGE, "[Errno 13] Permission denied"),
])
def test_expected_failures(exc, code, message):
    f = failures.classify(exc)
    assert f.code == code and f.expected and f.message.startswith(message)


def test_botocore_endpoint_error_is_storage():
    from botocore.exceptions import EndpointConnectionError

    try:
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except ConnectionRefusedError:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k") from None
    except EndpointConnectionError as e:
        f = failures.classify(e)
    assert f.code == failures.STORAGE and "http://127.0.0.1:9/b/k" in f.message


def test_a_bug_is_internal_and_names_its_type():
    f = failures.classify(AttributeError("'NoneType' object has no attribute 'rows'"))
    assert (f.code, f.expected) == (failures.INTERNAL, False)
    assert f.message == "unexpected AttributeError: 'NoneType' object has no attribute 'rows'"


def test_secrets_never_reach_the_line(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-example")
    f = failures.classify(ValueError("cannot open s3://alice:pw@b/x with secret=wJalrXUtnFEMI-example"))
    assert "wJalrXUtnFEMI" not in f.message and ":pw@" not in f.message


def test_logged_tracebacks_are_cut_to_their_first_line():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("strata-test-failures")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with failures.tracebacks_hidden(True):
            try:
                raise RuntimeError("boom")
            except RuntimeError:
                logger.exception("probe group failed")
            logger.error("Full stack trace:\n%s", 'Traceback (most recent call last):\n  File "x.py", line 1')
            logger.info("plan: %d shards", 3)
        logger.exception("after", exc_info=(RuntimeError, RuntimeError("x"), None))
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[:3] == ["probe group failed [traceback hidden: -v shows it]",
                         "Full stack trace: [traceback hidden: -v shows it]", "plan: 3 shards"]
    assert lines[3] == "after" and "RuntimeError: x" in lines[-1]  # outside the block, records are as they were


def test_a_lost_node_is_a_failed_job_to_resume_not_a_bug():
    ray = pytest.importorskip("ray")
    cause = ray.exceptions.ActorUnavailableError("The actor 29a0 is unavailable: RpcError: failed to connect", b"0" * 16)
    try:
        raise RuntimeError("ray::MapWorker(Map(EncodeShard)) failed") from cause
    except RuntimeError as e:
        f = failures.classify(e)
    assert (f.code, f.expected) == (failures.JOB_FAILED, True)
    assert f.message.startswith("the cluster lost a node or worker during the job (ActorUnavailableError: ")
    assert f.message.endswith("run the same command again to resume")
