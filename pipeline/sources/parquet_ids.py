"""Which ids the rows of a Parquet dataset get, chosen by the driver from one column per file.

Stores are keyed by image id, so a dataset's ids must be unique. An ``id_column`` must be (a repeat is
refused before any work starts). Image paths are used only where they are unique: Hugging Face exports
often repeat a basename (``0.jpg`` in every class, ``image.png`` on every row), so a file whose paths repeat,
within it or in another file, gets ``<file stem>/<row>`` ids instead, with a warning. The driver keeps an
8-byte hash per id, as for manifests, never the ids themselves.
"""
from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.sources.units import id_hashes, sorted_id_hashes

log = logging.getLogger(__name__)

ROW, PATH, COLUMN = "row", "path", "column"
_HINT = "name a unique column in source.options.id_column"


@dataclass
class FileIds:
    """One file's candidate ids: ``kind`` COLUMN or PATH with their hashes, or ROW (unique by construction)."""

    path: str
    kind: str
    hashes: np.ndarray


def file_ids(path: str, id_column: str | None, column: pa.Array | None) -> FileIds:
    """From the file's id column (``id_column`` set) or image paths (complete, else None): the kind of id its
    rows would get before other files are seen."""
    if id_column is not None:
        if column.null_count:
            raise ValueError(f"{path}: {column.null_count} row(s) have no {id_column!r} (the id column); {_HINT}")
        return FileIds(path, COLUMN, id_hashes(column.to_pylist()))
    if column is None:
        return FileIds(path, ROW, np.zeros(0, np.uint64))
    return FileIds(path, PATH, id_hashes(column.to_pylist()))


def settle(files: list[FileIds], names: Callable[[str, set[int]], list[str]]) -> dict[str, str]:
    """The id kind of every file: ids from an id column must be unique across the dataset (else ValueError,
    naming a few, which ``names(file, hashes)`` reads back); a file of path ids keeps them only where none
    repeats, within it or in another file."""
    allh, owner = sorted_id_hashes([f.hashes for f in files])
    dup = np.zeros(len(allh), bool)
    if len(allh) > 1:
        same = allh[1:] == allh[:-1]
        dup[1:] |= same
        dup[:-1] |= same
    clashing = set(owner[dup].tolist())
    column_clash = [i for i in sorted(clashing) if files[i].kind == COLUMN]
    if column_clash:
        wanted = set(np.unique(allh[dup])[:5].tolist())
        shown = sorted({n for i in column_clash for n in names(files[i].path, wanted)})[:5]
        where = ", ".join(files[i].path for i in column_clash[:3])
        raise ValueError(f"image ids repeat in the id column (in {where}), e.g. {shown}; ids must be unique: {_HINT}")
    kinds = {}
    for i, f in enumerate(files):
        kind = f.kind
        if kind == PATH and i in clashing:
            example = names(f.path, set(allh[dup & (owner == i)][:1].tolist()))
            log.warning("%s: image paths repeat (e.g. %r) within this file or in another one, so its rows get "
                        "'<file>/<row>' ids; %s for ids of your own", f.path, example[0] if example else None, _HINT)
            kind = ROW
        kinds[f.path] = kind
    return kinds


def path_ids_unique(path: str, paths: pa.Array) -> bool:
    """For a file read whole in a task (an Arrow file of ``save_to_disk``): whether its complete image paths
    can be its ids, i.e. none repeats in it (the driver never reads those files, so other files are not seen)."""
    distinct = len(paths.unique())
    if distinct < len(paths):
        log.warning("%s: %d image paths repeat, so its rows get '<file>/<row>' ids; %s for ids of your own", path,
                    len(paths) - distinct, _HINT)
    return distinct == len(paths)


def refuse_repeats(path: str, ids: Sequence[str]) -> None:
    """A unit's ids must be unique (a backstop for what the driver cannot check, e.g. inside Arrow files)."""
    repeated = [i for i, n in collections.Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(f"{path}: {len(repeated)} image id(s) repeat, e.g. {repeated[:5]}; ids must be unique: "
                         f"{_HINT}")
