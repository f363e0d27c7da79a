"""Parquet files whose image column holds the images (the Hugging Face datasets export layout)."""

from __future__ import annotations

import bisect
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipeline.sources import parquet_ids
from pipeline.sources.arrow_files import ARROW_SUFFIX, take_arrow_rows
from pipeline.sources.base import (
    SharedFileSource,
    ImageRecord,
    fingerprint_bytes,
    fingerprint_from_info,
    has_glob,
    relative_id,
    url_to_fs,
)
from pipeline.sources.globbing import glob_root
from pipeline.sources.hf_features import class_label_names
from pipeline.sources.image_columns import (
    detect_image_column,
    image_cells,
    path_fingerprints,
    paths_complete,
    resolve_path,
    storage_options_for,
)
from pipeline.sources.units import WorkUnit, id_hash
from pipeline.stores.label_types import with_class_names

__all__ = ["ParquetBytesSource", "row_of"]

logger = logging.getLogger(__name__)

_PARQUET_SUFFIXES = (".parquet", ".pq")
#: Unit meta of a file with a ``ClassLabel`` column, whose -1 is read as a missing label.
CLASS_LABEL_META = "classlabel:-1=missing"
#: in the unit meta of a file whose image paths repeat (in it or in another file), so rows get <file>/<row> ids
ROW_IDS_META = ";ids=row"


def row_of(uri: str) -> tuple[str, int | None]:
    """(file uri, row) of a ``<parquet or arrow file>#<row>`` uri; (uri, None) for an image file's own uri."""
    head, sep, tail = uri.rpartition("#")
    if sep and tail.isdigit() and head.lower().endswith((*_PARQUET_SUFFIXES, ARROW_SUFFIX)):
        return head, int(tail)
    return uri, None


