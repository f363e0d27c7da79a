"""Glob listings over any fsspec URI, e.g. ``s3://bucket/imgs/**/*.jpg``."""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from fsspec.utils import glob_translate

from pipeline.sources.base import (
    ImageRecord,
    Source,
    fingerprint_file,
    has_glob,
    is_hidden,
    paged_records,
    relative_id,
    sorted_unique,
    url_to_fs,
)
from pipeline.sources.units import WorkUnit

__all__ = ["GlobSource", "glob_root"]

logger = logging.getLogger(__name__)


def glob_root(pattern: str) -> str:
    """The folder part of ``pattern`` before its first glob character (``a/b/**/*.jpg`` -> ``a/b``)."""
    parts = pattern.split("/")
    for index, part in enumerate(parts):
        if has_glob(part):
            return "/".join(parts[:index])
    return "/".join(parts[:-1])


@dataclass(frozen=True)
class GlobSource(Source):
    """Files matching ``pattern_uri``; ids are paths relative to the pattern's non-glob prefix.

    Hidden files and folders under the prefix are skipped, as a shell's ``**`` would.
    No labels: a glob says nothing about classes (use a manifest or a folder for those).
    """

    pattern_uri: str
    _: KW_ONLY
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))

    def list_images(self) -> list[ImageRecord]:
        fs, pattern = url_to_fs(self.pattern_uri, self.storage_options)
        root = glob_root(pattern)
        records = [
            ImageRecord(
                image_id=relative_id(path, root),
                uri=fs.unstrip_protocol(path),
                fingerprint=fingerprint_file(fs, path, info),
            )
            for path, info in sorted(fs.glob(pattern, detail=True).items())
            if info.get("type") != "directory" and not is_hidden(relative_id(path, root))
        ]
        logger.info("listed %d images matching %s", len(records), self.pattern_uri)
        return sorted_unique(records)

    def list_units(self) -> Iterator[WorkUnit]:
        """Pages of the matches, folder by folder; a task lists its folder again and matches the pattern."""
        by_folder: dict[str, list[ImageRecord]] = {}
        for r in self.list_images():
            by_folder.setdefault(posixpath.dirname(r.image_id), []).append(r)
        for folder, records in sorted(by_folder.items()):
            for page, recs in paged_records(records):
                yield WorkUnit(f"{folder}/page:{page.key}" if folder else f"page:{page.key}",
                               page.content.hexdigest(), page.count, page.meta.hexdigest(),
                               params={"folder": folder, "first": recs[0].image_id, "last": recs[-1].image_id})

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        fs, pattern = url_to_fs(self.pattern_uri, self.storage_options)
        root = glob_root(pattern)
        folder = f"{root}/{unit.params['folder']}".rstrip("/") if unit.params["folder"] else root
        matches = re.compile(glob_translate(pattern))
        first, last = unit.params["first"], unit.params["last"]
        out = []
        for info in fs.ls(folder, detail=True):
            path = info["name"]
            image_id = relative_id(path, root)
            if (info.get("type") != "directory" and matches.match(path) and not is_hidden(image_id)
                    and first <= image_id <= last):
                out.append(ImageRecord(image_id=image_id, uri=fs.unstrip_protocol(path),
                                       fingerprint=fingerprint_file(fs, path, info)))
        return sorted(out, key=lambda r: r.image_id)
