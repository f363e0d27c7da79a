"""Manifest units: the rows of a CSV or Parquet manifest streamed into pages, and a page read back in a task.

Parquet pages are read back by row groups. An uncompressed CSV page is read back by byte range (the header
line plus the page's lines), found in a second pass that counts newlines; a CSV whose quoted fields hold line
breaks, or a compressed one, is read whole by each task instead (slower, still correct).
"""
from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .base import page_rows, url_to_fs
from . import units as _units
from .units import WorkUnit, id_hash, id_hashes, paginate

if TYPE_CHECKING:
    from .manifest import ManifestSource

log = logging.getLogger(__name__)

_BATCH_BYTES = 8 << 20


def _format(source: ManifestSource) -> str:
    from .manifest import _COMPRESSIONS, _infer_format

    _, path = url_to_fs(source.manifest_uri, source.storage_options)
    fmt = source.format or _infer_format(path)
    compressed = path.lower().endswith(_COMPRESSIONS)
    return f"{fmt}{'+z' if compressed else ''}"


def _batches(source: ManifestSource, fmt: str) -> Iterator[pa.Table]:
    """The manifest's rows in order, a batch at a time, with the text columns read as text."""
    fs, path = url_to_fs(source.manifest_uri, source.storage_options)
    if fmt.startswith("parquet"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            for g in range(pf.num_row_groups):
                yield pf.read_row_group(g)
        return
    text = {name: pa.string() for name in source._text_columns()}
    with fs.open(path, "rb", compression="infer") as f:
        reader = pa_csv.open_csv(
            f, read_options=pa_csv.ReadOptions(block_size=_BATCH_BYTES),
            parse_options=pa_csv.ParseOptions(delimiter="\t" if fmt.startswith("tsv") else ","),
            convert_options=pa_csv.ConvertOptions(column_types=text))
        for batch in reader:
            yield pa.Table.from_batches([batch])


def list_manifest_units(source: ManifestSource) -> Iterator[WorkUnit]:
    fmt = _format(source)
    pages, seen, schema = [], [], None

    def rows_of() -> Iterator[tuple]:
        nonlocal schema
        for table in _batches(source, fmt):
            schema = schema or table.schema
            records = source.records(table, fingerprints=False)
            seen.append(id_hashes(r.image_id for r in records))
            for content in page_rows(records):
                yield content[0], (content[1] or None), content[2]

    start = 0
    for page in paginate(rows_of(), _units.PAGE_IMAGES):
        pages.append((page, start))
        start += page.count
    _refuse_duplicates(source, seen, fmt)
    known = source.fingerprint_column is not None
    types = {f.name: str(f.type) for f in schema} if schema is not None else {}
    offsets = _line_offsets(source, fmt, [s for _, s in pages] + [start]) if fmt in ("csv", "tsv") else None
    log.info("manifest %s: %d rows in %d units", source.manifest_uri, start, len(pages))
    for k, (page, first_row) in enumerate(pages):
        params = {"row_start": first_row, "row_end": first_row + page.count, "format": fmt, "types": types}
        if offsets is not None:
            params |= {"offset": offsets[k], "end": offsets[k + 1]}
        yield WorkUnit(f"rows:{page.key}", page.content.hexdigest() if known else "", page.count,
                       page.meta.hexdigest(), params=params)


def read_unit_rows(source: ManifestSource, unit: WorkUnit) -> pa.Table:
    """The unit's rows of the manifest, with the column types the driver saw."""
    p = unit.params
    fs, path = url_to_fs(source.manifest_uri, source.storage_options)
    lo, hi = p["row_start"], p["row_end"]
    if p["format"].startswith("parquet"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            parts, at = [], 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if at + n > lo and at < hi:
                    t = pf.read_row_group(g)
                    parts.append(t.slice(max(0, lo - at), min(hi, at + n) - max(lo, at)))
                at += n
        return pa.concat_tables(parts)
    types = {name: _arrow_type(t) for name, t in p["types"].items()}
    options = dict(parse_options=pa_csv.ParseOptions(delimiter="\t" if p["format"].startswith("tsv") else ","),
                   convert_options=pa_csv.ConvertOptions(column_types=types))
    if "offset" in p:
        with fs.open(path, "rb") as f:
            header = f.readline()
            f.seek(p["offset"])
            body = f.read(p["end"] - p["offset"])
        return pa_csv.read_csv(io.BytesIO(header + body), **options)
    with fs.open(path, "rb", compression="infer") as f:
        return pa_csv.read_csv(f, **options).slice(lo, hi - lo)


def _line_offsets(source: ManifestSource, fmt: str, rows: list[int]) -> list[int] | None:
    """Byte offsets where data rows ``rows`` start (and the end of the file for the last), or None when lines
    are not rows (quoted line breaks)."""
    fs, path = url_to_fs(source.manifest_uri, source.storage_options)
    wanted, out, line, pos = sorted(set(rows)), {}, -1, 0  # line -1 is the header
    i = 0
    with fs.open(path, "rb") as f:
        while True:
            chunk = f.read(_BATCH_BYTES)
            if not chunk:
                break
            for nl in _newlines(chunk):
                line += 1
                while i < len(wanted) and wanted[i] == line:
                    out[line] = int(pos + nl + 1)
                    i += 1
            pos += len(chunk)
        size = pos
    total = rows[-1]
    if line + (0 if size and _ends_with_newline(fs, path, size) else 1) != total:
        log.warning("%s: lines are not rows (quoted line breaks?); each unit reads the whole manifest",
                    source.manifest_uri)
        return None
    return [out.get(r, size) for r in rows]


def _newlines(chunk: bytes) -> np.ndarray:
    return np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)


def _ends_with_newline(fs, path: str, size: int) -> bool:
    with fs.open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _refuse_duplicates(source: ManifestSource, seen: list[np.ndarray], fmt: str) -> None:
    """The listing keeps only id hashes; on a clash the manifest is read again to name a few duplicates."""
    hashes = np.sort(np.concatenate(seen)) if seen else np.zeros(0, np.uint64)
    if not len(hashes) or not (hashes[1:] == hashes[:-1]).any():
        return
    clashes = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    wanted = set(clashes[:5].tolist())
    names = sorted({r.image_id for table in _batches(source, fmt) for r in source.records(table, fingerprints=False)
                    if id_hash(r.image_id) in wanted})
    raise ValueError(f"{source.manifest_uri}: {len(clashes)} image id(s) listed more than once, e.g. {names}; ids must "
                     f"be unique: name a unique column in source.options.id_column (default: the image_id column, "
                     f"else the URI)")


def _arrow_type(name: str) -> pa.DataType:
    """A manifest column's type as the driver saw it; anything else (an all-null column) is read as text."""
    from ..stores.writer import type_from_str

    return type_from_str(name, default=pa.string())
