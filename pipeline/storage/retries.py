"""Retries: one policy, applied where the retrying happens.

Object-store requests are retried by the storage client itself (botocore's "standard" mode: exponential
backoff with jitter, connection errors, throttling and 5xx; s3fs adds its own loop for a few read errors).
strata configures that once, here (``STRATA_STORAGE_ATTEMPTS``, else ``AWS_MAX_ATTEMPTS``, default 5;
``STRATA_STORAGE_CONNECT_TIMEOUT`` seconds, default 10), and does not wrap those calls again: stacked retries
turn a dead endpoint into hundreds of attempts. :func:`retrying` is for what no client retries.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from .redaction import scrub

log = logging.getLogger("pipeline.storage")

T = TypeVar("T")


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Errors that a bad minute on an object store produces and a retry can fix."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore import exceptions as bex

        errors += [bex.ConnectionError, bex.HTTPClientError]
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def client_retry_config() -> dict:
    """botocore ``Config`` arguments (s3fs ``config_kwargs``) for every S3 filesystem strata opens."""
    import os

    attempts = int(os.environ.get("STRATA_STORAGE_ATTEMPTS") or os.environ.get("AWS_MAX_ATTEMPTS") or 5)
    return {"retries": {"max_attempts": max(1, attempts), "mode": os.environ.get("AWS_RETRY_MODE", "standard")},
            "connect_timeout": float(os.environ.get("STRATA_STORAGE_CONNECT_TIMEOUT") or 10),
            "read_timeout": 120}


#: Default ``retry_on`` for :func:`retrying`.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = _transient_errors()
#: OSError subclasses that are answers, not outages: retrying them only wastes time.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def retrying(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
    retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    give_up_on: tuple[type[BaseException], ...] = PERMANENT_ERRORS,
    what: str | None = None,
) -> T:
    """Call ``fn()`` until it succeeds, sleeping with capped exponential backoff + jitter.

    For an object store's bad minutes. Errors in ``give_up_on`` (missing file, no
    permission...) are answers and raise at once; after ``attempts`` tries the last
    error is raised. Each retry is logged with credentials scrubbed.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    name = what or getattr(fn, "__name__", "call")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except give_up_on:
            raise
        except retry_on as exc:
            if attempt == attempts:
                log.warning("%s failed %d times; giving up: %s", name, attempts, _describe(exc))
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            delay = random.uniform(delay / 2, delay)
            log.warning(
                "%s failed (attempt %d/%d): %s; retrying in %.2fs",
                name, attempt, attempts, _describe(exc), delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _describe(exc: BaseException) -> str:
    return scrub(f"{type(exc).__name__}: {exc}")
