"""URIs: fsspec filesystems and zarr stores for any URI, with object-store options from the environment."""
from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from .redaction import redact, redact_uri, scrub, secret_values
from .retries import client_retry_config

if TYPE_CHECKING:
    from zarr.abc.store import Store

#: Environment variables that name an S3 endpoint, highest priority first.
ENDPOINT_ENV_VARS: tuple[str, ...] = (
    "STRATA_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
)
S3_PROTOCOLS = frozenset({"s3", "s3a"})


def protocol_of(uri: str) -> str:
    """The fsspec protocol of ``uri``; plain paths are ``file``."""
    protocol, _ = fsspec.core.split_protocol(uri)
    return protocol or "file"


def absolute_uri(uri: str) -> str:
    """``uri`` as it names the same data from any working directory: a local path made absolute (``file://``
    dropped), any other URI unchanged. What a record of where data came from should hold."""
    if protocol_of(uri) not in ("file", "local"):
        return uri
    path = uri.split("://", 1)[-1] if "://" in uri else uri
    return os.path.abspath(os.path.expanduser(path))


def storage_options_for(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Options for ``uri`` with environment defaults filled in; explicit options win.

    S3 gets the one retry policy (botocore's, see :func:`client_retry_config`). Only the S3 endpoint is
    merged from the environment (``STRATA_S3_ENDPOINT_URL``,
    then ``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``). Credentials stay in the
    environment, where botocore reads them itself, so they are not copied around.
    """
    options = dict(storage_options or {})
    if protocol_of(uri) not in S3_PROTOCOLS:
        return options
    options["config_kwargs"] = {**client_retry_config(), **dict(options.get("config_kwargs") or {})}
    client_kwargs = dict(options.get("client_kwargs") or {})
    if "endpoint_url" not in options and "endpoint_url" not in client_kwargs:
        var = next((v for v in ENDPOINT_ENV_VARS if os.environ.get(v)), None)
        endpoint = os.environ[var] if var else None
        if endpoint and "://" not in endpoint:
            raise ValueError(f"{var}={endpoint!r} is not a URL: give its scheme, e.g. http://{endpoint}")
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
            options["client_kwargs"] = client_kwargs
    return options


def resolve(
    uri: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and in-filesystem path for ``uri`` (plain path, file://, s3://, memory://...)."""
    options = storage_options_for(uri, storage_options)
    if protocol_of(uri) in S3_PROTOCOLS:
        check_s3_options(options)
    try:
        return url_to_fs(uri, **options)
    except (ValueError, TypeError, ImportError) as exc:
        # The original message may echo arguments; say what failed without them.
        raise ValueError(
            f"cannot open storage {redact_uri(uri)!r} with options {redact(options)}: "
            f"{type(exc).__name__}: {scrub(str(exc), secret_values(options))}"
        ) from None


#: fsspec's own options, which every filesystem takes.
_FSSPEC_OPTIONS = frozenset({"skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths",
                             "batch_size"})


def check_s3_options(options: Mapping[str, Any]) -> None:
    """Refuse option names s3fs would pass on unchecked, to fail only at the first request (an internal-looking
    TypeError): its own, fsspec's and aiobotocore's session options; client_kwargs and config_kwargs too."""
    import inspect

    import botocore.config
    import botocore.session
    import s3fs
    from aiobotocore.session import AioSession

    def names(fn) -> set[str]:
        return {p.name for p in inspect.signature(fn).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}

    levels = [("storage_options", options, names(s3fs.S3FileSystem.__init__) | names(AioSession.__init__)
               | _FSSPEC_OPTIONS),
              ("storage_options.client_kwargs", options.get("client_kwargs") or {},
               names(botocore.session.Session.create_client) - {"service_name"}),
              ("storage_options.config_kwargs", options.get("config_kwargs") or {},
               set(botocore.config.Config.OPTION_DEFAULTS))]
    for where, given, valid in levels:
        unknown = sorted(set(given) - valid)
        if unknown:
            raise ValueError(f"unknown S3 option(s) {unknown} in {where}; valid: {sorted(valid)}")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local POSIX filesystem, where rename and link give atomicity."""
    return isinstance(fs, LocalFileSystem)


def modified_time(info: Mapping[str, Any]) -> float:
    """A file's modification time (seconds) from fsspec info: local ``mtime``, S3 ``LastModified``, GCS
    ``updated``...; 0.0 when there is none."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, dt.datetime):
            return value.timestamp()
        try:
            return float(value)
        except (TypeError, ValueError):
            try:
                return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


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


def cat_small(fs: fsspec.AbstractFileSystem, path, **kwargs):
    """``fs.cat`` for small objects (manifests, index tables): one GET each. s3fs otherwise sends a HEAD
    before every GET to decide on a concurrent ranged download, which doubles the requests of a commit."""
    if S3_PROTOCOLS & ({fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)):
        kwargs.setdefault("max_concurrency", 1)
    return fs.cat(path, **kwargs)
