"""Typed, validated configuration of a probe grid (heads x layers x tasks x hyperparameters)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Union

DEVICES = ("cpu", "cuda", "auto")
TASK_TYPES = ("auto", "classification", "regression")
SELECTION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
PROTOTYPE_METRICS = ("cosine", "euclidean")


LINEAR_SOLVERS = ("lbfgs", "adam")


@dataclass(frozen=True)
class LinearHeadSpec:
    """Linear softmax (or least-squares) probe; one head per weight decay (x lr for Adam).

    weight_decays are L2 penalties lambda/2 * ||W||^2 on the mean training loss: scikit-learn's
    LogisticRegression C = 1 / (lambda * n_train), or 2 / (lambda * n_train) for two classes.
    solver "lbfgs" (default) fits every penalty to convergence (gradient below `tol`, at most
    `max_iter` iterations; lrs unused; regression in closed form); "adam" trains minibatch Adam
    with a cosine lr decay and early stopping on the validation loss, one head per lr x penalty.
    The default penalties span C from about 1e-3 to 1e4 on a thousand training rows.
    """

    kind: str = "linear"
    l2_normalize: bool = False
    solver: str = "lbfgs"
    weight_decays: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0)
    lrs: tuple[float, ...] = (1e-2, 1e-1)
    tol: float = 1e-4
    max_iter: int = 1000


@dataclass(frozen=True)
class MLPHeadSpec:
    """MLP probe: Linear -> [BatchNorm] -> ReLU -> Dropout per hidden size, then Linear.

    Trained with AdamW (decoupled weight decay) and a cosine lr decay, one head per lr x decay.
    """

    kind: str = "mlp"
    hidden_sizes: tuple[int, ...] = (512,)
    dropout: float = 0.1
    batch_norm: bool = True
    lrs: tuple[float, ...] = (1e-3,)
    weight_decays: tuple[float, ...] = (1e-2,)


@dataclass(frozen=True)
class PrototypeHeadSpec:
    """Nearest class mean; `learnable` fine-tunes the means (and a temperature) with `lr`."""

    kind: str = "prototype"
    metric: str = "cosine"
    learnable: bool = False
    lr: float = 1e-2


@dataclass(frozen=True)
class KNNHeadSpec:
    """k-nearest neighbours over the (standardised) training features; one head per k."""

    kind: str = "knn"
    ks: tuple[int, ...] = (1, 10, 20)
    cosine: bool = True


@dataclass(frozen=True)
class AutoHeadSpec:
    """Pick prototype / linear / MLP from the training samples per class (see heads.choose_head)."""

    kind: str = "auto"
    prototype_below: float = 10.0
    linear_below: float = 150.0


HeadSpec = Union[LinearHeadSpec, MLPHeadSpec, PrototypeHeadSpec, KNNHeadSpec, AutoHeadSpec]
HEAD_SPECS: dict[str, type] = {
    "linear": LinearHeadSpec,
    "mlp": MLPHeadSpec,
    "prototype": PrototypeHeadSpec,
    "knn": KNNHeadSpec,
    "auto": AutoHeadSpec,
}


@dataclass(frozen=True)
class TaskSpec:
    """A label column of the index; `type` auto = regression for non-integer float columns."""

    name: str
    type: str = "auto"


@dataclass(frozen=True)
class SplitSpec:
    """Train/val/test fractions of the generated split, a user split column, or a splits file.

    The generated split hashes each image id (seeded), so an image keeps its split when others are
    added. `column=None` uses a column named "split" when the index has one; an explicit name must
    exist. `file` is a splits.parquet written by an earlier run (any fsspec URI): it wins over both.
    """

    train: float = 0.7
    val: float = 0.15
    test: float = 0.15
    seed: int = 0
    stratified: bool = True
    column: str | None = None
    file: str | None = None


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probe grid needs; build it with `ProbeConfig.from_dict` to get validation.

    layers None = every layer of the table. few_shot: k training examples per class, each k a
    grid axis (None = all training data). batch_size is an upper bound: a small training set is
    cut into at least 10 minibatches an epoch. patience: epochs without a lower validation loss
    before a head stops (it keeps its lowest-loss state). selection_metric picks heads and
    layers on validation (regression tasks always use r2). device "auto" = cuda when present.
    """

    tasks: tuple[TaskSpec, ...]
    layers: tuple[str, ...] | None = None
    heads: tuple[HeadSpec, ...] = (LinearHeadSpec(),)
    split: SplitSpec = field(default_factory=SplitSpec)
    few_shot: tuple[int | None, ...] = (None,)
    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 1024
    patience: int = 10
    device: str = "auto"
    seed: int = 0
    selection_metric: str = "accuracy"

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeConfig":
        """Build from plain data (YAML); unknown keys, kinds or values raise ValueError."""
        d = _check_keys(dict(d), cls, "probes")
        if "tasks" not in d:
            raise ValueError("probes: 'tasks' is required (a list of label column names)")
        tasks = d["tasks"]
        if isinstance(tasks, (str, dict)):
            tasks = [tasks]
        d["tasks"] = tuple(_task(t) for t in tasks)
        if d.get("layers") is not None:
            layers = d["layers"]
            d["layers"] = (layers,) if isinstance(layers, str) else tuple(str(x) for x in layers)
        if "heads" in d:
            heads = d["heads"]
            if isinstance(heads, (str, dict)):
                heads = [heads]
            d["heads"] = tuple(_head(h, i) for i, h in enumerate(heads))
        if "split" in d:
            d["split"] = _build(SplitSpec, d["split"] or {}, "probes.split")
        if "few_shot" in d:
            fs = d["few_shot"]
            fs = [fs] if fs is None or isinstance(fs, int) else fs
            d["few_shot"] = tuple(None if k is None else int(k) for k in fs)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (round-trips through `from_dict`); saved next to the results."""
        return dataclasses.asdict(self)


def _validate(c: ProbeConfig) -> None:
    if not c.tasks:
        raise ValueError("probes.tasks is empty: name at least one label column")
    for t in c.tasks:
        if t.type not in TASK_TYPES:
            raise ValueError(f"task {t.name!r}: type {t.type!r} unknown; valid: {list(TASK_TYPES)}")
    if not c.heads:
        raise ValueError(f"probes.heads is empty; valid kinds: {list(HEAD_SPECS)}")
    for h in c.heads:
        _validate_head(h)
    s = c.split
    fr = (s.train, s.val, s.test)
    if any(f < 0 for f in fr) or s.train <= 0 or s.val <= 0 or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise ValueError(
            f"probes.split fractions train={s.train} val={s.val} test={s.test}: train and val must be > 0, "
            "test >= 0, and they must sum to 1 (e.g. 0.7/0.15/0.15)"
        )
    if s.column is not None and s.file is not None:
        raise ValueError(f"probes.split: column={s.column!r} and file={s.file!r} both set; a split comes from one "
                         "of them: keep the one you mean")
    if not c.few_shot:
        raise ValueError("probes.few_shot is empty: use [null] for 'all training data'")
    for k in c.few_shot:
        if k is not None and k < 1:
            raise ValueError(f"probes.few_shot: k={k} must be >= 1 (or null for all training data)")
    for name in ("epochs", "batch_size"):
        if getattr(c, name) < 1:
            raise ValueError(f"probes.{name} must be >= 1, got {getattr(c, name)}")
    if c.max_steps is not None and c.max_steps < 1:
        raise ValueError(f"probes.max_steps must be >= 1 or null, got {c.max_steps}")
    if c.patience < 1:
        raise ValueError(f"probes.patience must be >= 1 epoch, got {c.patience}")
    if c.device not in DEVICES:
        raise ValueError(f"probes.device {c.device!r} unknown; valid: {list(DEVICES)}")
    if c.selection_metric not in SELECTION_METRICS:
        raise ValueError(f"probes.selection_metric {c.selection_metric!r} unknown; valid: {list(SELECTION_METRICS)}")


def _validate_head(h: HeadSpec) -> None:
    where = f"head {h.kind!r}"
    if HEAD_SPECS.get(h.kind) is not type(h):
        raise ValueError(f"{where}: kind does not match {type(h).__name__}; valid kinds: {list(HEAD_SPECS)}")
    for name in ("lrs", "weight_decays"):
        vals = getattr(h, name, None)
        if vals is None:
            continue
        if not vals:
            raise ValueError(f"{where}: {name} is empty; give at least one value")
        if any(v < 0 or (name == "lrs" and v == 0) for v in vals):
            raise ValueError(f"{where}: {name}={list(vals)} must be positive (weight decay may be 0)")
    if isinstance(h, LinearHeadSpec):
        if h.solver not in LINEAR_SOLVERS:
            raise ValueError(f"{where}: solver {h.solver!r} unknown; valid: {list(LINEAR_SOLVERS)}")
        if not h.tol > 0 or h.max_iter < 1:
            raise ValueError(f"{where}: tol={h.tol} must be > 0 and max_iter={h.max_iter} >= 1")
    if isinstance(h, MLPHeadSpec):
        if not h.hidden_sizes or any(n < 1 for n in h.hidden_sizes):
            raise ValueError(f"{where}: hidden_sizes={list(h.hidden_sizes)} must be positive ints, e.g. [512]")
        if not 0.0 <= h.dropout < 1.0:
            raise ValueError(f"{where}: dropout={h.dropout} must be in [0, 1)")
    if isinstance(h, PrototypeHeadSpec):
        if h.metric not in PROTOTYPE_METRICS:
            raise ValueError(f"{where}: metric {h.metric!r} unknown; valid: {list(PROTOTYPE_METRICS)}")
        if h.lr <= 0:
            raise ValueError(f"{where}: lr={h.lr} must be positive")
    if isinstance(h, KNNHeadSpec) and (not h.ks or any(k < 1 for k in h.ks)):
        raise ValueError(f"{where}: ks={list(h.ks)} must be positive ints, e.g. [1, 10, 20]")
    if isinstance(h, AutoHeadSpec) and not 0 < h.prototype_below <= h.linear_below:
        raise ValueError(f"{where}: need 0 < prototype_below <= linear_below")


def _check_keys(d: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}")
    return d


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    d = _check_keys(dict(d), cls, where)
    for f in dataclasses.fields(cls):
        if f.name in d and isinstance(d[f.name], list):
            d[f.name] = tuple(d[f.name])
    return cls(**d)


def _head(h: Any, i: int) -> HeadSpec:
    if isinstance(h, str):
        h = {"kind": h}
    if not isinstance(h, dict) or "kind" not in h:
        raise ValueError(f"probes.heads[{i}]: expected a mapping with 'kind'; valid kinds: {list(HEAD_SPECS)}")
    if h["kind"] not in HEAD_SPECS:
        raise ValueError(f"probes.heads[{i}]: kind {h['kind']!r} unknown; valid kinds: {list(HEAD_SPECS)}")
    h = dict(h)
    for name, cast in (("lrs", float), ("weight_decays", float), ("ks", int), ("hidden_sizes", int)):
        if name in h:  # a scalar is a one-point grid
            vals = h[name] if isinstance(h[name], (list, tuple)) else [h[name]]
            h[name] = [cast(v) for v in vals]
    for name, cast in (("tol", float), ("lr", float), ("dropout", float), ("max_iter", int)):
        if name in h and isinstance(h[name], str):  # YAML reads 1e-5 (no dot) as a string
            try:
                h[name] = cast(h[name])
            except ValueError:
                raise ValueError(f"probes.heads[{i}]: {name}={h[name]!r} is not a number") from None
    return _build(HEAD_SPECS[h["kind"]], h, f"probes.heads[{i}] ({h['kind']})")


def _task(t: Any) -> TaskSpec:
    if isinstance(t, str):
        return TaskSpec(name=t)
    return _build(TaskSpec, t, "probes.tasks[]")
