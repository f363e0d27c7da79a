"""Image records, the Source interface, and the id and fingerprint rules all sources share."""

from __future__ import annotations

import collections
import hashlib
import logging
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from ..storage import fingerprint_from_info, redact_uri, resolve
from . import units as _units
from .units import Page, WorkUnit, paginate

__all__ = [
    "GLOB_CHARS",
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "Source",
    "fingerprint_bytes",
    "fingerprint_file",
    "fingerprint_from_info",
    "has_glob",
    "is_hidden",
    "relative_id",
    "sorted_unique",
    "url_to_fs",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
)
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class ImageRecord:
    """One image in a listing: what to read, what to call it, and how to tell if it changed.

    ``labels`` is left out of the hash (a dict is not hashable) but still compared.
    ``data`` carries the bytes for sources that hold them inline (Parquet);
    it is left out of repr and comparison so that records stay cheap to log and diff.
    """

    image_id: str
    uri: str
    fingerprint: str
    labels: Mapping[str, object] = field(default_factory=dict, hash=False)
    split: str | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A private copy, so the caller's dict cannot change a frozen record.
        object.__setattr__(self, "labels", dict(self.labels))


class Source(ABC):
    """A listing of images. Subclasses hold only URIs and options, so they pickle to Ray workers."""

    storage_options: Mapping[str, Any]
    # records read (then decoded) at a time: bounds the raw bytes a decode task holds; None: a whole shard
    read_chunk: int | None = 32

    @abstractmethod
    def list_images(self) -> list[ImageRecord]:
        """Every image, sorted by ``image_id``; the same storage state gives the same list."""

    def list_units(self) -> Iterator[WorkUnit]:
        """The source's work units, for the driver: metadata only, never one object per image kept.

        This fallback pages the full listing (held once, then dropped) and carries each page's records in
        its unit; sources that can list partitions from metadata override it together with :meth:`expand`.
        """
        records = self.list_images()
        for page, recs in paged_records(records):
            yield WorkUnit(f"page:{page.key}", page.content.hexdigest(), page.count, page.meta.hexdigest(),
                           params={"records": [record_to_json(r) for r in recs]})

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        """The images of one unit, in a task (a unit of the fallback carries them)."""
        return [record_from_json(r) for r in unit.params["records"]]

    def label_schema(self, units: Sequence[WorkUnit]):
        """Arrow types of the label columns (a new feature set fixes them). This default infers them from a few
        units' images (first, middle, last); sources that know their columns say so."""
        from ..stores import label_schema

        picks = sorted({0, len(units) // 2, len(units) - 1}) if units else []
        return label_schema([record_to_json(r) for k in picks for r in self.expand(units[k])])

    def read_bytes(self, record: ImageRecord) -> bytes:
        """The raw file bytes: inline data when the record carries it, else read through fsspec."""
        if record.data is not None:
            return record.data
        fs, path = url_to_fs(record.uri, self.storage_options)
        return fs.cat_file(path)

    def read_many(self, records: Sequence[ImageRecord], *, threads: int = 8) -> list[bytes | Exception]:
        """Each record's bytes, or the exception reading it raised (one bad file is data, not a crash).

        Reads run concurrently: reading from an object store is latency-bound. Sources whose records
        share files override this to read each file once.
        """
        def one(record: ImageRecord) -> bytes | Exception:
            try:
                return self.read_bytes(record)
            except Exception as e:  # noqa: BLE001
                return e

        if len(records) <= 1:
            return [one(r) for r in records]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(one, records))


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem of ``uri`` as the store's is opened: explicit options (S3 endpoint, credentials, ...),
    the S3 endpoint from the environment (STRATA_S3_ENDPOINT_URL, ...) and the one retry policy."""
    return resolve(uri, storage_options)


def has_glob(path: str) -> bool:
    return any(char in path for char in GLOB_CHARS)


def is_hidden(image_id: str) -> bool:
    """True when any part of the path starts with ``.`` (``.git/``, macOS ``._x.jpg``)."""
    return any(part.startswith(".") for part in image_id.split("/"))


def relative_id(path: str, root: str) -> str:
    """Posix path of ``path`` under ``root``, extension kept (``a.jpg`` and ``a.png`` may coexist)."""
    root = root.rstrip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1 :]
    return posixpath.normpath(path).lstrip("/")


def fingerprint_bytes(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def fingerprint_file(fs: AbstractFileSystem, path: str, info: Mapping[str, Any] | None = None) -> str:
    """Fingerprint from listing metadata when the filesystem has it, else from the content."""
    if info is None:
        info = fs.info(path)
    return fingerprint_from_info(info) or fingerprint_bytes(fs.cat_file(path))


MISSING = "missing"  # fingerprint of a listed file that is not there; reading it then records the error
_INFO_THREADS = 16  # metadata requests are latency-bound on object stores


def file_fingerprints(uris: Sequence[str], options_for: Callable[[str], Mapping[str, Any] | None]) -> list[str]:
    """Fingerprints of files from their listing metadata (ETag, size+mtime), fetched concurrently; a file that
    is not there gets MISSING. ``options_for(uri)``: the storage options that reach it."""
    def one(uri: str) -> str:
        try:
            fs, path = url_to_fs(uri, options_for(uri))
            return fingerprint_file(fs, path)
        except FileNotFoundError:
            return MISSING

    if len(uris) <= 1:
        return [one(u) for u in uris]
    with ThreadPoolExecutor(max_workers=_INFO_THREADS) as pool:
        return list(pool.map(one, uris))


def sorted_unique(records: Iterable[ImageRecord], *, hint: str = "") -> list[ImageRecord]:
    """Records sorted by id; duplicate ids are refused because stores are keyed by id."""
    records = sorted(records, key=lambda record: record.image_id)
    counts = collections.Counter(record.image_id for record in records)
    duplicates = [(image_id, n) for image_id, n in counts.items() if n > 1]
    if duplicates:
        shown = ", ".join(f"{image_id!r} x{n}" for image_id, n in duplicates[:10])
        more = f" and {len(duplicates) - 10} more" if len(duplicates) > 10 else ""
        raise ValueError(f"{len(duplicates)} duplicate image ids: {shown}{more}{hint}")
    if not records:
        logger.warning("source listed no images")
    return records


class SharedFileSource(Source):
    """A source whose images live inside shared files (tars, Parquet row groups): :meth:`read_many` reads
    them together, one pass per file, and a single image is read the same way."""

    #: appended to the refusal of duplicate ids in :meth:`list_images`
    duplicate_hint = ""

    def list_images(self) -> list[ImageRecord]:
        """Every unit expanded: a convenience for small sources and tests (a job expands units in tasks)."""
        return sorted_unique((r for unit in self.list_units() for r in self.expand(unit)), hint=self.duplicate_hint)

    def read_bytes(self, record: ImageRecord) -> bytes:
        result = self.read_many([record])[0]
        if isinstance(result, Exception):
            raise result
        return result


def record_to_json(r: ImageRecord) -> dict:
    return {"image_id": r.image_id, "uri": r.uri, "fingerprint": r.fingerprint, "labels": dict(r.labels),
            "split": r.split}


def record_from_json(d: Mapping[str, Any]) -> ImageRecord:
    return ImageRecord(d["image_id"], d["uri"], d["fingerprint"], d.get("labels") or {}, d.get("split"))


def page_rows(records: Iterable[ImageRecord]) -> Iterator[tuple[str, Any, Any]]:
    """(id, content, metadata) of records, what a page's two fingerprints are made of."""
    for r in records:
        yield r.image_id, r.fingerprint, [redact_uri(r.uri), r.split, sorted(r.labels.items())]


def paged_records(records: Sequence[ImageRecord],
                  page_images: int | None = None) -> Iterator[tuple[Page, Sequence[ImageRecord]]]:
    """Content-defined pages of an in-memory listing, with each page's records."""
    start = 0
    for page in paginate(page_rows(records), page_images or _units.PAGE_IMAGES):
        yield page, records[start:start + page.count]
        start += page.count
