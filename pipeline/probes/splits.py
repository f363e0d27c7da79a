"""Seeded, row-order-independent train/val/test assignment per task, and few-shot subsets of train."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.probes.config import SplitSpec, TaskSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}


@dataclass(frozen=True)
class TaskSplit:
    """One task's labels and split, as row positions into the feature table.

    targets: int64 class codes (-1 where the label is missing) for classification, float64
    (NaN where missing) for regression. rows: "train"/"val"/"test" -> sorted row positions.
    """

    task: str
    task_type: str
    classes: tuple
    targets: np.ndarray
    rows: dict[str, np.ndarray]
    image_ids: np.ndarray
    n_missing: int
    n_unsplit: int
    source: str

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def few_shot(self, k: int | None, seed: int) -> np.ndarray:
        """k training rows per class (k rows in all for regression), seeded; None = all of train.

        The order is a seeded hash of image_id, so a smaller k is a subset of a larger k.
        """
        train = self.rows["train"]
        if k is None:
            return train
        order = train[_hash_order(self.image_ids[train], seed)]
        if self.task_type == "regression":
            return np.sort(order[:k])
        codes = self.targets[order]
        picked = [order[codes == c][:k] for c in range(self.n_classes)]
        short = [self.classes[c] for c, p in enumerate(picked) if len(p) < k]
        if short:
            log.warning("task %r: few-shot k=%d, but classes %s have fewer training rows; using all of theirs",
                        self.task, k, short[:10])
        return np.sort(np.concatenate(picked))


def missing_labels(labels: pd.Series) -> np.ndarray:
    """True where a label is None, NaN or an empty/blank string."""
    miss = labels.isna().to_numpy().copy()
    if labels.dtype == object or pd.api.types.is_string_dtype(labels.dtype):
        miss |= labels.astype(str).str.strip().eq("").to_numpy() & ~miss
    return miss


def infer_task_type(labels: pd.Series) -> str:
    """Regression for float columns with non-integer values, else classification."""
    if pd.api.types.is_float_dtype(labels.dtype):
        vals = labels.dropna().to_numpy(dtype=np.float64)
        if len(vals) and not np.all(np.equal(np.mod(vals, 1), 0)):
            return "regression"
    return "classification"


def assign_splits(image_ids: np.ndarray, strata: np.ndarray | None, *, fractions: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """'train'/'val'/'test' per row, stratified by `strata` (None = not stratified).

    Rows are ordered by a seeded hash of their image_id inside each stratum, so the result for an
    id does not depend on row order; each stratum gets its share (at least one val/test row when it
    has three or more rows).
    """
    ids = np.asarray(image_ids)
    out = np.empty(len(ids), dtype=object)
    groups = np.zeros(len(ids), dtype=np.int64) if strata is None else np.asarray(strata)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        members = members[_hash_order(ids[members], seed)]
        n_tr, n_va, _ = _allocate(len(members), fractions)
        out[members[:n_tr]] = "train"
        out[members[n_tr:n_tr + n_va]] = "val"
        out[members[n_tr + n_va:]] = "test"
    return out


def split_task(index: pd.DataFrame, task: TaskSpec | str, spec: SplitSpec) -> TaskSplit:
    """Labels, missing-label count and train/val/test rows of one task; refuses unusable tasks."""
    task = TaskSpec(task) if isinstance(task, str) else task
    name = task.name
    if name not in index.columns:
        raise ValueError(f"task {name!r}: no such label column; the index has columns {list(index.columns)}. "
                         "Fix the name in probes.tasks")
    labels = index[name]
    missing = missing_labels(labels)
    task_type = infer_task_type(labels[~missing]) if task.type == "auto" else task.type
    ids = index["image_id"].astype(str).to_numpy(dtype=object)
    labelled = np.flatnonzero(~missing)
    if task_type == "regression":
        targets = np.full(len(index), np.nan)
        try:
            targets[labelled] = labels.iloc[labelled].to_numpy(dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"task {name!r}: regression needs numeric labels ({e}); set type: classification") from e
        classes: tuple = ()
        strata = None
    else:
        targets, classes = _encode(labels, labelled, name)
        strata = targets[labelled] if spec.stratified else None

    split, n_unsplit, source = _split_column(index, spec, labelled)
    if split is None:
        fractions = (spec.train, spec.val, spec.test)
        split = np.empty(len(index), dtype=object)
        split[labelled] = assign_splits(ids[labelled], strata, fractions=fractions, seed=spec.seed)
    rows = {s: labelled[split[labelled] == s] for s in SPLITS}
    out = TaskSplit(task=name, task_type=task_type, classes=classes, targets=targets, rows=rows, image_ids=ids,
                    n_missing=int(missing.sum()), n_unsplit=n_unsplit, source=source)
    _check_sizes(out, spec)
    return out


def _encode(labels: pd.Series, labelled: np.ndarray, name: str) -> tuple[np.ndarray, tuple]:
    values = labels.iloc[labelled]
    try:
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError:  # mixed types cannot be sorted together: sort by text
        codes, uniques = pd.factorize(values.astype(str), sort=True)
    classes = tuple(u.item() if hasattr(u, "item") else u for u in uniques)
    if len(classes) < 2:
        raise ValueError(f"task {name!r} has a single class {classes[:1]} in {len(labelled)} labelled rows; a probe "
                         "needs at least two classes: fix the label column or drop the task from probes.tasks")
    targets = np.full(len(labels), -1, dtype=np.int64)
    targets[labelled] = codes
    return targets, classes


def _split_column(index: pd.DataFrame, spec: SplitSpec, labelled: np.ndarray) -> tuple[np.ndarray | None, int, str]:
    column = spec.column or ("split" if "split" in index.columns else None)
    if column is None:
        return None, 0, "generated"
    if column not in index.columns:
        raise ValueError(f"split column {column!r} not in the index; columns: {list(index.columns)}. "
                         "Fix probes.split.column, or set it to null to generate a split")
    raw = index[column]
    miss = missing_labels(raw)
    norm = np.array(raw.astype(str).str.strip().str.lower().map(_ALIASES), dtype=object)
    bad = sorted(set(raw[~miss & pd.isna(norm)].astype(str)))
    if bad:
        raise ValueError(f"split column {column!r} has values {bad[:5]}; valid values: {sorted(_ALIASES)}")
    norm[miss] = None
    n_unsplit = int(miss[labelled].sum())
    if n_unsplit:
        log.warning("split column %r: %d labelled rows have no split and are left out", column, n_unsplit)
    return norm, n_unsplit, f"column:{column}"


def _check_sizes(s: TaskSplit, spec: SplitSpec) -> None:
    user = s.source.startswith("column:")
    has_test = len(s.rows["test"]) > 0 if user else spec.test > 0
    needed = ("train", "val", "test") if has_test else ("train", "val")
    for name in needed:
        n = len(s.rows[name])
        fix = (f"add rows with {name!r} to the split column" if user
               else f"raise probes.split.{name} (now {getattr(spec, name)}), add labelled data")
        if s.task_type == "regression":
            if n < 2:
                raise ValueError(f"task {s.task!r}: the {name} split has {n} rows; at least 2 are needed: {fix}")
        elif n < s.n_classes:
            raise ValueError(f"task {s.task!r}: the {name} split has {n} labelled rows but there are {s.n_classes} "
                             f"classes; each split needs at least one row per class: {fix}, or merge rare classes")
    if s.task_type == "classification":
        absent = sorted(set(range(s.n_classes)) - set(s.targets[s.rows["train"]].tolist()))
        if absent:
            names = [s.classes[c] for c in absent][:10]
            raise ValueError(f"task {s.task!r}: classes {names} have no training rows: add training examples of "
                             "them or drop those labels")


def _hash_order(ids: np.ndarray, seed: int) -> np.ndarray:
    """Permutation ordering `ids` by a seeded hash (ties by id): the same for any row order."""
    key = hashlib.blake2b(str(seed).encode(), digest_size=8).hexdigest()
    h = pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key, categorize=False)
    return np.lexsort((np.asarray(ids, dtype=str), h))


def _allocate(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    _, f_val, f_test = fractions
    n_val, n_test = round(f_val * n), round(f_test * n)
    n_val = max(n_val, 1) if f_val > 0 else 0
    n_test = max(n_test, 1) if f_test > 0 else 0
    while n - n_val - n_test < 1 and n_val + n_test > 0:
        if n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n - n_val - n_test, n_val, n_test
