"""Storage access: fsspec URIs, object-store options, redaction, atomic and conditional writes, retries.

One module per concern (``uris``, ``redaction``, ``writes``, ``retries``); import them from here.
"""
from .redaction import (
    MASK,
    SECRET_ENV_VARS,
    RedactingFilter,
    install_log_redaction,
    is_secret_key,
    redact,
    redact_uri,
    register_secrets,
    scrub,
    secret_values,
)
from .retries import PERMANENT_ERRORS, TRANSIENT_ERRORS, client_retry_config, retrying
from .uris import (
    ENDPOINT_ENV_VARS,
    S3_PROTOCOLS,
    absolute_uri,
    cat_small,
    fingerprint_from_info,
    is_local,
    modified_time,
    protocol_of,
    resolve,
    storage_options_for,
    zarr_store,
)
from .writes import (
    TMP_SUFFIX,
    atomic_write_bytes,
    honours_conditional_create,
    is_temporary,
    json_bytes,
    put_if_absent,
    read_json,
    remove_files,
    write_json_atomic,
)

__all__ = [
    "ENDPOINT_ENV_VARS", "MASK", "PERMANENT_ERRORS", "S3_PROTOCOLS", "SECRET_ENV_VARS", "TMP_SUFFIX",
    "TRANSIENT_ERRORS", "RedactingFilter", "atomic_write_bytes", "cat_small", "client_retry_config", "fingerprint_from_info", "honours_conditional_create",
    "install_log_redaction",
    "is_local", "is_secret_key", "is_temporary", "json_bytes", "modified_time", "protocol_of", "put_if_absent", "read_json",
    "redact", "redact_uri", "register_secrets", "resolve", "retrying", "scrub", "secret_values",
    "storage_options_for", "write_json_atomic", "zarr_store",
]
