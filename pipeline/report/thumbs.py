"""Small JPEG thumbnails of images, as data URIs for the report's map tooltips; unreadable images are skipped."""
from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .. import storage
from ..images import decode_rgb

log = logging.getLogger(__name__)

THUMB_PX = 64
MAX_BYTES = 20 * 2 ** 20  # images larger than this are not read for a thumbnail


def thumbnails(ids: Sequence[str], uris: Sequence[str], *, limit: int, size: int = THUMB_PX,
               storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """image_id -> data:image/jpeg;base64 URI for at most `limit` images whose URI can be read and decoded."""
    out: dict[str, str] = {}
    failed, tried = 0, set()
    for image_id, uri in zip(ids, uris):
        if len(out) >= limit:
            break
        if image_id in tried or not isinstance(uri, str) or not uri:
            continue
        tried.add(image_id)
        try:
            fs, path = storage.resolve(uri, storage_options)
            if (fs.size(path) or 0) > MAX_BYTES:
                failed += 1
                continue
            img = decode_rgb(fs.cat_file(path))
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=75)
            out[image_id] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        except Exception as e:  # noqa: BLE001 - a thumbnail is optional: any unreadable image is skipped
            failed += 1
            log.debug("no thumbnail for %s: %s", storage.redact_uri(uri), e)
    if failed:
        log.info("report: %d images could not be read for thumbnails; their map points show no picture", failed)
    return out
