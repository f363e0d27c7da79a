"""The ``datasets`` features a Hugging Face Arrow or Parquet file records in its schema metadata."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

__all__ = ["class_label_names", "features"]


def features(schema: pa.Schema) -> Mapping[str, Any]:
    """Column -> feature description (``{"_type": "Image"}``, ``{"_type": "ClassLabel", "names": [...]}``...);
    empty when the file was not written by ``datasets`` or its metadata is unreadable."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    try:
        found = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return found if isinstance(found, Mapping) else {}


def class_label_names(schema: pa.Schema) -> dict[str, list[str]]:
    """The class names of each ``ClassLabel`` column: its integers index them."""
    out = {}
    for name, feature in features(schema).items():
        if (isinstance(feature, Mapping) and feature.get("_type") == "ClassLabel"
                and isinstance(feature.get("names"), list) and name in schema.names):
            out[name] = [str(n) for n in feature["names"]]
    return out
