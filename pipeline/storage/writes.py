"""Writes readers can trust: atomic replace, create-if-absent (the commit primitive), JSON documents."""
from __future__ import annotations

import errno
import json
import logging
import os
import uuid
from typing import Any

import fsspec

from .uris import cat_small, is_local

log = logging.getLogger("pipeline.storage")

# Backends where one PUT of a whole object is atomic: readers see the old object or
# the new one, never a prefix (S3 multipart uploads also appear only on completion).
_WHOLE_OBJECT_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "memory"}
)
#: Names of temporary files: a crash can leave them behind, and every store walk skips them.
TMP_SUFFIX = ".tmp"


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


def is_temporary(path: str) -> bool:
    """A temp file of an interrupted write (or any dot-file): never data, never referenced."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.startswith(".") or name.endswith(TMP_SUFFIX)


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.{uuid.uuid4().hex}{TMP_SUFFIX}"


def _write_local_tmp(path: str, data: bytes) -> str:
    """Write ``data`` durably to a temp file beside ``path``; return its name."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or all of the new.

    Local: temp file in the same directory, fsync, ``os.replace``. Object stores: one
    PUT is already all-or-nothing, so write directly. Other filesystems: temp + ``mv``.
    """
    if is_local(fs):
        tmp = _write_local_tmp(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise
    elif _protocols(fs) & _WHOLE_OBJECT_PROTOCOLS:
        fs.pipe_file(path, data)
    else:
        tmp = _tmp_name(path)
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


def json_bytes(obj: Any) -> bytes:
    """Stable, sorted JSON: the same document always has the same bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as stable, sorted JSON with :func:`atomic_write_bytes`."""
    atomic_write_bytes(fs, path, json_bytes(obj))


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parse the JSON document at ``path`` (FileNotFoundError if absent)."""
    return json.loads(cat_small(fs, path))


def put_if_absent(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if nothing is there; True if this call created it.

    Guards commits: of many racing writers exactly one gets True, and readers never
    see a partial object.

    - Local: temp file + ``os.link`` (fails atomically if ``path`` exists).
    - S3: a conditional PUT (``If-None-Match: *``) through s3fs ``mode="create"``;
      the server settles races. AWS S3 and SeaweedFS (tested: 4.48) honour it.
      An ``exists`` check first keeps servers that ignore the header correct at
      least for sequential callers.
    - memory:// and other fsspec backends: fsspec's own ``mode="create"``, which is
      check-then-write and therefore racy across processes.

    A retried call whose first PUT landed but whose reply was lost returns False;
    compare the stored bytes if that distinction matters.
    """
    if is_local(fs):
        return _put_if_absent_local(path, data)
    fs.invalidate_cache(path)
    if fs.exists(path):
        return False
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:
        if _is_precondition_failed(exc):
            return False
        raise
    return True


def _put_if_absent_local(path: str, data: bytes) -> bool:
    tmp = _write_local_tmp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # No hard links here (some FUSE/SMB mounts): exclusive create, not all-or-nothing.
        log.debug("hard links unsupported for %s; falling back to O_EXCL", path)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    finally:
        _unlink_quietly(tmp)


def _is_precondition_failed(exc: BaseException) -> bool:
    """s3fs reports HTTP 412 as a plain OSError; the botocore error is its cause."""
    cause = exc.__cause__
    response = getattr(cause, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code == "PreconditionFailed" or status == 412


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def honours_conditional_create(fs: fsspec.AbstractFileSystem, directory: str) -> bool:
    """Probe: does a second create-if-absent of one object fail? (Some S3-compatible servers ignore
    ``If-None-Match``.) Writes and removes one small object under ``directory``."""
    if is_local(fs):
        return True
    probe = f"{directory}/.cas-probe-{uuid.uuid4().hex}"
    fs.pipe_file(probe, b"1", mode="create")
    try:
        fs.pipe_file(probe, b"2", mode="create")
        return False
    except FileExistsError:
        return True
    except OSError as exc:
        if _is_precondition_failed(exc):
            return True
        raise
    finally:
        fs.rm(probe)


def remove_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete files, those already gone included: one request per 1,000 keys on S3, not one per file."""
    if not paths:
        return
    try:
        fs.rm(list(paths))
    except FileNotFoundError:  # a local disk stops at the first missing file
        for path in paths:
            try:
                fs.rm(path)
            except FileNotFoundError:
                pass
