"""Manifests: a CSV or Parquet table of image URIs with label, id and split columns."""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.sources.units import WorkUnit
from pipeline.storage import redact_uri

from pipeline.sources.base import (
    MISSING,
    ImageRecord,
    Source,
    file_fingerprints,
    sorted_unique,
    url_to_fs,
)

__all__ = ["ManifestSource", "read_table"]

logger = logging.getLogger(__name__)

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zip")


def read_table(
    uri: str,
    *,
    format: str | None = None,
    string_columns: Sequence[str] = (),
    storage_options: Mapping[str, Any] | None = None,
) -> pa.Table:
    """Read a CSV/TSV (optionally compressed) or Parquet table through fsspec.

    ``string_columns`` are read as text so that ids like ``0007`` keep their zeros.
    """
    fs, path = url_to_fs(uri, storage_options)
    format = format or _infer_format(path)
    if format == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    if format not in ("csv", "tsv"):
        raise ValueError(f"unknown manifest format {format!r}; valid: csv, tsv, parquet")
    with fs.open(path, "rb", compression="infer") as f:
        return pa_csv.read_csv(
            f,
            parse_options=pa_csv.ParseOptions(delimiter="\t" if format == "tsv" else ","),
            convert_options=pa_csv.ConvertOptions(column_types={c: pa.string() for c in string_columns}),
        )


def _infer_format(path: str) -> str:
    name = path.lower()
    for suffix in _COMPRESSIONS:
        name = name.removesuffix(suffix)
    for suffix, format in _FORMATS.items():
        if name.endswith(suffix):
            return format
    raise ValueError(f"cannot tell the format of {path!r}; pass format= one of csv, tsv, parquet")


