"""Expected failures of a command: the exit code and the one line a user reads instead of a traceback."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# Exit codes (documented in the README).
OK = 0
JOB_FAILED = 1       # the job ran and failed: error budget exceeded, probe groups failed, shards lost
USAGE = 2            # bad command line or config (argparse uses 2 as well)
NOT_FOUND = 3        # no such feature set, version, config, source or file
STORAGE = 4          # storage unreachable or refusing: connection, DNS, timeout, credentials, permissions
INTERNAL = 70        # an unexpected error: a bug (EX_SOFTWARE)
INTERRUPTED = 130    # Ctrl-C


class JobFailed(RuntimeError):
    """A job that ran to its end and failed as a whole (e.g. every probe group failed)."""


@dataclass(frozen=True)
class Failure:
    code: int
    message: str
    expected: bool


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it wraps: a Ray task error's cause, then `raise ... from` causes and contexts."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)]


def _storage_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, PermissionError]
    try:
        from botocore import exceptions as bex

        errors += [bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ReadTimeoutError,
                   bex.NoCredentialsError, bex.ClientError, bex.ConnectionError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    if "aiohttp" in sys.modules:
        import aiohttp

        errors.append(aiohttp.ClientConnectionError)
    return tuple(errors)


def _lost_workers() -> tuple[type[BaseException], ...]:
    """Ray's errors of a node or worker lost mid-job: the cluster's failure, not strata's, and a re-run resumes."""
    exceptions = getattr(sys.modules.get("ray"), "exceptions", None)
    names = ("ActorDiedError", "ActorUnavailableError", "NodeDiedError", "WorkerCrashedError", "OwnerDiedError",
             "ObjectLostError")
    return tuple(getattr(exceptions, n) for n in names if exceptions is not None and hasattr(exceptions, n))


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Errors of reaching the storage at all: a "not found" they caused (fsspec's HTTP) is a storage failure."""
    return tuple(e for e in _storage_errors() if e.__name__ not in ("PermissionError", "NoCredentialsError",
                                                                    "ClientError"))


def _job_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [JobFailed]
    sink = sys.modules.get("pipeline.extract.sink")  # imported (with Ray) only by a job that can raise it
    if sink is not None:
        errors.append(sink.ErrorBudgetExceeded)
    monitor = sys.modules.get("pipeline.extract.monitor")
    if monitor is not None:
        errors.append(monitor.JobStalled)
    commit = sys.modules.get("pipeline.stores.commit")
    if commit is not None:
        errors.append(commit.CommitConflict)
    return tuple(errors)


def not_found_as(key: str, exc: FileNotFoundError, fallback: str) -> FileNotFoundError:
    """The same "not found" (exit 3), named as the setting that points there, its URI redacted."""
    from .storage import redact_uri

    return FileNotFoundError(f"{key}: {redact_uri(str(exc.filename or fallback))} not found ({exc.strerror or exc})")


def first_line(exc: BaseException) -> str:
    """The first line of the exception's own words, credentials masked. A Ray task error's text is the
    remote traceback, so the error it wraps speaks instead (Ray Data appends its retry advice after a
    line break)."""
    from .storage import scrub

    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return scrub(first)


def classify(exc: BaseException) -> Failure:
    """The exit code and one line for `exc`; unexpected errors (bugs) get INTERNAL and their type named."""
    from .schema import ConfigError

    if isinstance(exc, KeyboardInterrupt):
        return Failure(INTERRUPTED, "interrupted", True)
    kinds: list[tuple[tuple[type[BaseException], ...], int]] = [
        (_job_errors(), JOB_FAILED),
        ((ConfigError,), USAGE),
        ((FileNotFoundError,), NOT_FOUND),
        (_storage_errors(), STORAGE),
        ((ValueError, KeyError), USAGE),
    ]
    chain = list(_chain(exc))
    judged = any(isinstance(e, _job_errors() + (ConfigError,)) for e in chain)  # a job or config error speaks first
    lost = next((e for e in chain if isinstance(e, _lost_workers())), None)
    if lost is not None and not judged:
        return Failure(JOB_FAILED, f"the cluster lost a node or worker during the job ({type(lost).__name__}: "
                                   f"{first_line(lost)[:200]}); blocks written so far are kept, nothing was "
                                   f"published: run the same command again to resume", True)
    if any(isinstance(e, FileNotFoundError) for e in chain):
        reach = next((e for e in chain if isinstance(e, _connection_errors())), None)
        if reach is not None and not judged:
            return Failure(STORAGE, f"storage unreachable: {first_line(chain[0])} ({first_line(reach)})", True)
    for types_, code in kinds:
        for e in chain:
            if isinstance(e, types_):
                message = first_line(e)
                if code == STORAGE and not isinstance(e, PermissionError):
                    message = f"storage unreachable: {message}"
                return Failure(code, message, True)
    for e in chain:
        if isinstance(e, OSError):
            return Failure(STORAGE, f"{type(e).__name__}: {first_line(e)}", True)
    return Failure(INTERNAL, f"unexpected {type(exc).__name__}: {first_line(exc)}", False)


_TRACEBACK_MARKS = ("Traceback (most recent call last)", '\n  File "')


@contextmanager
def tracebacks_hidden(hidden: bool) -> Iterator[None]:
    """Log records (Ray's included) lose their tracebacks while the command runs: the failure's one line
    says what happened, and -v shows everything."""
    if not hidden:
        yield
        return
    make_record = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        had_trace = bool(record.exc_info or record.stack_info)
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the handler's business
            return record
        if had_trace or any(mark in message for mark in _TRACEBACK_MARKS):
            first = next((ln for ln in message.splitlines() if ln.strip()), "")
            record.msg, record.args = f"{first} [traceback hidden: -v shows it]", None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make_record)


def stop_ray() -> None:
    """Ray's shutdown messages come before the failure's line, not after it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # the failure being reported matters more
            pass
