"""Redaction: credentials, signed-URL parameters and registered secret values never reach a file or a log."""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

#: Environment variables whose *values* must never reach a log line or a file.
SECRET_ENV_VARS: tuple[str, ...] = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MASK = "***"
_SECRET_KEYS = frozenset({"key", "secret", "token", "aws_access_key_id", "sig", "apikey", "api_key"})
_SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "signature", "private_key",
                 "access_key", "session")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://)[^/@\s'\"]+@")
# Signed URLs (S3 presigned, GCS, Azure SAS, CloudFront) carry the secret in query parameters.
_QUERY_SECRET = re.compile(
    r"(?P<lead>[?&;](?:[\w.-]*(?:sig|signature|credential|token|secret|password|passwd|key|policy|auth)"
    r"[\w.-]*)=)[^&#\s'\"]+",
    re.IGNORECASE,
)
_KV_SECRET = re.compile(
    r"(?i)((?:secret|password|passwd|token|signature|credential)[\w-]*[\"']?\s*[=:]\s*[\"']?)[^\s&,;'\"}]+"
)
_registered: set[str] = set()
_lock = threading.Lock()


def is_secret_key(name: str) -> bool:
    """True for option names that hold credentials (``key``, ``secret``, ``*token*``, ``*password*``...)."""
    lowered = name.lower()
    return lowered in _SECRET_KEYS or any(part in lowered for part in _SECRET_PARTS)


def redact(options: Any) -> Any:
    """Copy of ``options`` with credentials masked (nested mappings and lists too); strings get :func:`redact_uri`.

    For anything that is written or logged: config sections, storage options, provenance.
    """
    if isinstance(options, Mapping):
        return {
            k: (MASK if is_secret_key(str(k)) and v not in (None, "", False) else redact(v))
            for k, v in options.items()
        }
    if isinstance(options, (list, tuple)):
        return type(options)(redact(v) for v in options)
    if isinstance(options, str):
        return scrub(options)
    return options


def redact_uri(uri: str) -> str:
    """``uri`` without a ``user:password@`` part or signed-URL parameter values."""
    return _QUERY_SECRET.sub(rf"\g<lead>{MASK}", _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", uri))


def secret_values(options: Any) -> list[str]:
    """Literal secret values found in ``options`` (to scrub them from free text)."""
    found: list[str] = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            if isinstance(v, str) and is_secret_key(str(k)):
                found.append(v)
            else:
                found += secret_values(v)
    elif isinstance(options, (list, tuple)):
        for v in options:
            found += secret_values(v)
    return found


def register_secrets(options: Any) -> None:
    """Remember the secret values in ``options`` (a config, storage options) so that :func:`scrub` masks them
    in any text from now on in this process, wherever they turn up (an echoed URL, a library's error)."""
    values = {v for v in secret_values(options) if len(v) >= 4}
    with _lock:
        _registered.update(values)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL credentials, signed-URL parameters, ``secret=...`` pairs and known secret values masked.

    Secrets from :data:`SECRET_ENV_VARS` and those registered with :func:`register_secrets` are always masked.
    """
    values = [os.environ.get(v, "") for v in SECRET_ENV_VARS] + list(secrets) + list(_registered)
    for value in sorted({v for v in values if len(v) >= 4}, key=len, reverse=True):
        text = text.replace(value, MASK)
    return _KV_SECRET.sub(rf"\1{MASK}", redact_uri(text))


class RedactingFilter(logging.Filter):
    """A handler filter that scrubs every record's final message (and its traceback text) before it is emitted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is not ours to fix here
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            record.exc_text = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactingFilter` to every handler of ``logger`` (default: root) that lacks one."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
