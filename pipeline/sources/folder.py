"""Image folders: ``root/<class>/.../<file>`` gives the label ``<class>``, as in torchvision's ImageFolder."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from pipeline.sources.base import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    Source,
    fingerprint_file,
    is_hidden,
    paged_records,
    relative_id,
    sorted_unique,
    url_to_fs,
)
from pipeline.sources.units import WorkUnit

__all__ = ["ImageFolderSource"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFolderSource(Source):
    """Every image file under ``root_uri`` (any fsspec URI), found recursively.

    Ids are paths relative to the root, extension kept. The first folder level is
    the label; files directly in the root get no label. Hidden files and folders
    (names starting with ``.``) are skipped, which drops macOS ``._x.jpg`` litter.
    """

    root_uri: str
    _: KW_ONLY
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    label_name: str = "label"
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        extensions = tuple("." + ext.lower().lstrip(".") for ext in self.extensions)
        object.__setattr__(self, "extensions", extensions)
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def list_images(self) -> list[ImageRecord]:
        fs, root = url_to_fs(self.root_uri, self.storage_options)
        root = root.rstrip("/")
        if not fs.isdir(root):
            raise FileNotFoundError(f"image folder {self.root_uri!r} does not exist or is not a folder")
        records = sorted_unique(self._folder_records(fs, root, root, fs.find(root, detail=True)))
        logger.info("listed %d images under %s", len(records), self.root_uri)
        return records

    def list_units(self) -> Iterator[WorkUnit]:
        """Pages of each folder's listing, one folder at a time: the driver never holds more than one folder's
        entries. A unit names its folder and the ids that bound it; a task lists that folder again."""
        fs, root = url_to_fs(self.root_uri, self.storage_options)
        root = root.rstrip("/")
        if not fs.isdir(root):
            raise FileNotFoundError(f"image folder {self.root_uri!r} does not exist or is not a folder")
        for folder, _dirs, files in fs.walk(root, detail=True):
            records = self._folder_records(fs, root, folder, files)
            rel = relative_id(folder, root) if folder.rstrip("/") != root else ""
            for page, recs in paged_records(records):
                yield WorkUnit(f"{rel}/page:{page.key}" if rel else f"page:{page.key}", page.content.hexdigest(),
                               page.count, page.meta.hexdigest(),
                               params={"folder": folder, "first": recs[0].image_id, "last": recs[-1].image_id})

    def label_schema(self, units):
        """One string label (the first folder level) when any image sits in a subfolder."""
        import pyarrow as pa

        nested = any("/" in (u.params.get("first") or "") for u in units)
        return pa.schema([(self.label_name, pa.string())] if nested else [])

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        fs, root = url_to_fs(self.root_uri, self.storage_options)
        root = root.rstrip("/")
        folder, first, last = unit.params["folder"], unit.params["first"], unit.params["last"]
        files = {info["name"]: info for info in fs.ls(folder, detail=True)}
        return [r for r in self._folder_records(fs, root, folder, files) if first <= r.image_id <= last]

    def _folder_records(self, fs, root: str, folder: str, files: Mapping[str, Mapping]) -> list[ImageRecord]:
        records = []
        for name, info in files.items():
            path = name if "/" in name else f"{folder.rstrip('/')}/{name}"
            image_id = relative_id(path, root)
            if info.get("type") == "directory" or not self._wanted(image_id):
                continue
            parts = image_id.split("/")
            labels = {self.label_name: parts[0]} if len(parts) > 1 else {}
            records.append(ImageRecord(image_id=image_id, uri=fs.unstrip_protocol(path),
                                       fingerprint=fingerprint_file(fs, path, info), labels=labels))
        return sorted(records, key=lambda r: r.image_id)

    def _wanted(self, image_id: str) -> bool:
        return not is_hidden(image_id) and image_id.lower().endswith(self.extensions)
