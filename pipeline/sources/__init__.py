"""Listings of images (folders, manifests, globs, Parquet bytes, Hugging Face datasets, WebDataset tars) with
stable ids and fingerprints."""

from __future__ import annotations

import inspect
from typing import Any

from pipeline.sources.base import ImageRecord, Source
from pipeline.sources.folder import ImageFolderSource
from pipeline.sources.globbing import GlobSource
from pipeline.sources.huggingface import HuggingFaceSource
from pipeline.sources.manifest import ManifestSource
from pipeline.sources.parquet_bytes import ParquetBytesSource
from pipeline.sources.webdataset import WebDatasetSource

__all__ = [
    "SOURCE_KINDS",
    "GlobSource",
    "HuggingFaceSource",
    "ImageFolderSource",
    "ImageRecord",
    "ManifestSource",
    "ParquetBytesSource",
    "Source",
    "WebDatasetSource",
    "make_source",
    "source_options",
]

SOURCE_KINDS: dict[str, type[Source]] = {
    "folder": ImageFolderSource,
    "manifest": ManifestSource,
    "glob": GlobSource,
    "parquet": ParquetBytesSource,
    "hf": HuggingFaceSource,
    "webdataset": WebDatasetSource,
}


def make_source(kind: str, uri: str, **options: Any) -> Source:
    """Build a source by kind name, as a config file would name it."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown source kind {kind!r}; valid: {sorted(SOURCE_KINDS)}")
    unknown = sorted(set(options) - set(source_options(kind)))
    if unknown:
        raise ValueError(f"source.options: unknown option {unknown[0]!r} for source kind {kind!r}; valid: "
                         f"{source_options(kind)}")
    return SOURCE_KINDS[kind](uri, **options)


def source_options(kind: str) -> list[str]:
    """The options a source kind takes: its constructor's keywords after the first (the URI)."""
    params = list(inspect.signature(SOURCE_KINDS[kind]).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
