"""Image folders: ``root/<class>/.../<file>`` gives the label ``<class>``, as in torchvision's ImageFolder."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from pipeline.sources.base import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    Source,
    fingerprint_file,
    is_hidden,
    relative_id,
    sorted_unique,
    url_to_fs,
)

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
        records = []
        for path, info in sorted(fs.find(root, detail=True).items()):
            image_id = relative_id(path, root)
            if not self._wanted(image_id) or info.get("type") == "directory":
                continue
            parts = image_id.split("/")
            labels = {self.label_name: parts[0]} if len(parts) > 1 else {}
            records.append(
                ImageRecord(
                    image_id=image_id,
                    uri=fs.unstrip_protocol(path),
                    fingerprint=fingerprint_file(fs, path, info),
                    labels=labels,
                )
            )
        logger.info("listed %d images under %s", len(records), self.root_uri)
        return sorted_unique(records)

    def _wanted(self, image_id: str) -> bool:
        return not is_hidden(image_id) and image_id.lower().endswith(self.extensions)