@dataclass(frozen=True)
class ParquetBytesSource(SharedFileSource):
    """Rows of Parquet files (one file, a folder of them, or a glob) with an image column.

    The image column is a struct ``{bytes: binary, path: string}`` (what ``datasets`` writes), plain binary,
    or plain path strings (``image_column: null`` picks the column ``datasets`` typed ``Image``, else
    ``image``). Rows with bytes carry them in ``data`` (uri ``<file uri>#<row>``, fingerprint the sha256 of
    the bytes); rows with only a path are read from that path, resolved under the dataset root when relative
    (uri the image file's, fingerprint from its metadata, fetched in the task). Ids come from ``id_column``,
    else the image path when every row of the file has one and none repeats, else ``<file path relative to
    the root, no suffix>/<row>`` (parquet_ids). Work units are row groups.
    """

    uri_or_glob: str
    duplicate_hint = "; name a unique column in source.options.id_column"
    _: KW_ONLY
    image_column: str | None = "image"
    id_column: str | None = None
    row_ids: bool = False  # `<file>/<row>` ids even where image paths are unique (paths that repeat across files)
    label_columns: Sequence[str] | None = None
    split_column: str | None = "split"
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    read_chunk = None  # rows of a shard share row groups: read them in one pass

    def __post_init__(self) -> None:
        if self.row_ids and self.id_column is not None:
            raise ValueError(f"source.options: id_column ({self.id_column!r}) and row_ids=true both choose the ids; "
                             f"set one of them")
        if self.label_columns is not None:
            object.__setattr__(self, "label_columns", tuple(self.label_columns))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def list_units(self) -> Iterator[WorkUnit]:
        """One unit per row group, from each file's footer and listing metadata: the driver never reads image
        bytes, only the id column or the image paths, to choose ids that are unique (parquet_ids)."""
        fs, target = url_to_fs(self.uri_or_glob, self.storage_options)
        root, paths = _parquet_files(fs, target)
        files, listed = [], []
        classes: dict[str, tuple[str, list[str]]] = {}  # ClassLabel column -> (first file, its names)
        for path in paths:
            info = fs.info(path)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                files.append(parquet_ids.file_ids(path, self.id_column, self._id_values(pf, path)))
                groups = [(pf.metadata.row_group(g).num_rows, self._bytes_only(pf, g))
                          for g in range(pf.num_row_groups)]
                # units of a file with a ClassLabel record how its -1 is read: stores that kept -1 relabel it
                names = class_label_names(pf.schema_arrow)
                tag = CLASS_LABEL_META if names else ""
            self._check_class_names(path, names, classes)
            listed.append((path, info, groups, tag))
        kinds = parquet_ids.settle(files, lambda path, wanted: self._ids_named(fs, path, wanted))
        for ids, (path, info, groups, tag) in zip(files, listed):
            if ids.kind == parquet_ids.PATH and kinds[path] == parquet_ids.ROW:
                tag += ROW_IDS_META  # a stored file whose paths a new file now repeats takes row ids at once
            file_print = fingerprint_from_info(info) or f"size:{info.get('size')}"
            stem = relative_id(path, root)
            for suffix in _PARQUET_SUFFIXES:
                stem = stem.removesuffix(suffix)
            row0 = 0
            for g, (n, bytes_only) in enumerate(groups):
                yield WorkUnit(f"{stem}#rg={g}", f"{file_print}#rg={g}" if bytes_only else "", n, meta=tag,
                               size_bytes=info.get("size"),
                               params={"path": path, "rg": g, "row0": row0, "stem": stem,
                                       "struct_path": kinds[path] == parquet_ids.PATH,
                                       "root": fs.unstrip_protocol(root), "split": self._file_split(stem)})
                row0 += n

    def _check_class_names(self, path: str, names: Mapping[str, list[str]],
                           seen: dict[str, tuple[str, list[str]]]) -> None:
        """Every file's ClassLabel must name its integers alike: a store keeps one set of names per column."""
        for column, given in names.items():
            if self.label_columns is not None and column not in self.label_columns:
                continue
            first, before = seen.setdefault(column, (path, given))
            if given != before:
                raise ValueError(
                    f"{path}: ClassLabel column {column!r} names its classes {given[:8]}, but {first} names them "
                    f"{before[:8]}; the same integer would mean another class in each file: export the files "
                    f"with one ClassLabel (datasets' cast_column), or leave the column out with "
                    f"source.options.label_columns")

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        """A row group's images, bytes included (fingerprints are their sha256)."""
        fs, _ = url_to_fs(self.uri_or_glob, self.storage_options)
        p = unit.params
        with fs.open(p["path"], "rb") as f:
            table = pq.ParquetFile(f).read_row_group(p["rg"])
        return self._table_records(table, fs.unstrip_protocol(p["path"]), p, row0=p["row0"])

    def label_schema(self, units: Sequence[WorkUnit]) -> pa.Schema:
        """The label columns and their types from the first file's schema (a Parquet footer): no rows read.
        ``ClassLabel`` columns carry their class names (field metadata)."""
        if not units:
            return pa.schema([])
        fs, _ = url_to_fs(self.uri_or_glob, self.storage_options)
        schema = self._unit_schema(fs, units[0].params)
        column = detect_image_column(schema, self.image_column)
        names = self._label_names(schema.names, column)
        missing = [n for n in names if n not in schema.names]
        if missing:
            raise ValueError(f"{units[0].params['path']}: no label column {missing[0]!r}; columns are {schema.names}")
        classes = class_label_names(schema)
        return pa.schema([with_class_names(pa.field(n, pa.string() if pa.types.is_null(t) else t), classes.get(n))
                          for n, t in sorted((n, schema.field(n).type) for n in names)])

    def _unit_schema(self, fs: AbstractFileSystem, params: Mapping[str, Any]) -> pa.Schema:
        with fs.open(params["path"], "rb") as f:
            return pq.ParquetFile(f).schema_arrow

    def _label_names(self, columns: Sequence[str], image_column: str) -> list[str]:
        if self.label_columns is not None:
            return list(self.label_columns)
        split = self.split_column if self.split_column in columns else None
        return [name for name in columns if name not in {image_column, self.id_column, split}]

    def _file_split(self, stem: str) -> str | None:
        """The split a file's name gives its rows (none here; the Hugging Face source reads it from names)."""
        return None

    def _bytes_only(self, pf: pq.ParquetFile, group: int) -> bool:
        """Whether every row of the row group holds its image bytes, from the footer's null counts: a row
        with a path only depends on a file the Parquet file's fingerprint does not cover, so its unit gets
        no fingerprint (and is re-checked image by image on each refresh)."""
        schema = pf.schema_arrow
        column = detect_image_column(schema, self.image_column)
        if column not in schema.names:
            return True  # expand() will say what is wrong
        kind = schema.field(column).type
        if not pa.types.is_struct(kind):
            return not (pa.types.is_string(kind) or pa.types.is_large_string(kind))
        if kind.get_field_index("path") < 0:
            return True
        meta = pf.metadata.row_group(group)
        for j in range(meta.num_columns):
            chunk = meta.column(j)
            if chunk.path_in_schema == f"{column}.bytes":
                stats = chunk.statistics
                return stats is not None and stats.has_null_count and stats.null_count == 0
        return False

    def _id_values(self, pf: pq.ParquetFile, path: str) -> pa.Array | None:
        """The id column, else the image paths when every row has one (None otherwise): one column, never
        image bytes."""
        if self.id_column is not None:
            if self.id_column not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no id column {self.id_column!r}; columns are {pf.schema_arrow.names}")
            return pf.read(columns=[self.id_column]).column(0).combine_chunks()
        if self.row_ids:
            return None
        schema = pf.schema_arrow
        column = detect_image_column(schema, self.image_column)
        if column not in schema.names:
            return None
        kind = schema.field(column).type
        if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
            struct = pf.read(columns=[f"{column}.path"]).column(0).combine_chunks()  # struct<path>, nulls kept
            return struct.field("path") if paths_complete(struct) else None
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            paths = pf.read(columns=[column]).column(0).combine_chunks()
            return paths if paths_complete(paths) else None
        return None

    def _ids_named(self, fs: AbstractFileSystem, path: str, wanted: set[int]) -> list[str]:
        """The ids (or paths) of a file whose hashes are in ``wanted``: read again only to name a clash."""
        with fs.open(path, "rb") as f:
            values = self._id_values(pq.ParquetFile(f), path)
        return sorted({str(v) for v in values.to_pylist() if id_hash(str(v)) in wanted})

    def read_many(self, records: Sequence[ImageRecord], *, threads: int = 8) -> list[bytes | Exception]:
        """Rows grouped by file and row group (or batch): each needed part of the image column is read once.

        Records travel to decode workers without their inline bytes, so a shard of rows from one big file
        costs one pass over the row groups it touches, not one read of the file per row. Path-only images
        are read from their own files, concurrently.
        """
        out: list[bytes | Exception | None] = [r.data for r in records]
        by_file: dict[str, list[tuple[int, int]]] = {}
        own_files: list[int] = []
        for i, r in enumerate(records):
            if r.data is None:
                file_uri, row = row_of(r.uri)
                if row is None:
                    own_files.append(i)
                else:
                    by_file.setdefault(file_uri, []).append((i, row))
        for file_uri, wanted in by_file.items():
            try:
                self._read_rows(file_uri, wanted, out)
            except Exception as e:  # noqa: BLE001 - an unreadable file fails its rows only
                for i, _ in wanted:
                    out[i] = out[i] if out[i] is not None else e
        if own_files:
            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(own_files)))) as pool:
                for i, result in zip(own_files, pool.map(self._read_file, [records[i].uri for i in own_files])):
                    out[i] = result
        return out

    def _read_file(self, uri: str) -> bytes | Exception:
        try:
            fs, path = url_to_fs(uri, storage_options_for(uri, self.uri_or_glob, self.storage_options))
            return fs.cat_file(path)
        except Exception as e:  # noqa: BLE001
            return e

    def _read_rows(self, file_uri: str, wanted: list[tuple[int, int]], out: list) -> None:
        fs, path = url_to_fs(file_uri, self.storage_options)
        with fs.open(path, "rb") as f:
            if path.lower().endswith(ARROW_SUFFIX):
                self._read_arrow_rows(f, file_uri, wanted, out)
                return
            parquet = pq.ParquetFile(f)
            column = detect_image_column(parquet.schema_arrow, self.image_column)
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
                table = parquet.read_row_group(g, columns=[column])
                self._fill(file_uri, table.column(column).take([r for _, r in rows]), [i for i, _ in rows], out)

    def _read_arrow_rows(self, f, file_uri: str, wanted: list[tuple[int, int]], out: list) -> None:
        table, seen = take_arrow_rows(f, [r for _, r in wanted])
        for i, row in wanted:
            if row >= seen:
                out[i] = IndexError(f"{file_uri} has {seen} rows, no row {row}")
        column = detect_image_column(table.schema, self.image_column)
        self._fill(file_uri, table.column(column), [i for i, r in wanted if r < seen], out)

    def _fill(self, file_uri: str, column: pa.ChunkedArray, targets: list[int], out: list) -> None:
        blobs, paths = image_cells(column)
        for i, blob, path in zip(targets, blobs, paths):
            if blob is None and path is not None:  # listed with bytes, now a path: the file was rewritten
                out[i] = OSError(f"{file_uri}: the row holds only the path {path!r} now; the file changed since "
                                 f"it was listed")
            else:
                out[i] = blob or b""

    def _table_records(self, table: pa.Table, file_uri: str, params: Mapping[str, Any], *,
                       row0: int = 0) -> list[ImageRecord]:
        """The records of a table read from one file (a row group, or an Arrow file), sorted by id."""
        column = detect_image_column(table.schema, self.image_column)
        self._check_columns(params["path"], table, column)
        blobs, image_paths = image_cells(table.column(column))
        split = self.split_column if self.split_column in table.column_names else None
        labels = {name: table.column(name).to_pylist() for name in self._label_names(table.column_names, column)}
        for name in set(class_label_names(table.schema)) & set(labels):  # datasets' ClassLabel: -1 is no label
            labels[name] = [None if v == -1 else v for v in labels[name]]
        ids = table.column(self.id_column).to_pylist() if self.id_column else None
        splits = table.column(split).to_pylist() if split else [params.get("split")] * table.num_rows
        root = params["root"]
        by_path = [i for i, (b, p) in enumerate(zip(blobs, image_paths)) if b is None and p is not None]
        uris = {i: resolve_path(image_paths[i], root) for i in by_path}
        prints = dict(zip(by_path, path_fingerprints([uris[i] for i in by_path], self.storage_options, root)))
        prefix = params.get("id_prefix", "")
        records = []
        for row, blob in enumerate(blobs):
            if row in uris:
                uri, fingerprint, data = uris[row], prints[row], None
            else:
                if blob is None:
                    logger.warning("%s row %d has no image", file_uri, row0 + row)
                data = blob or b""  # empty bytes: decoding records "empty file" for this row
                uri, fingerprint = f"{file_uri}#{row0 + row}", fingerprint_bytes(data)
            if ids is not None:
                image_id = str(ids[row])
            else:
                image_id = image_paths[row] if params["struct_path"] else f"{params['stem']}/{row0 + row}"
            records.append(ImageRecord(
                image_id=prefix + image_id, uri=uri, fingerprint=fingerprint,
                labels={name: values[row] for name, values in labels.items()},
                split=None if splits[row] is None else str(splits[row]), data=data))
        parquet_ids.refuse_repeats(file_uri, [r.image_id for r in records])
        return sorted(records, key=lambda r: r.image_id)

    def _check_columns(self, path: str, table: pa.Table, column: str) -> None:
        for name, role in (
            (column, "image"),
            (self.id_column, "id"),
            *((name, "label") for name in self.label_columns or ()),
        ):
            if name is not None and name not in table.column_names:
                raise ValueError(f"{path}: no {role} column {name!r}; columns are {table.column_names}")


def _parquet_files(fs: AbstractFileSystem, target: str) -> tuple[str, list[str]]:
    """(root for ids, sorted file paths) for a glob, a folder, or a single file."""
    if has_glob(target):
        matches = fs.glob(target, detail=True)
        return glob_root(target), sorted(p for p, info in matches.items() if info.get("type") != "directory")
    target = target.rstrip("/")
    if fs.isdir(target):
        return target, sorted(p for p in fs.find(target) if p.lower().endswith(_PARQUET_SUFFIXES))
    return posixpath.dirname(target), [target]
