"""Seeded, row-order-independent train/val/test assignment per task, and few-shot subsets of train."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from pipeline.labels import missing_labels, unknown_task_message
from pipeline.probes.config import SplitSpec, TaskSpec
from pipeline.probes.split_table import SPLIT_ALIASES as _ALIASES
from pipeline.probes.split_table import split_from_table
from pipeline.stores.label_types import class_name

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


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
    given_few_shot: dict[int, np.ndarray] = field(default_factory=dict)
    class_names: tuple[str, ...] | None = None  # a ClassLabel's names, which its integer labels index

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def describe(self, codes) -> list:
        """Classes (by code) as a user knows them: ``"cat (3)"`` where the integer label has a name."""
        out = []
        for c in codes:
            value = self.classes[c]
            name = class_name(self.class_names, value)
            out.append(value if name is None else f"{name} ({int(value)})")  # a widened column's 3.0 is class 3
        return out

    def few_shot(self, k: int | None, seed: int) -> np.ndarray:
        """k training rows per class (k rows in all for regression), seeded; None = all of train.

        The order is a seeded hash of image_id, so a smaller k is a subset of a larger k. A subset
        read from a splits file, or drawn already (`given_few_shot`, see `with_few_shot`), is used as it is.
        """
        train = self.rows["train"]
        if k is None:
            return train
        if k in self.given_few_shot:
            return self.given_few_shot[k]
        order = train[_hash_order(self.image_ids[train], seed)]
        if self.task_type == "regression":
            return np.sort(order[:k])
        codes = self.targets[order]
        picked = [order[codes == c][:k] for c in range(self.n_classes)]
        short = [c for c, p in enumerate(picked) if len(p) < k]
        if short:
            log.warning("task %r: few-shot k=%d, but classes %s have fewer training rows; using all of theirs",
                        self.task, k, self.describe(short[:10]))
        return np.sort(np.concatenate(picked))


def with_few_shot(s: TaskSplit, ks: Sequence[int | None], seed: int) -> TaskSplit:
    """The split with its few-shot training subsets drawn once, here (with their warnings), so that every
    layer's group, wherever it runs, reuses them instead of drawing (and warning) again."""
    drawn = {k: s.few_shot(k, seed) for k in dict.fromkeys(ks) if k is not None and k not in s.given_few_shot}
    return replace(s, given_few_shot={**s.given_few_shot, **drawn}) if drawn else s


def infer_task_type(labels: pd.Series) -> str:
    """Regression for float columns with non-integer values, else classification."""
    if pd.api.types.is_float_dtype(labels.dtype):
        vals = labels.dropna().to_numpy(dtype=np.float64)
        if len(vals) and not np.all(np.equal(np.mod(vals, 1), 0)):
            return "regression"
    return "classification"


