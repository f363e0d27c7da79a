"""A store-level lease: one holder at a time for short metadata changes (growing the Zarr arrays).

Taken with create-if-absent, so it is as strong as the store's conditional write. A holder that dies leaves
the lease behind; it expires after ``ttl`` seconds and the next taker breaks it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator

from .. import storage
from . import layout
from .cas import create_exclusive

log = logging.getLogger(__name__)


class StoreLockTimeout(TimeoutError):
    pass


@contextlib.contextmanager
def store_lease(fs, base: str, *, purpose: str, ttl: float = 60.0, wait: float = 120.0) -> Iterator[None]:
    """Hold the feature set's lease for the ``with`` body (which should take far less than ``ttl``)."""
    path = layout.lock_path(base)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        doc = {"owner": owner, "purpose": purpose, "expires_at": time.time() + ttl}
        if create_exclusive(fs, base, path, json.dumps(doc).encode()):
            break
        _break_if_expired(fs, path)
        if time.monotonic() > deadline:
            raise StoreLockTimeout(f"the feature set at {storage.redact_uri(base)} stayed locked for {wait:.0f} s "
                                   f"({_describe(fs, path)}); if its holder died, the lease expires by itself")
        time.sleep(delay)
        delay = min(0.5, delay * 2)
    try:
        yield
    finally:
        try:
            current = json.loads(storage.cat_small(fs, path))
            if current.get("owner") == owner:
                fs.rm(path)
        except FileNotFoundError:
            log.warning("lease on %s was broken while held (%s)", storage.redact_uri(base), purpose)


def _break_if_expired(fs, path: str) -> None:
    try:
        raw = storage.cat_small(fs, path)
        held = json.loads(raw)
    except FileNotFoundError:
        return
    except ValueError:  # a lease file cut short: only a crash mid-write makes one
        held = {"expires_at": 0}
    if float(held.get("expires_at", 0)) < time.time():
        log.warning("breaking an expired lease held by %s", held.get("owner"))
        try:
            if storage.cat_small(fs, path) == raw:  # not a fresh lease taken meanwhile
                fs.rm(path)
        except FileNotFoundError:
            pass


def _describe(fs, path: str) -> str:
    try:
        held = json.loads(storage.cat_small(fs, path))
        return f"held by {held.get('owner')} for {held.get('purpose')}"
    except (FileNotFoundError, ValueError):
        return "holder unknown"