@dataclass(frozen=True)
class ManifestSource(Source):
    """Images listed in a table with a URI column.

    Relative URIs are resolved against ``base_uri``, which defaults to the folder
    holding the manifest. ``id_column=None`` uses an ``image_id`` column when there
    is one, else the URI relative to ``base_uri`` (the URI itself when outside it).
    ``label_columns=None`` means every column that is not the uri, id, split or
    fingerprint column. A listed file that does not exist gets the fingerprint
    ``"missing"`` so that the job records it as an error instead of stopping.
    """

    manifest_uri: str
    _: KW_ONLY
    uri_column: str = "uri"
    id_column: str | None = None
    label_columns: Sequence[str] | None = None
    split_column: str | None = "split"
    base_uri: str | None = None
    fingerprint_column: str | None = None
    format: str | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.label_columns is not None:
            object.__setattr__(self, "label_columns", tuple(self.label_columns))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def list_images(self) -> list[ImageRecord]:
        table = read_table(self.manifest_uri, format=self.format, string_columns=self._text_columns(),
                           storage_options=self.storage_options)
        records = self.records(table, fingerprints=True)
        logger.info("listed %d images from manifest %s", len(records), self.manifest_uri)
        return sorted_unique(records, hint="; name a unique column in source.options.id_column")

    def list_units(self) -> Iterator[WorkUnit]:
        """Content-defined pages of the manifest's rows, streamed: the driver keeps units (and an 8-byte hash
        per id, to refuse duplicates), never rows. Without a fingerprint column a unit's content is unknown
        to the driver: its task asks the storage for each image's fingerprint."""
        from .manifest_units import list_manifest_units

        return list_manifest_units(self)

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        from .manifest_units import read_unit_rows

        return sorted(self.records(read_unit_rows(self, unit), fingerprints=True), key=lambda r: r.image_id)

    def label_schema(self, units: Sequence[WorkUnit]) -> pa.Schema:
        """The label columns with the types the driver's pass saw (no image is touched)."""
        from .manifest_units import _arrow_type

        types = units[0].params.get("types", {}) if units else {}
        roles = self._columns(list(types))
        return pa.schema([(name, _arrow_type(types[name])) for name in roles["labels"]])

    def _text_columns(self) -> list[str]:
        id_column = self.id_column or "image_id"
        return [n for n in (self.uri_column, id_column, self.split_column, self.fingerprint_column) if n]

    def records(self, table: pa.Table, *, fingerprints: bool) -> list[ImageRecord]:
        """Records of manifest rows; without a fingerprint column, ``fingerprints`` asks the storage (one
        request per image), else the fingerprint is left empty."""
        roles = self._columns(table.column_names)
        used = [roles["uri"], roles["id"], roles["split"], roles["fingerprint"], *roles["labels"]]
        column = {name: table.column(name).to_pylist() for name in used if name}
        raw_uris = column[roles["uri"]]
        empty = [row for row, raw in enumerate(raw_uris) if not raw]
        if empty:
            raise ValueError(f"{self.manifest_uri}: empty {self.uri_column!r} in rows {empty[:10]}")
        base_fs, base_path = url_to_fs(self._base_uri(), self.storage_options)
        resolved = [_resolve(raw, base_fs, base_path) for raw in raw_uris]
        uris = [uri for uri, _ in resolved]
        ids = [str(v) for v in column[roles["id"]]] if roles["id"] else [_public_id(i) for _, i in resolved]
        if roles["fingerprint"]:
            prints = [str(v) for v in column[roles["fingerprint"]]]
        else:
            prints = self._fingerprints(uris) if fingerprints else [""] * len(uris)
        splits = column[roles["split"]] if roles["split"] else [None] * len(uris)
        return [
            ImageRecord(
                image_id=ids[row],
                uri=uris[row],
                fingerprint=prints[row],
                labels={name: column[name][row] for name in roles["labels"]},
                split=None if splits[row] is None else str(splits[row]),
            )
            for row in range(len(uris))
        ]

    def _columns(self, present: Sequence[str]) -> dict[str, Any]:
        """Which column plays which role; a named column that is absent is an error."""

        def require(name: str, role: str) -> str:
            if name not in present:
                raise ValueError(
                    f"{self.manifest_uri}: no {role} column {name!r}; columns are {list(present)}"
                )
            return name

        uri = require(self.uri_column, "uri")
        if self.id_column is not None:
            id_ = require(self.id_column, "id")
        else:
            id_ = "image_id" if "image_id" in present else None
        if self.split_column is not None and self.split_column != "split":
            split = require(self.split_column, "split")
        else:
            split = self.split_column if self.split_column in present else None
        fingerprint = require(self.fingerprint_column, "fingerprint") if self.fingerprint_column else None
        roles = {uri, id_, split, fingerprint}
        if self.label_columns is None:
            label_names = [name for name in present if name not in roles]
        else:
            label_names = [require(name, "label") for name in self.label_columns]
        return {"uri": uri, "id": id_, "split": split, "fingerprint": fingerprint, "labels": label_names}

    def _base_uri(self) -> str:
        if self.base_uri is not None:
            return self.base_uri
        fs, path = url_to_fs(self.manifest_uri, self.storage_options)
        return fs.unstrip_protocol(posixpath.dirname(path))

    def _fingerprints(self, uris: Sequence[str]) -> list[str]:
        fingerprints = file_fingerprints(uris, lambda _uri: self.storage_options)
        n_missing = fingerprints.count(MISSING)
        if n_missing:
            logger.warning("%s: %d listed files do not exist", self.manifest_uri, n_missing)
        return fingerprints


def _public_id(image_id: str) -> str:
    """An id without URL credentials or a signed URL's query: those are secrets (and a signature changes at
    every signing, which would make the same image a new one)."""
    if redact_uri(image_id) == image_id:
        return image_id
    head = image_id.partition("?")[0]
    return re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]+@", r"\1", head)


def _resolve(raw: str, base_fs: AbstractFileSystem, base_path: str) -> tuple[str, str]:
    """(absolute uri, id) for one manifest entry.

    Relative entries join the base folder and keep their normalised text as id;
    absolute ones (a bare ``/path`` is local) get an id relative to the base when
    inside it, else the full URI.
    """
    if "://" not in raw and not raw.startswith("/"):
        path = posixpath.normpath(posixpath.join(base_path, raw))
        return base_fs.unstrip_protocol(path), posixpath.normpath(raw)
    uri = raw if "://" in raw else "file://" + posixpath.normpath(raw)
    base_uri = base_fs.unstrip_protocol(base_path).rstrip("/") + "/"
    return uri, (uri[len(base_uri) :] if uri.startswith(base_uri) else uri)