def assign_splits(image_ids: np.ndarray, strata: np.ndarray | None, *, fractions: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """'train'/'val'/'test' per row from a seeded hash of each image_id alone.

    u = hash(seed, image_id) in [0, 1) falls into [0, train), [train, train + val) or the rest, so an
    image keeps its split whatever other images are added or removed (a refresh, a relabelled
    subset). Stratification is therefore statistical: within any class the split shares are binomial
    around the fractions (a class of n rows deviates by about sqrt(f (1 - f) / n), e.g. +-2.8 points
    for the 20% test share of a 200-row class). With `strata`, each stratum is then given a train row,
    and a val and a test row when it has enough rows, by moving its rows whose hash lies nearest that
    split's interval: only small strata ever need this, and only their moved rows depend on the set.
    """
    u = hash_unit(np.asarray(image_ids, dtype=object), seed)
    f_train, f_val, f_test = fractions
    out = np.where(u < f_train, "train", np.where(u < f_train + f_val, "val", "test")).astype(object)
    if f_test <= 0:
        out[out == "test"] = "val"
    if strata is not None:
        _repair_strata(out, u, np.asarray(strata), fractions)
    return out


def _seeded_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id: the same for an id whatever else is in the set."""
    key = hashlib.blake2b(str(seed).encode(), digest_size=8).hexdigest()
    return pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key, categorize=False)


def hash_unit(ids: np.ndarray, seed: int) -> np.ndarray:
    """The seeded hash of each id as a float in [0, 1)."""
    return (_seeded_hash(ids, seed) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _repair_strata(out: np.ndarray, u: np.ndarray, strata: np.ndarray, fractions: tuple[float, float, float]) -> None:
    """Give each stratum a train row, then a val row and a test row (those of a share above 0) while it has
    rows to spare."""
    f_train, f_val, f_test = fractions
    centre = {"train": f_train / 2, "val": f_train + f_val / 2, "test": f_train + f_val + f_test / 2}
    wanted = ["train", *(s for s, f in (("val", f_val), ("test", f_test)) if f > 0)]
    for g in np.unique(strata):
        members = np.flatnonzero(strata == g)
        needed = wanted[:len(members)]
        for name in needed:
            have = out[members]
            if (have == name).any():
                continue
            counts = {s: int((have == s).sum()) for s in ("train", "val", "test")}
            donors = members[[counts[s] > 1 or s not in needed for s in have]]
            if len(donors):
                out[donors[np.argmin(np.abs(u[donors] - centre[name]))]] = name


def split_task(index: pd.DataFrame, task: TaskSpec | str, spec: SplitSpec, *,
               given: pd.DataFrame | None = None) -> TaskSplit:
    """Labels, missing-label count and train/val/test rows of one task; refuses unusable tasks.

    The split comes from `given` (a splits table, see split_table.read_splits) when passed, else from
    the index's split column, else it is generated from hashes of the image ids.
    """
    task = TaskSpec(task) if isinstance(task, str) else task
    name = task.name
    if name not in index.columns:
        raise ValueError(unknown_task_message(name, list(index.columns)))
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
        targets, classes = _encode(labels, labelled, name, index.attrs.get("class_names", {}).get(name))
        strata = targets[labelled] if spec.stratified else None

    given_few_shot: dict[int, np.ndarray] = {}
    if given is not None:
        split, n_unsplit, source, given_few_shot = split_from_table(given, name, ids, labelled)
    else:
        split, n_unsplit, source = _split_column(index, spec, labelled)
    if split is None:
        fractions = (spec.train, spec.val, spec.test)
        split = np.empty(len(index), dtype=object)
        split[labelled] = assign_splits(ids[labelled], strata, fractions=fractions, seed=spec.seed)
    elif given is None and (split[labelled] == "train").any():
        lacking = [s for s in ("val", "test") if not (split[labelled] == s).any() and getattr(spec, s) > 0]
        if lacking:
            source += _carve(split, labelled, ids, targets if strata is not None else None, spec, name, lacking)
    rows = {s: labelled[split[labelled] == s] for s in SPLITS}
    names = index.attrs.get("class_names", {}).get(name) if task_type == "classification" else None
    out = TaskSplit(task=name, task_type=task_type, classes=classes, targets=targets, rows=rows, image_ids=ids,
                    n_missing=int(missing.sum()), n_unsplit=n_unsplit, source=source, given_few_shot=given_few_shot,
                    class_names=tuple(names) if names else None)
    _check_sizes(out, spec)
    if source != "generated" and not len(rows["test"]) and spec.test > 0:
        log.warning("task %r: the split (%s) has no test rows, so no test figure is computed: heads are selected "
                    "and reported on validation; give the split column or file test rows", name, source)
    return out


def _encode(labels: pd.Series, labelled: np.ndarray, name: str,
            names: Sequence[str] | None = None) -> tuple[np.ndarray, tuple]:
    values = labels.iloc[labelled]
    try:
        codes, uniques = pd.factorize(values, sort=True)
    except TypeError:  # mixed types cannot be sorted together: sort by text
        codes, uniques = pd.factorize(values.astype(str), sort=True)
    classes = tuple(u.item() if hasattr(u, "item") else u for u in uniques)
    if len(classes) < 2:
        named = class_name(names, classes[0]) if classes else None
        only = "none" if not classes else repr(classes[0]) if named is None else f"{named!r} ({int(classes[0])})"
        raise ValueError(f"task {name!r} has a single class {only} in {len(labelled)} labelled rows; a probe "
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


def _carve(split: np.ndarray, labelled: np.ndarray, ids: np.ndarray, targets: np.ndarray | None,
           spec: SplitSpec, task: str, lacking: Sequence[str]) -> str:
    """A user split without val (most published datasets: train + test) or without test (Hub exports of train
    + validation, or train alone): the missing splits come out of train, by the same id hash as a generated
    split, in their probes.split shares; the rows the source put in val or test stay there."""
    train = labelled[split[labelled] == "train"]
    parts = {"train": spec.train, **{s: getattr(spec, s) for s in lacking}}
    total = sum(parts.values())
    split[train] = assign_splits(ids[train], None if targets is None else targets[train],
                                 fractions=tuple(parts.get(s, 0.0) / total for s in SPLITS), seed=spec.seed)
    log.info("task %r: the split column has no %s rows; of its %d train rows, %s (probes.split shares)", task,
             " or ".join(lacking), len(train),
             ", ".join(f"{int((split[train] == s).sum())} become {s}" for s in lacking))
    return "+" + "+".join(lacking) + "-from-train"


def _check_sizes(s: TaskSplit, spec: SplitSpec) -> None:
    user = not s.source == "generated"
    has_test = len(s.rows["test"]) > 0 if user else spec.test > 0
    needed = ("train", "val", "test") if has_test else ("train", "val")
    for name in needed:
        n = len(s.rows[name])
        fix = (f"add rows with {name!r} to the split {'file' if s.source.startswith('file') else 'column'}" if user
               else f"raise probes.split.{name} (now {getattr(spec, name)}), add labelled data")
        if s.task_type == "regression":
            if n < 2:
                raise ValueError(f"task {s.task!r}: the {name} split has {n} rows; at least 2 are needed: {fix}")
        elif n < s.n_classes:
            raise ValueError(f"task {s.task!r}: the {name} split has {n} labelled rows but there are {s.n_classes} "
                             f"classes; a split needs at least as many rows as classes: {fix}, or merge rare classes")
    if s.task_type == "classification":
        absent = sorted(set(range(s.n_classes)) - set(s.targets[s.rows["train"]].tolist()))
        if absent:
            raise ValueError(f"task {s.task!r}: classes {s.describe(absent[:10])} have no training rows: add "
                             "training examples of them or drop those labels")
        _warn_thin_classes(s, needed)


def _warn_thin_classes(s: TaskSplit, splits: tuple[str, ...]) -> None:
    """Warn (not refuse: a class of one image cannot be in every split) about classes a split has no row of,
    and about classes with a single labelled image."""
    for name in splits:
        absent = sorted(set(range(s.n_classes)) - set(s.targets[s.rows[name]].tolist()))
        if absent:
            log.warning("task %r: the %s split (%s) has no row of %d of the %d classes, e.g. %s; its %s metrics say "
                        "nothing about them", s.task, name, s.source, len(absent), s.n_classes,
                        s.describe(absent[:5]), "selection" if name == "val" else name)
    for k, rows in sorted(s.given_few_shot.items()):
        absent = sorted(set(range(s.n_classes)) - set(s.targets[rows].tolist()))
        if absent:
            log.warning("task %r: the few-shot k=%d training subset (%s) has no row of %d of the %d classes, e.g. %s",
                        s.task, k, s.source, len(absent), s.n_classes, s.describe(absent[:5]))
    counts = np.bincount(s.targets[s.targets >= 0], minlength=s.n_classes)
    single = np.flatnonzero(counts == 1)
    if len(single):
        log.warning("task %r: %d classes have a single labelled image, e.g. %s; such a class is in one split "
                    "only", s.task, len(single), s.describe(single[:5]))


def _hash_order(ids: np.ndarray, seed: int) -> np.ndarray:
    """Permutation ordering `ids` by a seeded hash (ties by id): the same for any row order."""
    return np.lexsort((np.asarray(ids, dtype=str), _seeded_hash(ids, seed)))
