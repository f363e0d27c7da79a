"""Arrow IPC files as ``Dataset.save_to_disk`` writes them (the stream format), or in the random-access file
format: read whole for a unit, or streamed batch by batch up to the last row wanted."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import BinaryIO

import pyarrow as pa

__all__ = ["ARROW_SUFFIX", "arrow_schema", "read_arrow", "take_arrow_rows"]

ARROW_SUFFIX = ".arrow"
_FILE_MAGIC = b"ARROW1"


def _batches(f: BinaryIO) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    head = f.read(len(_FILE_MAGIC))
    f.seek(0)
    if head == _FILE_MAGIC:
        reader = pa.ipc.open_file(f)
        return reader.schema, (reader.get_batch(i) for i in range(reader.num_record_batches))
    reader = pa.ipc.open_stream(f)
    return reader.schema, iter(reader)


def arrow_schema(f: BinaryIO) -> pa.Schema:
    """The schema of an Arrow IPC file object, from its first message (stream) or its footer (file)."""
    return _batches(f)[0]


def read_arrow(f: BinaryIO) -> pa.Table:
    """The whole table of an Arrow IPC file object."""
    schema, batches = _batches(f)
    return pa.Table.from_batches(list(batches), schema=schema)


def take_arrow_rows(f: BinaryIO, rows: Sequence[int]) -> tuple[pa.Table, int]:
    """The rows of ``rows`` that exist, in the order given, reading batches only up to the last row wanted;
    and how many rows the file was seen to have (its length when every batch was read)."""
    last = max(rows, default=-1)
    schema, batches = _batches(f)
    kept, seen = [], 0
    for batch in batches:
        if seen > last:
            break
        kept.append(batch)
        seen += batch.num_rows
    table = pa.Table.from_batches(kept, schema=schema)
    return table.take([r for r in rows if 0 <= r < seen]), seen
