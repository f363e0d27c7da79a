"""WebDataset tar shards (the layout img2dataset, LAION and DataComp publish): one work unit per tar."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from pipeline.sources.base import (
    IMAGE_EXTENSIONS,
    ImageRecord,
    Source,
    fingerprint_bytes,
    fingerprint_from_info,
    has_glob,
    relative_id,
    sorted_unique,
    url_to_fs,
)
from pipeline.sources.braces import expand_braces
from pipeline.sources.tars import TarBreak, TarSample, read_members, read_samples, split_member
from pipeline.sources.units import WorkUnit

__all__ = ["TAR_ERROR", "TarMemberError", "WebDatasetSource"]

logger = logging.getLogger(__name__)

#: Fingerprint prefix of a record that stands for a broken sample; reading it raises with the rest as reason.
TAR_ERROR = "tar-error:"
#: Key of the error record of a tar in which no member can be read (empty, not a tar).
BROKEN_TAR_KEY = "__broken_tar__"
_PATTERN_CHARS = "{*?["


class TarMemberError(OSError):
    """A sample of a tar that cannot be read: no image member, or a tar cut or corrupt at that point."""


@dataclass(frozen=True)
class WebDatasetSource(Source):
    """Samples of WebDataset tars: a brace pattern (``s3://b/shard-{00000..00999}.tar``; several groups,
    comma lists and globs allowed), a glob, a single tar, or a folder searched for ``.tar`` files.

    A sample is the members sharing a key (``<key>.jpg``, ``<key>.json``, ...). ``image_id`` is
    ``<tar path relative to the pattern's root, no .tar>/<key>``; the image is the key's first member in
    ``image_extensions`` order, and its fingerprint the sha256 of its bytes (a re-written tar re-encodes
    only the images whose bytes changed). Labels: ``.cls`` as an int column named ``cls_field``, the
    ``json_fields`` of ``.json``, ``.txt`` as ``text_field``; every record has all of them (None where a
    sample lacks one). Work units are tars, fingerprinted by ETag or size+mtime: the driver never opens one.
    """

    uri: str
    _: KW_ONLY
    image_extensions: tuple[str, ...] = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    cls_field: str | None = "cls"
    json_fields: tuple[str, ...] = ()
    text_field: str | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    read_chunk = None  # the records of a shard come from few tars: read each tar once per shard

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_extensions", tuple(e.lower().lstrip(".") for e in self.image_extensions))
        object.__setattr__(self, "json_fields", tuple(self.json_fields))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        names = [n for n in (self.cls_field, *self.json_fields, self.text_field) if n is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"label names {names} repeat: cls_field, json_fields and text_field must differ")
        if not self.image_extensions:
            raise ValueError("image_extensions is empty; valid: e.g. [jpg, png, webp]")

    # -- listing ------------------------------------------------------------------------------------------

    def list_units(self) -> Iterator[WorkUnit]:
        """One unit per tar, from the listing alone (one glob or folder listing per pattern folder)."""
        fs, pattern = url_to_fs(self.uri, self.storage_options)
        fs.invalidate_cache()  # a refresh in the same process must see tars replaced since the last listing
        root, tars = _find_tars(fs, pattern)
        for path, info in sorted(tars.items(), key=lambda kv: relative_id(kv[0], root)):
            name = relative_id(path, root)
            yield WorkUnit(name, fingerprint_from_info(info) or "", None, size_bytes=info.get("size"),
                           params={"uri": fs.unstrip_protocol(path), "stem": name.removesuffix(".tar")})

    def list_images(self) -> list[ImageRecord]:
        records = [r for unit in self.list_units() for r in self.expand(unit)]
        logger.info("listed %d samples from tars at %s", len(records), self.uri)
        return sorted_unique(records)

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        """The tar's samples, image bytes inline, in one streamed pass; broken samples become error records."""
        uri, stem = unit.params["uri"], unit.params["stem"]
        fs, path = url_to_fs(uri, self.storage_options)
        with fs.open(path, "rb") as f:
            samples, broken = read_samples(f, extensions=self._wanted_extensions())
        records = [self._record(uri, stem, s) for s in samples]
        if broken is not None:
            logger.warning("%s: %s", uri, broken.describe())
            records.append(self._broken_record(uri, stem, broken))
        return sorted(records, key=lambda r: r.image_id)

    def _wanted_extensions(self) -> set[str]:
        wanted = set(self.image_extensions)
        if self.cls_field:
            wanted.add("cls")
        if self.json_fields:
            wanted.add("json")
        if self.text_field:
            wanted.add("txt")
        return wanted

    # -- records ------------------------------------------------------------------------------------------

    def _record(self, tar_uri: str, stem: str, sample: TarSample) -> ImageRecord:
        image_id = f"{stem}/{sample.key}"
        labels = self._labels(f"{tar_uri}#{sample.key}", sample)
        ext = next((e for e in self.image_extensions if e in sample.files), None)
        if ext is None:
            has = ", ".join(sorted(sample.names))
            return ImageRecord(image_id, f"{tar_uri}#{sample.key}",
                               f"{TAR_ERROR}no image member for key {sample.key!r} (members: {has})", labels)
        data = sample.files[ext]
        return ImageRecord(image_id, f"{tar_uri}#{sample.names[ext]}", fingerprint_bytes(data), labels, data=data)

    def _broken_record(self, tar_uri: str, stem: str, broken: TarBreak) -> ImageRecord:
        """The error record of a broken tar: under the key of the member it broke inside or after (whose sample
        may be incomplete), or ``<tar>/__broken_tar__`` when no member could be read."""
        key = split_member(broken.member)[0] if broken.member is not None else BROKEN_TAR_KEY
        suffix = "" if broken.member is None else "; members after it are lost"
        return ImageRecord(f"{stem}/{key}", f"{tar_uri}#{key}", f"{TAR_ERROR}{broken.describe()}{suffix}",
                           self._labels("", TarSample("")))

    def _labels(self, where: str, sample: TarSample) -> dict[str, Any]:
        labels: dict[str, Any] = {}
        if self.cls_field:
            labels[self.cls_field] = _int_label(sample.files.get("cls"), where)
        if self.json_fields:
            meta = _json_object(sample.files.get("json"), where)
            for name in self.json_fields:
                labels[name] = _scalar(meta.get(name))
        if self.text_field:
            text = sample.files.get("txt")
            labels[self.text_field] = None if text is None else text.decode("utf-8", errors="replace")
        return labels

    # -- reading ------------------------------------------------------------------------------------------

    def read_bytes(self, record: ImageRecord) -> bytes:
        result = self.read_many([record])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def read_many(self, records: Sequence[ImageRecord], *, threads: int = 8) -> list[bytes | Exception]:
        """Inline bytes where records carry them; the others (records that travelled as JSON) are read from
        their tars, one streamed pass per tar that stops after the last member wanted."""
        out: list[bytes | Exception | None] = [None] * len(records)
        by_tar: dict[str, list[tuple[int, str]]] = {}
        for i, r in enumerate(records):
            if r.fingerprint.startswith(TAR_ERROR):
                out[i] = TarMemberError(f"{r.uri}: {r.fingerprint.removeprefix(TAR_ERROR)}")
            elif r.data is not None:
                out[i] = r.data
            else:
                tar_uri, _, member = r.uri.rpartition("#")
                by_tar.setdefault(tar_uri, []).append((i, member))

        def one_tar(item: tuple[str, list[tuple[int, str]]]) -> None:
            tar_uri, wanted = item
            try:
                fs, path = url_to_fs(tar_uri, self.storage_options)
                with fs.open(path, "rb") as f:
                    found, broken = read_members(f, {m for _, m in wanted})
            except Exception as e:  # noqa: BLE001 - an unreadable tar fails its records only
                for i, _ in wanted:
                    out[i] = e
                return
            for i, member in wanted:
                out[i] = found[member] if member in found else _not_found(tar_uri, member, broken)

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(by_tar)))) as pool:
            list(pool.map(one_tar, by_tar.items()))
        return out


