"""Storage access: fsspec URIs, object-store options, atomic and conditional writes."""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    from zarr.abc.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variables that name an S3 endpoint, highest priority first.
ENDPOINT_ENV_VARS: tuple[str, ...] = (
    "STRATA_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
)
#: Environment variables whose *values* must never reach a log line.
SECRET_ENV_VARS: tuple[str, ...] = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
S3_PROTOCOLS = frozenset({"s3", "s3a"})
# Backends where one PUT of a whole object is atomic: readers see the old object or
# the new one, never a prefix (S3 multipart uploads also appear only on completion).
_WHOLE_OBJECT_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oci", "oss", "memory"}
)
_MASK = "***"
_SECRET_KEYS = frozenset({"key", "secret", "token", "aws_access_key_id"})
_SECRET_PARTS = ("secret", "password", "passwd", "token", "credential")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s]+@")
_KV_SECRET = re.compile(r"(?i)((?:secret|password|token|signature)[\w-]*[=:]\s*)[^\s&,;'\"]+")


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


# --------------------------------------------------------------------------- options


def protocol_of(uri: str) -> str:
    """The fsspec protocol of ``uri``; plain paths are ``file``."""
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol or "file"


def storage_options_for(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Options for ``uri`` with environment defaults filled in; explicit options win.

    Only the S3 endpoint is merged from the environment (``STRATA_S3_ENDPOINT_URL``,
    then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``). Credentials stay in the
    environment, where botocore reads them itself, so they are not copied around.
    """
    options = dict(storage_options or {})
    if protocol_of(uri) not in S3_PROTOCOLS:
        return options
    client_kwargs = dict(options.get("client_kwargs") or {})
    if "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
        endpoint = next((os.environ[v] for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
            options["client_kwargs"] = client_kwargs
    return options


def resolve(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and in-filesystem path for ``uri`` (plain path, file://, s3://, memory://...)."""
    options = storage_options_for(uri, storage_options)
    try:
        return url_to_fs(uri, **options)
    except (ValueError, TypeError, ImportError) as exc:
        # The original message may echo arguments; say what failed without them.
        raise ValueError(
            f"cannot open storage {redact_uri(uri)!r} with options {redact(options)}: "
            f"{type(exc).__name__}: {scrub(str(exc), _secret_values(options))}"
        ) from None


def fingerprint_from_info(info: Mapping[str, Any]) -> str | None:
    """``etag:<etag>`` (object stores) or ``size:<n>-mtime:<ns>`` (file systems), else None.

    Cheap because listings already return this; content hashing is the fallback.
    """
    for key in ("ETag", "etag", "Etag"):
        etag = info.get(key)
        if etag:
            return "etag:" + str(etag).strip('"')
    size, mtime = info.get("size"), info.get("mtime")
    if size is None or mtime is None:
        return None
    if isinstance(mtime, dt.datetime):
        mtime = mtime.timestamp()
    return f"size:{int(size)}-mtime:{int(float(mtime) * 1_000_000_000)}"


def zarr_store(
    uri: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool
) -> Store:
    """A zarr-python 3 store for ``uri``.

    Local paths get ``zarr.storage.LocalStore`` (native, writes through temp + rename).
    Everything else gets ``FsspecStore.from_url``, which needs an *asynchronous*
    filesystem: ``from_url`` adds ``asynchronous=True`` itself for async backends such
    as s3fs and wraps sync ones (memory://) in ``AsyncFileSystemWrapper``. Do not build
    the store from the sync instance that :func:`resolve` returns.
    """
    import zarr.storage

    if protocol_of(uri) in ("file", "local"):
        _, path = resolve(uri)
        return zarr.storage.LocalStore(path, read_only=read_only)
    options = storage_options_for(uri, storage_options)
    return zarr.storage.FsspecStore.from_url(uri, storage_options=options, read_only=read_only)


# --------------------------------------------------------------------------- redaction


def _is_secret_key(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_KEYS or any(part in lowered for part in _SECRET_PARTS)


def redact(options: Any) -> Any:
    """Copy of ``options`` with credentials masked (nested mappings and lists too).

    For logs and error messages: masks ``key``, ``secret``, ``token`` and any key
    containing secret/password/token/credential.
    """
    if isinstance(options, Mapping):
        return {
            k: (_MASK if _is_secret_key(str(k)) and v is not None else redact(v))
            for k, v in options.items()
        }
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    if isinstance(options, str):
        return redact_uri(options)
    return options


def redact_uri(uri: str) -> str:
    """``uri`` without a ``user:password@`` part."""
    return _URL_USERINFO.sub(rf"\g<scheme>{_MASK}@", uri)


def _secret_values(options: Any) -> list[str]:
    """Literal secret values found in ``options`` (to scrub them from free text)."""
    found: list[str] = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            if isinstance(v, str) and _is_secret_key(str(k)):
                found.append(v)
            else:
                found += _secret_values(v)
    elif isinstance(options, (list, tuple)):
        for v in options:
            found += _secret_values(v)
    return found


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL credentials, ``secret=...`` pairs and known secret values masked.

    Secrets from :data:`SECRET_ENV_VARS` are always masked.
    """
    values = [os.environ.get(v, "") for v in SECRET_ENV_VARS] + list(secrets)
    for value in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
        text = text.replace(value, _MASK)
    return _KV_SECRET.sub(rf"\1{_MASK}", redact_uri(text))


# --------------------------------------------------------------------------- writes


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local POSIX filesystem, where rename and link give atomicity."""
    return isinstance(fs, LocalFileSystem)


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/.{tail}.{uuid.uuid4().hex}.tmp"


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


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Write ``obj`` as stable, sorted JSON with :func:`atomic_write_bytes`."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    atomic_write_bytes(fs, path, text.encode("utf-8"))


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parse the JSON document at ``path`` (FileNotFoundError if absent)."""
    return json.loads(fs.cat_file(path))


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


# --------------------------------------------------------------------------- retries


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
