"""Image columns of Arrow tables as Hugging Face ``datasets`` writes them: ``{bytes, path}`` structs (either
field may be null), plain binary, or plain path strings; and where a path-only image is read from."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from pipeline.sources.base import MISSING, file_fingerprints
from pipeline.sources.hf_features import features

__all__ = ["MISSING", "detect_image_column", "image_cells", "image_paths", "path_fingerprints", "paths_complete",
           "resolve_path", "storage_options_for"]



def detect_image_column(schema: pa.Schema, wanted: str | None) -> str:
    """``wanted``, else the first column the ``datasets`` features metadata types as ``Image``, else ``image``."""
    if wanted is not None:
        return wanted
    for name, feature in features(schema).items():
        if isinstance(feature, Mapping) and feature.get("_type") == "Image" and name in schema.names:
            return name
    if "image" in schema.names:
        return "image"
    raise ValueError(f"no image column: none is typed Image in the datasets metadata and none is named 'image'; "
                     f"pass image_column= one of {schema.names}")


def image_cells(column: pa.Array | pa.ChunkedArray) -> tuple[list[bytes | None], list[str | None]]:
    """(bytes, path) of every row. A null struct is no image at all, whatever its fields say; a string column
    holds paths only."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_struct(kind) and (kind.get_field_index("bytes") >= 0 or kind.get_field_index("path") >= 0):
        n = len(array)
        blobs = array.field("bytes").to_pylist() if kind.get_field_index("bytes") >= 0 else [None] * n
        paths = array.field("path").to_pylist() if kind.get_field_index("path") >= 0 else [None] * n
        valid = array.is_valid().to_pylist()
        return [b if ok else None for b, ok in zip(blobs, valid)], [p if ok else None for p, ok in zip(paths, valid)]
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return array.to_pylist(), [None] * len(array)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return [None] * len(array), array.to_pylist()
    raise ValueError(f"image column has type {kind}; expected binary, string (paths) or "
                     f"struct<bytes: binary, path: string>")


def paths_complete(array: pa.Array) -> bool:
    """True when every row of an image column (or of its ``path`` field alone) names a path."""
    kind = array.type
    if pa.types.is_struct(kind):
        return (kind.get_field_index("path") >= 0 and array.null_count == 0
                and array.field("path").null_count == 0)
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)) and array.null_count == 0


def image_paths(array: pa.Array) -> pa.Array:
    """The path of every row of a complete (``paths_complete``) image column."""
    return array.field("path") if pa.types.is_struct(array.type) else array


def resolve_path(path: str, root_uri: str) -> str:
    """The URI of an image path: as it is when it names a protocol, a local file when absolute (where
    ``datasets`` wrote it), else under the dataset root."""
    if "://" in path:
        return path
    if path.startswith("/"):
        return f"file://{path}"
    return posixpath.join(root_uri.rstrip("/"), path)


def path_fingerprints(uris: Sequence[str], storage_options: Mapping[str, Any] | None,
                      root_uri: str) -> list[str]:
    """Fingerprints of image files; the dataset's storage options apply to files on its own filesystem only."""
    return file_fingerprints(uris, lambda uri: storage_options_for(uri, root_uri, storage_options))


def storage_options_for(uri: str, root_uri: str, storage_options: Mapping[str, Any] | None) -> Mapping | None:
    """The dataset's storage options for a file on the dataset's own filesystem, none for others (an S3
    endpoint means nothing to a local path)."""
    return storage_options if _protocol(uri) == _protocol(root_uri) else None


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"