def _not_found(tar_uri: str, member: str, broken: TarBreak | None) -> Exception:
    if broken is not None:
        return TarMemberError(f"{tar_uri}: member {member!r} not read: {broken.describe()}")
    return TarMemberError(f"{tar_uri} has no member {member!r} (the tar changed since it was listed?)")


def _find_tars(fs: AbstractFileSystem, pattern: str) -> tuple[str, dict[str, Mapping]]:
    """(root the unit names are relative to, tar path -> listing info) for a brace/glob pattern, a folder or
    a tar. Named shards are found by listing their folders (one request per folder, not one per shard)."""
    tars: dict[str, Mapping] = {}
    literal: dict[str, list[str]] = {}
    for path in expand_braces(pattern):
        path = path.rstrip("/")
        if has_glob(path):
            tars.update({p: i for p, i in fs.glob(path, detail=True).items() if _is_tar(p, i)})
        else:
            literal.setdefault(posixpath.dirname(path), []).append(path)
    missing = []
    for folder, paths in literal.items():
        try:
            listing = {i["name"].rstrip("/"): i for i in fs.ls(folder, detail=True)}
        except FileNotFoundError:
            listing = {}
        for path in paths:
            info = listing.get(path)
            if info is None:
                missing.append(path)
            elif info.get("type") == "directory":
                tars.update({p: i for p, i in fs.find(path, detail=True).items() if _is_tar(p, i)})
            elif not path.endswith(".tar"):
                raise ValueError(f"{path!r} is not a .tar file; WebDataset shards must be uncompressed .tar files")
            else:
                tars[path] = info
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        logger.warning("%d shard(s) named by the pattern do not exist and are skipped: %s", len(missing), shown)
    if not tars:
        raise FileNotFoundError(f"no .tar shards found for {pattern!r}")
    return _pattern_root(fs, pattern), tars


def _pattern_root(fs: AbstractFileSystem, pattern: str) -> str:
    """The folder before the first brace or glob character; a folder itself, or a single tar's folder."""
    parts = pattern.rstrip("/").split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in _PATTERN_CHARS):
            return "/".join(parts[:i])
    path = "/".join(parts)
    return path if fs.isdir(path) else posixpath.dirname(path)


def _is_tar(path: str, info: Mapping) -> bool:
    return info.get("type") != "directory" and path.endswith(".tar") and not posixpath.basename(path).startswith(".")


def _int_label(raw: bytes | None, where: str) -> int | None:
    if raw is None:
        return None
    try:
        return int(raw.decode().strip())
    except (UnicodeDecodeError, ValueError):
        logger.warning("%s.cls is not an integer: %r", where, raw[:40])
        return None


def _json_object(raw: bytes | None, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        logger.warning("%s.json is not JSON", where)
        return {}
    return value if isinstance(value, dict) else {}


def _scalar(value: Any) -> Any:
    """JSON scalars as they are; lists and objects as JSON text, so that a label column has one type."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True)
