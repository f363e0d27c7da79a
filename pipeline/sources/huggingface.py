"""Hugging Face datasets on any fsspec URI: ``save_to_disk`` directories (Arrow) and Parquet exports."""

from __future__ import annotations

import json
import logging
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import KW_ONLY, dataclass
from typing import Any

import pyarrow as pa
from fsspec import AbstractFileSystem

from pipeline.sources.arrow_files import ARROW_SUFFIX, arrow_schema, read_arrow
from pipeline.sources.base import ImageRecord, has_glob, relative_id, url_to_fs
from pipeline.sources import parquet_ids
from pipeline.sources.image_columns import detect_image_column, image_paths, paths_complete
from pipeline.sources.parquet_bytes import ParquetBytesSource
from pipeline.sources.units import CHECK_IDS, WorkUnit

__all__ = ["HuggingFaceSource"]

logger = logging.getLogger(__name__)

# `datasets` names shards <split>-<index>-of-<count> (push_to_hub, the Hub's exports).
_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}$")


@dataclass(frozen=True)
class HuggingFaceSource(ParquetBytesSource):
    """A dataset written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (a folder with
    ``state.json`` or ``dataset_dict.json`` and Arrow files), or a Parquet export (a folder, glob or file).

    Rows are read as the ``parquet`` kind reads them (image structs, bytes or paths; see
    :class:`ParquetBytesSource`), with two differences: the image column defaults to the one the ``datasets``
    features type as ``Image``, and the split comes from the ``DatasetDict`` folder or from a shard name
    ``<split>-00000-of-00003`` when the rows have no split column. Ids of a ``DatasetDict`` start with
    ``<split>/``. Units are Parquet row groups, and for ``save_to_disk`` whole Arrow files (``datasets``
    caps them at ``max_shard_size``, 500 MB by default): the driver reads ``state.json`` and one listing
    per split, never an Arrow file (its record batches are only found by reading it through). Arrow units
    have no fingerprint, so a refresh re-reads them and compares image by image (encoding only images
    whose bytes or files changed).
    """

    _: KW_ONLY
    image_column: str | None = None

    def list_units(self) -> Iterator[WorkUnit]:
        fs, root = url_to_fs(self.uri_or_glob, self.storage_options)
        root = root.rstrip("/")
        if has_glob(root) or not fs.isdir(root):
            yield from super().list_units()
            return
        fs.invalidate_cache()  # a refresh in the same process must see files rewritten since the last listing
        names = {posixpath.basename(i["name"].rstrip("/")) for i in fs.ls(root, detail=True)}
        if "dataset_dict.json" in names:
            splits = json.loads(fs.cat_file(f"{root}/dataset_dict.json")).get("splits", [])
            units = [u for split in splits for u in self._arrow_units(fs, root, f"{root}/{split}", split)]
        elif "state.json" in names:
            units = list(self._arrow_units(fs, root, root, None))
        else:
            yield from super().list_units()
            return
        yield from sorted(units, key=lambda u: u.unit_id)

    def _arrow_units(self, fs: AbstractFileSystem, root: str, folder: str, split: str | None) -> Iterator[WorkUnit]:
        state = json.loads(fs.cat_file(f"{folder}/state.json"))
        listing = {posixpath.basename(i["name"]): i for i in fs.ls(folder, detail=True)}
        for entry in state.get("_data_files", []):
            name = entry["filename"]
            info = listing.get(name)
            if info is None:
                raise FileNotFoundError(f"{fs.unstrip_protocol(folder)}/state.json names {name!r}, which is not "
                                        f"there; the dataset was not saved completely")
            path = f"{folder}/{name}"
            # No fingerprint: rows may hold only paths to files the Arrow file's own does not cover (datasets
            # before 4.8.5 kept local Image files as paths), and telling needs the file read through.
            yield WorkUnit(relative_id(path, root), "", None,
                           size_bytes=info.get("size"),
                           params={"path": path, "format": "arrow", "stem": name.removesuffix(ARROW_SUFFIX),
                                   "split": split, "id_prefix": f"{split}/" if split else "",
                                   "root": fs.unstrip_protocol(root), CHECK_IDS: True})

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        """A row group (Parquet) or an Arrow file, read whole; image bytes inline, path-only images by URI."""
        if unit.params.get("format") != "arrow":
            return super().expand(unit)
        fs, _ = url_to_fs(self.uri_or_glob, self.storage_options)
        with fs.open(unit.params["path"], "rb") as f:
            table = read_arrow(f)
        column = detect_image_column(table.schema, self.image_column)
        cells = table.column(column).combine_chunks() if column in table.column_names else None
        struct_path = (self.id_column is None and not self.row_ids and cells is not None and paths_complete(cells)
                       and parquet_ids.path_ids_unique(unit.params["path"], image_paths(cells)))
        params: Mapping[str, Any] = {**unit.params, "struct_path": struct_path}
        return self._table_records(table, fs.unstrip_protocol(unit.params["path"]), params)

    def _unit_schema(self, fs: AbstractFileSystem, params: Mapping[str, Any]) -> pa.Schema:
        if params.get("format") != "arrow":
            return super()._unit_schema(fs, params)
        with fs.open(params["path"], "rb", block_size=1 << 16) as f:  # the schema message only, not a 5 MB block
            return arrow_schema(f)

    def _file_split(self, stem: str) -> str | None:
        m = _SPLIT_FILE.match(posixpath.basename(stem))
        return m["split"] if m else None
