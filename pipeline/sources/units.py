"""Work units: partitions of a source that the driver lists without reading images.

A unit is a tar file, a Parquet row group, a page of manifest rows or of a folder listing. The driver holds
units, never one record per image; Ray tasks expand units into images. Pages of row-wise listings are cut
where an image id's hash says so (content-defined boundaries, as rsync and restic chunk files), so adding or
removing images changes only the pages they fall in, not every page after them.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Target images per page of a row-wise listing (pages end where hash(id) says, at most 4x this long): about a
#: block's worth, so that a job has many units for the cluster to spread.
PAGE_IMAGES = 1024
#: A unit param: the unit's ids are first seen by its task, which sends their hashes for the driver to check
#: against other units' (pipeline.extract.id_check).
CHECK_IDS = "check_ids"


@dataclass(frozen=True)
class WorkUnit:
    """A partition of a source. ``fingerprint`` changes whenever any image of the unit changes (empty when the
    driver cannot know: such units are re-checked image by image on every refresh); ``meta`` changes when only
    labels, splits or URIs do."""

    unit_id: str
    fingerprint: str
    n_images: int | None = None  # known up front (row groups, pages) or not (tars)
    meta: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)  # what expand() needs; JSON-serialisable
    size_bytes: int | None = None  # for units of unknown count: bounds how many images they can hold

    def to_json(self) -> dict:
        return {"unit_id": self.unit_id, "fingerprint": self.fingerprint, "n_images": self.n_images,
                "meta": self.meta, "params": dict(self.params), "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, d: Mapping) -> WorkUnit:
        return cls(d["unit_id"], d["fingerprint"], d.get("n_images"), d.get("meta", ""), dict(d.get("params") or {}),
                   d.get("size_bytes"))


class Digest:
    """A running sha256 over JSON-encoded items: a unit's fingerprint without keeping its rows."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, item: Any) -> None:
        self._h.update(json.dumps(item, sort_keys=True, default=str).encode())
        self._h.update(b"\n")

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:32]


def id_hash(image_id: str) -> int:
    """An id's 64-bit hash: page boundaries, and the 8 bytes a listing keeps per id to refuse repeats."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little")


def id_hashes(ids: Iterable[object]) -> np.ndarray:
    """:func:`id_hash` of each id (as text), as uint64: what a listing keeps to find repeats."""
    return np.array([id_hash(str(i)) for i in ids], dtype=np.uint64)


def sorted_id_hashes(groups: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every group's id hashes in one sorted array (stable), and the group each came from: a repeat is two
    neighbours."""
    owner = np.concatenate([np.full(len(g), i) for i, g in enumerate(groups)] or [np.zeros(0, int)])
    hashes = np.concatenate(list(groups) or [np.zeros(0, np.uint64)])
    order = np.argsort(hashes, kind="stable")
    return hashes[order], owner[order]


def is_boundary(image_id: str, page_images: int = PAGE_IMAGES) -> bool:
    """True when a page ends after ``image_id`` (about one id in ``page_images``)."""
    return id_hash(image_id) % page_images == 0


@dataclass
class Page:
    """A page being built: its first and last ids, its size, its content and metadata digests.

    ``key`` names the page by the id that ends it (``~end`` for the tail page): images inserted or removed
    elsewhere never rename it, so a unit keeps its id from run to run."""

    first: str
    count: int = 0
    content: Digest = field(default_factory=Digest)
    meta: Digest = field(default_factory=Digest)
    last: str = ""
    key: str = "~end"


def paginate(rows: Iterable[tuple[str, Any, Any]], page_images: int = PAGE_IMAGES) -> Iterator[Page]:
    """Content-defined pages over ``(image_id, content, meta)`` rows in listing order."""
    page: Page | None = None
    for image_id, content, meta in rows:
        if page is None:
            page = Page(first=image_id)
        page.count += 1
        page.last = image_id
        page.content.add([image_id, content])
        page.meta.add([image_id, meta])
        if is_boundary(image_id, page_images) or page.count >= 4 * page_images:
            page.key = image_id
            yield page
            page = None
    if page is not None:
        yield page
