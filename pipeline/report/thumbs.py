"""Small JPEG thumbnails of images, as data URIs for the report's map tooltips; unreadable images are skipped.

An image file is read by its URI. An image inside a container (a Parquet or Arrow row, a tar member: a URI
with a ``#`` fragment) is read by the source that listed it, rebuilt from the version's config, under a byte
budget: containers holding the most of the wanted images are read first, and one that would overrun the
budget is skipped, so a map of a large dataset never reads it whole.
"""
from __future__ import annotations

import base64
import io
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from .. import storage
from ..images import decode_rgb
from ..sources.base import fingerprint_bytes
from ..stores.copy import CONTENT_PREFIX

log = logging.getLogger(__name__)

THUMB_PX = 64
MAX_BYTES = 20 * 2 ** 20  # images larger than this are not read for a thumbnail
_FILE_PREFIXES = ("size:", "etag:")  # what storage.fingerprint_from_info makes of a file's listing
CONTAINER_BUDGET = 256 * 2 ** 20  # bytes of containers (Parquet files, tars) read for one store's thumbnails


def thumbnails(ids: Sequence[str], uris: Sequence[str], *, limit: int, size: int = THUMB_PX,
               storage_options: Mapping[str, Any] | None = None, source=None,
               budget: int = CONTAINER_BUDGET, fingerprints: Mapping[str, str] | None = None) -> dict[str, str]:
    """image_id -> data:image/jpeg;base64 URI for at most `limit` images that can be read and decoded;
    ``source`` (the store's source) reads those inside containers. With ``fingerprints`` (image_id -> the
    stored fingerprint), an image whose bytes or file changed since it was encoded gets no thumbnail: the
    picture would not be the one whose features the map shows."""
    fingerprints = fingerprints or {}
    out: dict[str, str] = {}
    failed, seen, inside = 0, set(), []
    for image_id, uri in zip(ids, uris):
        if len(out) >= limit:
            break
        if image_id in seen or not isinstance(uri, str) or not uri:
            continue
        seen.add(image_id)
        if "#" in uri and source is not None:
            inside.append((image_id, uri))
            continue
        thumb = _from_file(uri, size, storage_options, fingerprints.get(image_id))
        if thumb is None:
            failed += 1
        else:
            out[image_id] = thumb
    if inside and len(out) < limit:
        got, lost = _from_containers(inside, source, limit - len(out), size, budget, fingerprints)
        out.update(got)
        failed += lost
    if failed:
        log.info("report: %d images could not be read for thumbnails, or changed since they were encoded; their "
                 "map points show no picture", failed)
    return out


def _from_file(uri: str, size: int, storage_options, fingerprint: str | None) -> str | None:
    try:
        fs, path = storage.resolve(uri, storage_options)
        info = fs.info(path)
        if (info.get("size") or 0) > MAX_BYTES:
            return None
        if fingerprint and fingerprint.startswith(_FILE_PREFIXES) and \
                storage.fingerprint_from_info(info) not in (None, fingerprint):
            return None
        data = fs.cat_file(path)
        return None if not _same_content(data, fingerprint) else _thumb(data, size)
    except Exception as e:  # noqa: BLE001 - a thumbnail is optional: any unreadable image is skipped
        log.debug("no thumbnail for %s: %s", storage.redact_uri(uri), e)
        return None


def _same_content(data: bytes, fingerprint: str | None) -> bool:
    return not (fingerprint and fingerprint.startswith(CONTENT_PREFIX)) or fingerprint_bytes(data) == fingerprint


def _from_containers(wanted: list[tuple[str, str]], source, limit: int, size: int, budget: int,
                     fingerprints: Mapping[str, str]) -> tuple[dict[str, str], int]:
    """Thumbnails of images inside containers, the fullest containers first, within ``budget`` bytes."""
    from ..sources import ImageRecord

    by_container: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for image_id, uri in wanted:
        by_container[uri.split("#", 1)[0]].append((image_id, uri))
    out: dict[str, str] = {}
    failed, spent = 0, 0
    for container, members in sorted(by_container.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        if len(out) >= limit:
            break
        cost = _size(container, source)
        if spent + cost > budget:
            failed += len(members)
            continue
        spent += cost
        members = members[: limit - len(out)]
        try:
            raw = source.read_many([ImageRecord(i, uri, "", {}) for i, uri in members])
        except Exception as e:  # noqa: BLE001
            log.debug("no thumbnails from %s: %s", storage.redact_uri(container), e)
            failed += len(members)
            continue
        for (image_id, _), data in zip(members, raw):
            readable = not isinstance(data, Exception) and data is not None
            thumb = _thumb_or_none(data, size) if readable and _same_content(data, fingerprints.get(image_id)) \
                else None
            if thumb is None:
                failed += 1
            else:
                out[image_id] = thumb
    return out, failed


def _size(container: str, source) -> int:
    try:
        fs, path = storage.resolve(container, getattr(source, "storage_options", None))
        return int(fs.size(path) or 0)
    except Exception:  # noqa: BLE001 - unknown: counted as free, the read itself may still fail
        return 0


def _thumb_or_none(data: bytes, size: int) -> str | None:
    try:
        return _thumb(data, size)
    except Exception:  # noqa: BLE001
        return None


def _thumb(data: bytes, size: int) -> str:
    img = decode_rgb(data)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def store_source(store):
    """The source that listed a store's images, rebuilt from its version's config (credentials, masked there,
    come from the environment as for any reader); None when it cannot be rebuilt here."""
    spec = (store.info.config or {}).get("source") or {}
    if not spec.get("kind") or not spec.get("uri"):
        return None
    from ..sources import make_source

    options = dict(spec.get("options") or {})
    unmasked = _unmasked(spec.get("storage_options") or {})
    if unmasked:
        options["storage_options"] = unmasked
    try:
        return make_source(spec["kind"], spec["uri"], **options)
    except Exception as e:  # noqa: BLE001 - thumbnails are optional
        log.info("report: no thumbnails of images inside files: the source %s cannot be opened here (%s)",
                 storage.redact_uri(str(spec["uri"])), e)
        return None


def _unmasked(options):
    """``options`` without the values redaction masked."""
    if isinstance(options, Mapping):
        return {k: _unmasked(v) for k, v in options.items() if v != storage.MASK}
    return options
