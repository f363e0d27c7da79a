"""Parquet files that hold the image bytes themselves (the Hugging Face datasets export layout)."""

from __future__ import annotations

import bisect
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.sources.base import (
    ImageRecord,
    Source,
    fingerprint_bytes,
    fingerprint_from_info,
    has_glob,
    relative_id,
    sorted_unique,
    url_to_fs,
)
from pipeline.sources.globbing import glob_root
from pipeline.sources.units import WorkUnit

__all__ = ["ParquetBytesSource"]

logger = logging.getLogger(__name__)

_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class ParquetBytesSource(Source):
    """Rows of Parquet files (one file, a folder of them, or a glob) whose image column holds bytes.

    The image column is either a struct ``{bytes: binary, path: string}`` (what
    ``datasets`` writes) or plain binary. Records carry the bytes in ``data``; the
    uri is ``<file uri>#<row>`` and the fingerprint is the sha256 of the bytes.
    Ids come from ``id_column``, else the struct's ``path`` when every row of the file has one,
    else ``<file path relative to the root, no suffix>/<row>``. Work units are row groups.
    """

    uri_or_glob: str
    _: KW_ONLY
    image_column: str = "image"
    id_column: str | None = None
    label_columns: Sequence[str] | None = None
    split_column: str | None = "split"
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    read_chunk = None  # rows of a shard share row groups: read them in one pass

    def __post_init__(self) -> None:
        if self.label_columns is not None:
            object.__setattr__(self, "label_columns", tuple(self.label_columns))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def list_images(self) -> list[ImageRecord]:
        records = [r for unit in self.list_units() for r in self.expand(unit)]
        logger.info("listed %d images from parquet files at %s", len(records), self.uri_or_glob)
        return sorted_unique(records, hint="; pass id_column= naming a unique column")

    def list_units(self) -> Iterator[WorkUnit]:
        """One unit per row group, from each file's footer and listing metadata: the driver never reads image
        bytes (only, without an id column, the image paths, to choose how ids are made)."""
        fs, target = url_to_fs(self.uri_or_glob, self.storage_options)
        root, paths = _parquet_files(fs, target)
        for path in paths:
            info = fs.info(path)
            file_print = fingerprint_from_info(info) or f"size:{info.get('size')}"
            stem = relative_id(path, root)
            for suffix in _PARQUET_SUFFIXES:
                stem = stem.removesuffix(suffix)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                use_path = self.id_column is None and self._has_paths(pf)
                row0 = 0
                for g in range(pf.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    yield WorkUnit(f"{stem}#rg={g}", f"{file_print}#rg={g}", n, size_bytes=info.get("size"),
                                   params={"path": path, "rg": g, "row0": row0, "stem": stem, "struct_path": use_path})
                    row0 += n

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        """A row group's images, bytes included (fingerprints are their sha256)."""
        fs, _ = url_to_fs(self.uri_or_glob, self.storage_options)
        p = unit.params
        with fs.open(p["path"], "rb") as f:
            table = pq.ParquetFile(f).read_row_group(p["rg"])
        self._check_columns(p["path"], table)
        blobs, image_paths = _image_bytes(table.column(self.image_column))
        records = self._records(fs.unstrip_protocol(p["path"]), p["stem"], blobs, image_paths, table,
                                p["struct_path"], row0=p["row0"])
        return sorted(records, key=lambda r: r.image_id)

    def _has_paths(self, pf: pq.ParquetFile) -> bool:
        kind = pf.schema_arrow.field(self.image_column).type if self.image_column in pf.schema_arrow.names else None
        if kind is None or not pa.types.is_struct(kind) or kind.get_field_index("path") < 0:
            return False
        column = pf.read(columns=[f"{self.image_column}.path"]).column(0).combine_chunks()
        if pa.types.is_struct(column.type):  # pyarrow keeps the parent struct around the selected child
            return column.null_count == 0 and column.field("path").null_count == 0
        return column.null_count == 0

    def read_bytes(self, record: ImageRecord) -> bytes:
        """Inline bytes, or (for a record that lost them) the row re-read from its file."""
        result = self.read_many([record])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def read_many(self, records: Sequence[ImageRecord], *, threads: int = 8) -> list[bytes | Exception]:
        """Rows grouped by file and row group: each needed row group's image column is read once.

        Records travel to decode workers without their inline bytes, so a shard of rows from one
        big file costs one pass over the row groups it touches, not one read of the file per row.
        """
        out: list[bytes | Exception | None] = [r.data for r in records]
        by_file: dict[str, list[tuple[int, int]]] = {}
        for i, r in enumerate(records):
            if r.data is None:
                file_uri, _, row = r.uri.rpartition("#")
                by_file.setdefault(file_uri, []).append((i, int(row)))
        for file_uri, wanted in by_file.items():
            try:
                self._read_rows(file_uri, wanted, out)
            except Exception as e:  # noqa: BLE001 - an unreadable file fails its rows only
                for i, _ in wanted:
                    out[i] = out[i] if out[i] is not None else e
        return out

    def _read_rows(self, file_uri: str, wanted: list[tuple[int, int]], out: list) -> None:
        fs, path = url_to_fs(file_uri, self.storage_options)
        with fs.open(path, "rb") as f:
            parquet = pq.ParquetFile(f)
            starts = [0]
            for g in range(parquet.num_row_groups):
                starts.append(starts[-1] + parquet.metadata.row_group(g).num_rows)
            by_group: dict[int, list[tuple[int, int]]] = {}
            for i, row in wanted:
                if not 0 <= row < starts[-1]:
                    out[i] = IndexError(f"{file_uri} has {starts[-1]} rows, no row {row}")
                    continue
                g = bisect.bisect_right(starts, row) - 1
                by_group.setdefault(g, []).append((i, row - starts[g]))
            for g, rows in sorted(by_group.items()):
                column = parquet.read_row_group(g, columns=[self.image_column]).column(self.image_column)
                blobs, _ = _image_bytes(column.take([r for _, r in rows]))
                for (i, _), blob in zip(rows, blobs):
                    out[i] = blob or b""

    def _check_columns(self, path: str, table: pa.Table) -> None:
        for name, role in (
            (self.image_column, "image"),
            (self.id_column, "id"),
            *((name, "label") for name in self.label_columns or ()),
        ):
            if name is not None and name not in table.column_names:
                raise ValueError(f"{path}: no {role} column {name!r}; columns are {table.column_names}")

    def _records(
        self,
        file_uri: str,
        stem: str,
        blobs: list,
        image_paths: list,
        table: pa.Table,
        use_struct_path: bool,
        row0: int = 0,
    ) -> list[ImageRecord]:
        split = self.split_column if self.split_column in table.column_names else None
        roles = {self.image_column, self.id_column, split}
        label_names = (
            list(self.label_columns)
            if self.label_columns is not None
            else [name for name in table.column_names if name not in roles]
        )
        labels = {name: table.column(name).to_pylist() for name in label_names}
        ids = table.column(self.id_column).to_pylist() if self.id_column else None
        splits = table.column(split).to_pylist() if split else [None] * table.num_rows
        records = []
        for row, blob in enumerate(blobs):
            if blob is None:
                logger.warning("%s row %d has no image bytes", file_uri, row0 + row)
            data = blob or b""  # empty bytes: decoding records "empty file" for this row
            if ids is not None:
                image_id = str(ids[row])
            else:
                image_id = image_paths[row] if use_struct_path else f"{stem}/{row0 + row}"
            records.append(
                ImageRecord(
                    image_id=image_id,
                    uri=f"{file_uri}#{row0 + row}",
                    fingerprint=fingerprint_bytes(data),
                    labels={name: values[row] for name, values in labels.items()},
                    split=None if splits[row] is None else str(splits[row]),
                    data=data,
                )
            )
        return records


def _parquet_files(fs: AbstractFileSystem, target: str) -> tuple[str, list[str]]:
    """(root for ids, sorted file paths) for a glob, a folder, or a single file."""
    if has_glob(target):
        matches = fs.glob(target, detail=True)
        return glob_root(target), sorted(p for p, info in matches.items() if info.get("type") != "directory")
    target = target.rstrip("/")
    if fs.isdir(target):
        return target, sorted(p for p in fs.find(target) if p.lower().endswith(_PARQUET_SUFFIXES))
    return posixpath.dirname(target), [target]


def _image_bytes(column: pa.ChunkedArray) -> tuple[list[bytes | None], list[str | None]]:
    """(bytes, struct paths) of an image column: struct {bytes, path} or plain binary."""
    array = column.combine_chunks()
    kind = array.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        paths = array.field("path").to_pylist() if kind.get_field_index("path") >= 0 else [None] * len(array)
        blobs = array.field("bytes").to_pylist()
        # A null struct means no image at all, whatever its fields say.
        valid = array.is_valid().to_pylist()
        return [b if ok else None for b, ok in zip(blobs, valid)], paths
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        return array.to_pylist(), [None] * len(array)
    raise ValueError(f"image column has type {kind}; expected binary or struct<bytes: binary, path: string>")
