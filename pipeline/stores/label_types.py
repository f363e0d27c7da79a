"""Label columns of a feature set: their names, their Arrow types, and values that keep to them.

A store keeps each label's type for its whole life: readers (pyarrow, duckdb, polars) see one schema
across versions. Text may not become numbers or the other way round; integers and floats may trade places
(a CSV round-trip through pandas turns 3 into 3.0), each value checked as it is written.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pyarrow as pa

RESERVED_COLUMNS = ("image_id", "uri", "fingerprint", "row", "shard", "status", "split")
#: Field metadata of an integer label column whose values index a list of class names (a ``datasets``
#: ``ClassLabel``): the store keeps the integers and records the names in each version.
CLASS_NAMES = b"class_names"


def class_names(labels: pa.Schema) -> dict[str, list[str]]:
    """The class names of the label columns that have them, by column."""
    out = {}
    for f in labels:
        raw = (f.metadata or {}).get(CLASS_NAMES)
        if raw is not None:
            out[f.name] = [str(n) for n in json.loads(raw)]
    return out


def stored_class_names(source: pa.Schema, stored: pa.Schema) -> dict[str, list[str]]:
    """The source's class names of the label columns the store holds as numbers (integers, or floats where a
    column was widened)."""
    ints = {f.name for f in stored if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)}
    return {k: v for k, v in class_names(source).items() if k in ints}


def with_class_names(field: pa.Field, names: Sequence[str] | None) -> pa.Field:
    return field if names is None else field.with_metadata({CLASS_NAMES: json.dumps(list(names))})


def class_name(names: Sequence[str] | None, value) -> str | None:
    """The name of class ``value`` (an integer index into ``names``), or None when it has none."""
    if names is None or value is None or isinstance(value, bool):
        return None
    try:
        k = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return names[k] if k == value and 0 <= k < len(names) else None


def label_schema(records: Sequence[Mapping]) -> pa.Schema:
    """Arrow types of the label columns, inferred once over the whole listing so every shard agrees."""
    names = sorted({k for r in records for k in r.get("labels", {})})
    _refuse_reserved(names)
    fields = []
    for name in names:
        arr = pa.array([r.get("labels", {}).get(name) for r in records])
        if pa.types.is_null(arr.type):
            arr = arr.cast(pa.string())
        fields.append(pa.field(name, arr.type))
    return pa.schema(fields)


def _refuse_reserved(names: Sequence[str]) -> None:
    clash = sorted(set(names) & set(RESERVED_COLUMNS))
    if clash:
        raise ValueError(f"label column(s) {clash} collide with index columns {list(RESERVED_COLUMNS)}; rename them, "
                         f"or name the source's own columns in source.options (id_column, uri_column, "
                         f"label_columns)")


def label_array(field: pa.Field, values: Sequence) -> pa.Array:
    """A label column in the store's type for it; a value that type cannot hold is a ValueError naming both."""
    try:
        return _safe_array(values, field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        bad = next((v for v in values if v is not None and not _fits(v, field.type)), None)
        raise ValueError(f"label column {field.name!r} holds {field.type} in this feature set, and the source now "
                         f"gives {bad!r}; a store keeps each label's type: fix the values, give the column a new "
                         f"name, or write a new feature set (store.featureset=<name>)") from None


def _safe_array(values: Sequence, type_: pa.DataType) -> pa.Array:
    """pa.array(values, type_) truncates 11.5 to 11 in an int64 column: infer, then cast safely."""
    arr = pa.array(values)
    return arr if arr.type == type_ else arr.cast(type_, safe=True)


def _fits(value, type_: pa.DataType) -> bool:
    try:
        _safe_array([value], type_)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return False


_KIND = {"int64": "number", "int32": "number", "double": "number", "float": "number", "string": "text",
         "large_string": "text", "bool": "bool"}


def check_label_types(old: Sequence[Mapping], new: Sequence[Mapping], featureset: str) -> None:
    """Refuse, before any work, a label column whose values changed kind (text <-> numbers or booleans).

    Integers and floats may trade places (a CSV round-trip through pandas turns 3 into 3.0): each value is
    checked when written (label_array)."""
    before = {f["name"]: f["type"] for f in old}
    for f in new:
        was, now = before.get(f["name"]), f["type"]
        if was is None or now == "null" or _KIND.get(now, now) == _KIND.get(was, was):
            continue
        raise ValueError(f"label column {f['name']!r} holds {was} in feature set {featureset}, and the source now "
                         f"gives {now} values; a store keeps each label's type: fix the values, give the column a "
                         f"new name, or write a new feature set (store.featureset=<name>)")


def check_labels(labels: pa.Schema) -> None:
    """Label columns a store can hold: not an index column's name, and of a supported type."""
    _refuse_reserved(labels.names)
    for f in labels:
        if str(f.type) not in LABEL_TYPES:
            raise ValueError(f"label column {f.name!r} has type {f.type}, which a store cannot hold; valid: "
                             f"{sorted(LABEL_TYPES)}. Leave it out with source.options.label_columns, or name "
                             f"it as the source's image or id column")


def schema_from_json(fields: Sequence[Mapping]) -> pa.Schema:
    return pa.schema([pa.field(f["name"], type_from_str(f["type"])) for f in fields])


LABEL_TYPES = {"string": pa.string(), "large_string": pa.large_string(), "int64": pa.int64(), "int32": pa.int32(),
               "double": pa.float64(), "float": pa.float32(), "bool": pa.bool_()}


def type_from_str(name: str, default: pa.DataType | None = None) -> pa.DataType:
    """The Arrow type of a label column from its name (``str(type)``); other names raise, or give ``default``."""
    if name in LABEL_TYPES:
        return LABEL_TYPES[name]
    if default is not None:
        return default
    raise ValueError(f"label type {name!r} is not supported; valid: {sorted(LABEL_TYPES)}")
