"""Glob listings over any fsspec URI, e.g. ``s3://bucket/imgs/**/*.jpg``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from pipeline.sources.base import (
    ImageRecord,
    Source,
    fingerprint_file,
    has_glob,
    is_hidden,
    relative_id,
    sorted_unique,
    url_to_fs,
)

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
