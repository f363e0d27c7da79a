"""Create-if-absent for the store's commit points (versions, allocations, the lease), on any store.

Stores that honour conditional writes (local disks, AWS S3, SeaweedFS) settle races themselves. For an
S3-compatible server that ignores ``If-None-Match`` the fallback is check, write, wait, read back: the last
writer's document survives and every other writer reads back a document that is not its own, so it knows it
lost. That is safe while one check-then-write takes less than ``SETTLE_SECONDS``. Until then a racing writer
may still replace the document, so such documents say how they were written (``"commit_mode": "read-back"``)
and readers of a commit point go through :func:`read_settled`, which never writes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from .. import storage
from . import layout

log = logging.getLogger(__name__)

#: Seconds a fallback create waits before reading its object back: longer than one PUT can take.
SETTLE_SECONDS = 1.0
#: How far a client's clock may be from the object store's: S3 refuses requests signed more than 15 min off.
CLOCK_SKEW_SECONDS = 900.0
_support: dict[str, bool] = {}
READ_BACK = "read-back"
_settled: dict[tuple[str, str], bytes] = {}  # commit point -> digest of the document seen settled there


def create_exclusive(fs, base: str, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; True when this call's document is the one stored."""
    if conditional_writes(fs, base):
        if storage.put_if_absent(fs, path, data):
            return True
        # the client retries a PUT whose reply was lost: the object that refused the retry may be this one
        try:
            return storage.cat_small(fs, path) == data
        except FileNotFoundError:
            return False
    data = _flagged(data)
    fs.invalidate_cache(path)
    if fs.exists(path):
        return False
    storage.atomic_write_bytes(fs, path, data)
    time.sleep(SETTLE_SECONDS)
    fs.invalidate_cache(path)
    return fs.cat_file(path) == data


def read_settled(fs, path: str) -> bytes:
    """The document at a commit point, once no racing writer can replace it any more.

    A conditional create is final at once. Under the read-back protocol every racing write becomes visible
    within ``SETTLE_SECONDS`` of the first one, so a document seen now is final ``SETTLE_SECONDS`` later; and one
    whose last write started (its modification time) over twice that ago, plus the clock skew to the store, is
    final already. A loser's document read inside that window would hand a reader a version or an allocation
    that is about to vanish.
    """
    data = storage.cat_small(fs, path)
    key = (str(fs.protocol), path)
    if (key in _settled and _settled[key] == _digest(data)) or not _is_flagged(data):
        return data
    skew = 0.0 if storage.is_local(fs) else CLOCK_SKEW_SECONDS
    fs.invalidate_cache(path)
    written = storage.modified_time(fs.info(path))
    if not written or time.time() - written < 2 * SETTLE_SECONDS + skew:
        time.sleep(SETTLE_SECONDS)
        fs.invalidate_cache(path)
        data = storage.cat_small(fs, path)
    _settled[key] = _digest(data)
    return data


def _flagged(data: bytes) -> bytes:
    """A JSON document marked as written by the read-back protocol (other bytes as they are)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return data
    if not isinstance(doc, dict):
        return data
    return (json.dumps({**doc, "commit_mode": READ_BACK}, sort_keys=True, separators=(",", ":"),
                       ensure_ascii=False) + "\n").encode()


def _is_flagged(data: bytes) -> bool:
    if b'"commit_mode"' not in data:
        return False
    try:
        return json.loads(data).get("commit_mode") == READ_BACK
    except (ValueError, AttributeError):
        return False


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def conditional_writes(fs, base: str) -> bool:
    """Whether the store refuses a create over an existing object (probed once per process and bucket).

    ``STRATA_COMMIT_MODE=verify`` forces the fallback protocol (to test it on stores that do not need it).
    """
    if os.environ.get("STRATA_COMMIT_MODE", "").lower() == "verify":
        return False
    if storage.is_local(fs):
        return True
    root = base.split("/", 1)[0]
    if root not in _support:
        honoured = storage.honours_conditional_create(fs, f"{base}/{layout.MANIFEST_DIR}")
        if not honoured:
            log.warning("the object store behind %s ignores conditional writes (If-None-Match); commits use the "
                        "read-back protocol, safe while one write takes under %.0f s", storage.redact_uri(base),
                        SETTLE_SECONDS)
        _support[root] = honoured
    return _support[root]
