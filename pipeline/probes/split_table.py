"""Splits as data: the `splits.parquet` table written next to `results.parquet`, and reading one back.

One row per (image_id, task) with its split ("train" / "val" / "test") and few_shot_k null, plus
one row per member of each few-shot training subset (split "train", few_shot_k = k). A table
read back with `read_splits` makes `strata probe --splits FILE` train and evaluate on exactly
those rows.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import storage

if TYPE_CHECKING:
    from pipeline.probes.splits import TaskSplit

log = logging.getLogger(__name__)

SPLIT_COLUMNS = ("image_id", "task", "split", "few_shot_k")
SPLIT_VALUES = ("train", "val", "test")
SPLIT_ALIASES = {  # the names a split column of the index, or a splits file, may use for each split
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


def splits_frame(splits: Mapping[str, "TaskSplit"], few_shot: Sequence[int | None], seed: int) -> pd.DataFrame:
    """The splits of every task (and the few-shot subsets of `few_shot`) as one table."""
    parts = []
    for task, s in splits.items():
        for name in SPLIT_VALUES:
            rows = s.rows[name]
            parts.append(pd.DataFrame({"image_id": s.image_ids[rows], "task": task, "split": name,
                                       "few_shot_k": None}))
        for k in sorted({k for k in few_shot if k is not None}):
            parts.append(pd.DataFrame({"image_id": s.image_ids[s.few_shot(k, seed)], "task": task, "split": "train",
                                       "few_shot_k": k}))
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype="string" if c != "few_shot_k" else "Int64") for c in SPLIT_COLUMNS})
    df = pd.concat(parts, ignore_index=True)
    df["few_shot_k"] = pd.array(df["few_shot_k"], dtype="Int64")
    for c in ("image_id", "task", "split"):
        df[c] = df[c].astype("string")
    return df


def write_splits(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_splits(uri: str, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """A splits table from Parquet (or CSV) on any fsspec URI, checked and normalised; ValueError names the fix."""
    fs, path = storage.resolve(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"splits file {storage.redact_uri(uri)} does not exist; pass the splits.parquet "
                                "written next to a results.parquet")
    data = fs.cat_file(path)
    kind = "CSV" if path.endswith(".csv") else "Parquet"
    try:
        df = pd.read_csv(io.BytesIO(data)) if kind == "CSV" else pd.read_parquet(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 - pyarrow and pandas raise many types for a file that is not a table
        raise ValueError(f"splits file {storage.redact_uri(uri)} is not a readable {kind} table ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass a splits.parquet (or a .csv) with "
                         f"columns {list(SPLIT_COLUMNS)}") from None
    return check_splits(df, where=storage.redact_uri(uri))


def check_splits(df: pd.DataFrame, *, where: str = "splits table") -> pd.DataFrame:
    missing = [c for c in ("image_id", "task", "split") if c not in df.columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; a splits table has columns {list(SPLIT_COLUMNS)}")
    df = df.copy()
    no_k = "few_shot_k" not in df.columns
    if no_k:
        df["few_shot_k"] = None
    df["few_shot_k"] = pd.array(pd.to_numeric(df["few_shot_k"]), dtype="Int64")
    df["image_id"] = df["image_id"].astype(str)
    df["task"] = df["task"].astype(str)
    raw = df["split"].astype(str)
    df["split"] = raw.str.strip().str.lower().map(SPLIT_ALIASES)
    bad = sorted(set(raw[df["split"].isna()]))
    if bad:
        raise ValueError(f"{where}: split values {bad[:5]} unknown; valid: {list(SPLIT_VALUES)} (or "
                         f"{sorted(set(SPLIT_ALIASES) - set(SPLIT_VALUES))})")
    fs_rows = df["few_shot_k"].notna()
    if (df.loc[fs_rows, "split"] != "train").any():
        raise ValueError(f"{where}: few-shot rows (few_shot_k set) must have split 'train'")
    if (df.loc[fs_rows, "few_shot_k"] < 1).any():
        raise ValueError(f"{where}: few_shot_k must be >= 1 (or null for the full split)")
    full_dup = df[~fs_rows].duplicated(["image_id", "task"])
    few_dup = df[fs_rows].duplicated(["image_id", "task", "few_shot_k"])
    dup = list(full_dup[full_dup].index) + list(few_dup[few_dup].index)
    if dup:
        first = df.loc[dup, ["image_id", "task"]].drop_duplicates().head(3).to_dict("records")
        hint = (" (there is no few_shot_k column: rows of few-shot subsets need it, as in the splits.parquet strata "
                "writes)" if no_k else "")
        raise ValueError(f"{where}: an image appears twice for a task, e.g. {first}; give one split per image and "
                         f"task{hint}")
    return df.reset_index(drop=True)


def split_from_table(table: pd.DataFrame, task: str, ids: np.ndarray, labelled: np.ndarray
                     ) -> tuple[np.ndarray, int, str, dict[int, np.ndarray]]:
    """(split per row, labelled rows without one, source, few-shot k -> train rows) of one task."""
    mine = table[table["task"] == task]
    if mine.empty:
        raise ValueError(f"splits file has no rows for task {task!r}; it has tasks {sorted(set(table['task']))}. "
                         "Probe those tasks, or write a splits file that covers this one")
    full = mine[mine["few_shot_k"].isna()]
    pos = pd.Index(ids).get_indexer(full["image_id"])
    unknown = int((pos < 0).sum())
    if unknown:
        log.warning("splits file: %d image ids of task %r are not in this store version; ignored", unknown, task)
    split = np.full(len(ids), None, dtype=object)
    split[pos[pos >= 0]] = full["split"].to_numpy(dtype=object)[pos >= 0]
    n_unsplit = int(pd.isna(split[labelled]).sum())
    if n_unsplit:
        log.warning("splits file: %d labelled images of task %r have no split (added since?) and are left out",
                    n_unsplit, task)
    train = set(np.flatnonzero(split == "train").tolist()) & set(labelled.tolist())
    few: dict[int, np.ndarray] = {}
    for k, g in mine[mine["few_shot_k"].notna()].groupby("few_shot_k"):
        p = pd.Index(ids).get_indexer(g["image_id"])
        few[int(k)] = np.array(sorted(set(p[p >= 0].tolist()) & train), dtype=np.int64)
        dropped = int((p >= 0).sum()) - len(few[int(k)])
        if dropped:
            log.warning("splits file: the k=%d subset of task %r trains on %d rows: %d of its images are no longer "
                        "labelled training rows (moved to val/test, or unlabelled) and are left out", int(k), task,
                        len(few[int(k)]), dropped)
    return split, n_unsplit, "file", few
