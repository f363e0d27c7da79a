"""WebDataset tar shards (the layout img2dataset, LAION and DataComp publish): one work unit per tar."""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import pyarrow as pa
from fsspec import AbstractFileSystem

from pipeline.sources.base import (
    SharedFileSource,
    IMAGE_EXTENSIONS,
    ImageRecord,
    fingerprint_bytes,
    fingerprint_from_info,
    has_glob,
    relative_id,
    url_to_fs,
)
from pipeline.sources.braces import expand_braces
from pipeline.sources.tars import TarBreak, TarSample, read_members, read_samples, split_member
from pipeline.sources.units import WorkUnit

__all__ = ["JSON_TYPES", "TAR_ERROR", "TarMemberError", "WebDatasetSource"]

logger = logging.getLogger(__name__)

#: Fingerprint prefix of a record that stands for a broken sample; reading it raises with the rest as reason.
TAR_ERROR = "tar-error:"
#: Types a ``json_fields`` mapping may give a field.
JSON_TYPES = ("string", "int64", "float64", "bool")
#: Key of the error record of a tar in which no member can be read (empty, not a tar).
BROKEN_TAR_KEY = "__broken_tar__"
_PATTERN_CHARS = "{*?["


class TarMemberError(OSError):
    """A sample of a tar that cannot be read: no image member, or a tar cut or corrupt at that point."""


@dataclass(frozen=True)
class WebDatasetSource(SharedFileSource):
    """Samples of WebDataset tars: a brace pattern (``s3://b/shard-{00000..00999}.tar``; several groups,
    comma lists and globs allowed), a glob, a single tar, or a folder searched for ``.tar`` files.

    A sample is the members sharing a key (``<key>.jpg``, ``<key>.json``, ...). ``image_id`` is
    ``<tar path relative to the pattern's root, no .tar>/<key>``; the image is the key's first member in
    ``image_extensions`` order, and its fingerprint the sha256 of its bytes (a re-written tar re-encodes
    only the images whose bytes changed). Labels: ``.cls`` as an int column named ``cls_field``, the
    ``json_fields`` of ``.json`` (a list, typed from the first tar; or ``{field: type}`` with a type of
    :data:`JSON_TYPES`, values converted), ``.txt`` as ``text_field``; every record has all of them (None
    where a sample lacks one). Work units are tars, fingerprinted by ETag or size+mtime: the driver opens
    none (except the first, to type a list of ``json_fields``).
    """

    uri: str
    _: KW_ONLY
    image_extensions: tuple[str, ...] = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    cls_field: str | None = "cls"
    json_fields: Sequence[str] | Mapping[str, str] = ()
    text_field: str | None = None
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    read_chunk = None  # the records of a shard come from few tars: read each tar once per shard

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_extensions", tuple(e.lower().lstrip(".") for e in self.image_extensions))
        object.__setattr__(self, "json_fields", _json_types(self.json_fields))
        object.__setattr__(self, "storage_options", dict(self.storage_options or {}))
        names = [n for n in (self.cls_field, *self._json_types, self.text_field) if n is not None]
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

    def label_schema(self, units: Sequence[WorkUnit]) -> pa.Schema:
        """The label columns from the options; only ``json_fields`` without a type are typed from the values
        in the first tar."""
        types: dict[str, pa.DataType | None] = {n: t and pa.type_for_alias(t) for n, t in self._json_types.items()}
        if self.cls_field:
            types[self.cls_field] = pa.int64()
        if self.text_field:
            types[self.text_field] = pa.string()
        untyped = [n for n, t in types.items() if t is None]
        if untyped:
            from ..stores import label_schema

            first = self.expand(units[0]) if units else []
            seen = label_schema([{"labels": {n: r.labels.get(n) for n in untyped}} for r in first])
            types |= {f.name: f.type for f in seen}
        return pa.schema(sorted(types.items()))

    def expand(self, unit: WorkUnit) -> list[ImageRecord]:
        """The tar's samples, image bytes inline, in one streamed pass; broken samples become error records."""
        uri, stem = unit.params["uri"], unit.params["stem"]
        fs, path = url_to_fs(uri, self.storage_options)
        with fs.open(path, "rb") as f:
            samples, broken = read_samples(f, extensions=self._wanted_extensions())
        records = [self._record(uri, stem, s) for s in samples]
        repeated = [name for s in samples for name in s.repeated]
        if repeated:
            logger.warning("%s: %d member(s) repeat the name of an earlier one, e.g. %s; the first copy of each is "
                           "read and the later ones ignored (write each member once to use another copy)", uri,
                           len(repeated), repeated[:3])
        if broken is not None:
            logger.warning("%s: %s", uri, broken.describe())
            records.append(self._broken_record(uri, stem, broken))
        return sorted(records, key=lambda r: r.image_id)

    @property
    def _json_types(self) -> dict[str, str | None]:
        return dict(self.json_fields)

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
            for name, kind in self._json_types.items():
                labels[name] = _convert(meta.get(name), kind, f"{where}.json field {name!r}")
        if self.text_field:
            text = sample.files.get("txt")
            labels[self.text_field] = None if text is None else text.decode("utf-8", errors="replace")
        return labels

    # -- reading ------------------------------------------------------------------------------------------

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


def _json_types(fields: Sequence[str] | Mapping[str, str]) -> tuple[tuple[str, str | None], ...]:
    """``json_fields`` as ((name, type or None), ...), the types checked (a tuple keeps the source hashable)."""
    if isinstance(fields, str):
        fields = [fields]
    types = dict(fields) if isinstance(fields, Mapping) else {name: None for name in fields}
    for name, kind in types.items():
        if kind is not None and kind not in JSON_TYPES:
            raise ValueError(f"json_fields: {name!r} has type {kind!r}; valid: {list(JSON_TYPES)} (or a list of "
                             f"names, typed from the first tar)")
    return tuple(types.items())


def _convert(value: Any, kind: str | None, where: str) -> Any:
    """A JSON value as its column's type (None when it does not fit); lists and objects as JSON text."""
    if value is None:
        return None
    if isinstance(value, (list, dict)):
        value = json.dumps(value, sort_keys=True)
    if kind is None:
        return value
    try:
        if kind == "string":
            return value if isinstance(value, str) else json.dumps(value)
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int64" and not isinstance(value, bool) and float(value) == int(value):
            return int(value)
        if kind == "float64" and not isinstance(value, bool):
            return float(value)
    except (TypeError, ValueError):
        pass
    logger.warning("%s: %r is not a %s", where, value, kind)
    return None
