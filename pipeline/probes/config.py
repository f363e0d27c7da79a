"""Typed, validated configuration of a probe grid (heads x layers x tasks x hyperparameters)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Union

from ..schema import ConfigError, KeyDoc, build, coerce_field, keys, render_keys, section, setting

DEVICES = ("cpu", "cuda", "auto")
TASK_TYPES = ("auto", "classification", "regression")
SELECTION_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")
PROTOTYPE_METRICS = ("cosine", "euclidean")


LINEAR_SOLVERS = ("lbfgs", "adam")


class MissingTasks(ConfigError):
    """No probes.tasks: the CLI, which knows the store, adds its label columns to the message."""


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

    kind: str = setting("linear", "head kind")
    l2_normalize: bool = setting(False, "L2-normalise features before the head")
    solver: str = setting("lbfgs", "lbfgs: every penalty fitted to convergence; adam: minibatch Adam, cosine decay",
                          choices=LINEAR_SOLVERS)
    weight_decays: tuple[float, ...] = setting((1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 1.0),
                                               "L2 penalties; one head each")
    lrs: tuple[float, ...] = setting((1e-2, 1e-1), "learning rates (solver adam only); one head each")
    tol: float = setting(1e-4, "lbfgs: stop when the gradient's max-norm is below this (scikit-learn's tol)")
    max_iter: int = setting(1000, "lbfgs: at most this many iterations per head")
    polish_tol: float | None = setting(1e-6, "lbfgs: the head ranked first on validation is refitted to this "
                                             "tolerance, again until the first is a refitted one; null: off")


@dataclass(frozen=True)
class MLPHeadSpec:
    """MLP probe: Linear -> [BatchNorm] -> ReLU -> Dropout per hidden size, then Linear.

    Trained with AdamW (decoupled weight decay) and a cosine lr decay, one head per lr x decay.
    """

    kind: str = setting("mlp", "head kind")
    hidden_sizes: tuple[int, ...] = setting((512,), "hidden layer widths")
    dropout: float = setting(0.1, "dropout after each hidden layer, in [0, 1)")
    batch_norm: bool = setting(True, "BatchNorm after each hidden Linear")
    lrs: tuple[float, ...] = setting((1e-3,), "learning rates (AdamW, cosine decay); one head each")
    weight_decays: tuple[float, ...] = setting((1e-2,), "decoupled weight decays; one head each")


@dataclass(frozen=True)
class PrototypeHeadSpec:
    """Nearest class mean; `learnable` fine-tunes the means (and a temperature) with `lr`."""

    kind: str = setting("prototype", "head kind")
    metric: str = setting("cosine", "distance to the class means", choices=PROTOTYPE_METRICS)
    learnable: bool = setting(False, "fine-tune the means and a temperature")
    lr: float = setting(1e-2, "learning rate when learnable")


@dataclass(frozen=True)
class KNNHeadSpec:
    """k-nearest neighbours over the (standardised) training features; one head per k."""

    kind: str = setting("knn", "head kind")
    ks: tuple[int, ...] = setting((1, 10, 20), "neighbour counts; one head each")
    cosine: bool = setting(True, "cosine similarity instead of Euclidean distance")


@dataclass(frozen=True)
class AutoHeadSpec:
    """Pick prototype / linear / MLP from the training samples per class (see heads.choose_head)."""

    kind: str = setting("auto", "head kind")
    prototype_below: float = setting(10.0, "prototype head below this many training samples per class")
    linear_below: float = setting(150.0, "linear head below this many (MLP above)")


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

    name: str = setting(help="label column of the store's index")
    type: str = setting("auto", "task type; auto: regression for non-integer float columns", choices=TASK_TYPES)


@dataclass(frozen=True)
class SplitSpec:
    """Train/val/test fractions of the generated split, a user split column, or a splits file.

    The generated split hashes each image id (seeded), so an image keeps its split when others are
    added. `column=None` uses a column named "split" when the index has one; an explicit name must
    exist. `file` is a splits.parquet written by an earlier run (any fsspec URI): it wins over both.
    """

    train: float = setting(0.7, "training fraction of the generated split")
    val: float = setting(0.15, "validation fraction (selects heads and layers)")
    test: float = setting(0.15, "test fraction (reported once)")
    seed: int = setting(0, "seed of the generated split (a hash of each image id)")
    stratified: bool = setting(True, "keep class proportions in each split")
    column: str | None = setting(None, "user split column; null: a column named split when the index has one")
    file: str | None = setting(None, "splits.parquet of an earlier run (any fsspec URI); wins over the others")


@dataclass(frozen=True)
class ProbeConfig:
    """Everything a probe grid needs; build it with `ProbeConfig.from_dict` to get validation.

    layers None = every layer of the table. few_shot: k training examples per class, each k a
    grid axis (None = all training data). batch_size is an upper bound: a small training set is
    cut into at least 10 minibatches an epoch. patience: epochs without a lower validation loss
    before a head stops (it keeps its lowest-loss state). selection_metric picks heads and
    layers on validation (regression tasks always use r2). device "auto" = cuda when present.
    """

    tasks: tuple[TaskSpec, ...] = setting(help="label columns to probe: names, or {name, type} mappings")
    layers: tuple[str, ...] | None = setting(None, "layers to probe; null: every layer of the store")
    heads: tuple[HeadSpec, ...] = setting((LinearHeadSpec(),), "head kinds: names, or mappings with kind",
                                          shown="[linear]")
    split: SplitSpec = section(SplitSpec, "train/val/test split")
    few_shot: tuple[int | None, ...] = setting((None,), "training examples per class, one grid axis each; null: all")
    epochs: int = setting(100, "training epochs per head")
    max_steps: int | None = setting(None, "cap on optimizer steps per head; null: no cap")
    batch_size: int = setting(1024, "minibatch upper bound (a small training set gets >= 10 per epoch)")
    patience: int = setting(10, "epochs without a lower validation loss before a head stops")
    device: str = setting("auto", "torch device; auto: cuda when present", choices=DEVICES)
    seed: int = setting(0, "seed of head initialisation and minibatch order")
    selection_metric: str = setting("accuracy", "picks heads and layers on validation (regression: r2)",
                                    choices=SELECTION_METRICS)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeConfig":
        """Build from plain data (YAML); unknown keys, kinds or misfit values raise ConfigError (a ValueError)."""
        if not isinstance(d, dict):
            raise ConfigError(f"probes: expected a mapping of probe settings, got {type(d).__name__}")
        d = _check_keys(dict(d), cls, "probes")
        if "tasks" not in d:
            raise MissingTasks("probes: 'tasks' is required (a list of label column names)")
        tasks = d["tasks"]
        if isinstance(tasks, (str, dict)):
            tasks = [tasks]
        if not isinstance(tasks, (list, tuple)):
            raise ConfigError(f"probes.tasks: expected a list of label column names, got {tasks!r}")
        d["tasks"] = tuple(_task(t) for t in tasks)
        if "heads" in d:
            heads = d["heads"]
            if isinstance(heads, (str, dict)):
                heads = [heads]
            if not isinstance(heads, (list, tuple)):
                raise ConfigError(f"probes.heads: expected a list of head kinds, got {heads!r}; "
                                  f"valid kinds: {list(HEAD_SPECS)}")
            d["heads"] = tuple(_head(h, i) for i, h in enumerate(heads))
        if "few_shot" in d and d["few_shot"] is None:
            d["few_shot"] = [None]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in set(d) - {"tasks", "heads"}:
            d[name] = coerce_field(fields[name], hints[name], d[name], where=f"probes.{name}")
        try:
            return cls(**d)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (round-trips through `from_dict`); saved next to the results."""
        return dataclasses.asdict(self)


def _refuse_duplicates(values, where: str) -> None:
    """A grid axis lists each value once: a repeated value would train (and select) the same heads twice."""
    seen: list = []
    for v in values:
        if v in seen:
            show = lambda x: "null" if x is None else repr(x)  # noqa: E731 - as written in YAML
            raise ValueError(f"{where} lists {show(v)} twice ([{', '.join(map(show, values))}]); give each value "
                             "once")
        seen.append(v)


def _validate(c: ProbeConfig) -> None:
    if not c.tasks:
        raise ValueError("probes.tasks is empty: name at least one label column")
    _refuse_duplicates([t.name for t in c.tasks], "probes.tasks")
    if c.layers is not None:
        if not c.layers:
            raise ValueError("probes.layers is empty: name at least one layer, or null for every layer of the store")
        _refuse_duplicates(c.layers, "probes.layers")
    for t in c.tasks:
        if t.type not in TASK_TYPES:
            raise ValueError(f"task {t.name!r}: type {t.type!r} unknown; valid: {list(TASK_TYPES)}")
    if not c.heads:
        raise ValueError(f"probes.heads is empty; valid kinds: {list(HEAD_SPECS)}")
    for h in c.heads:
        _validate_head(h)
    for i, h in enumerate(c.heads):
        if h in c.heads[:i]:
            raise ValueError(f"probes.heads lists head {h.kind!r} twice with the same settings; give each head once "
                             "(two heads of one kind must differ in a setting)")
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
    _refuse_duplicates(c.few_shot, "probes.few_shot")
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
        _refuse_duplicates(vals, f"{where}: {name}")
    if isinstance(h, LinearHeadSpec):
        if h.solver not in LINEAR_SOLVERS:
            raise ValueError(f"{where}: solver {h.solver!r} unknown; valid: {list(LINEAR_SOLVERS)}")
        if not h.tol > 0 or h.max_iter < 1:
            raise ValueError(f"{where}: tol={h.tol} must be > 0 and max_iter={h.max_iter} >= 1")
        if h.polish_tol is not None and not h.polish_tol > 0:
            raise ValueError(f"{where}: polish_tol={h.polish_tol} must be > 0, or null to select on `tol` fits")
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
    if isinstance(h, KNNHeadSpec):
        if not h.ks or any(k < 1 for k in h.ks):
            raise ValueError(f"{where}: ks={list(h.ks)} must be positive ints, e.g. [1, 10, 20]")
        _refuse_duplicates(h.ks, f"{where}: ks")
    if isinstance(h, AutoHeadSpec) and not 0 < h.prototype_below <= h.linear_below:
        raise ValueError(f"{where}: need 0 < prototype_below <= linear_below")


def _check_keys(d: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        hint = ""
        if where == "probes" and "probes" in unknown:  # a `probes:` section inside another one
            hint = "; probe settings sit at the top level of the file or under one 'probes:' section, not two"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {valid}{hint}")
    return d


def _build(cls: type, d: Any, where: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    return build(cls, _check_keys(dict(d), cls, where), where=where)


def _head(h: Any, i: int) -> HeadSpec:
    if isinstance(h, str):
        h = {"kind": h}
    if not isinstance(h, dict) or "kind" not in h:
        raise ConfigError(f"probes.heads[{i}]: expected a mapping with 'kind'; valid kinds: {list(HEAD_SPECS)}")
    if h["kind"] not in HEAD_SPECS:
        raise ConfigError(f"probes.heads[{i}]: kind {h['kind']!r} unknown; valid kinds: {list(HEAD_SPECS)}")
    return _build(HEAD_SPECS[h["kind"]], h, f"probes.heads[{i}] ({h['kind']})")


def _task(t: Any) -> TaskSpec:
    if isinstance(t, str):
        return TaskSpec(name=t)
    return _build(TaskSpec, t, "probes.tasks[]")


def key_docs() -> list[KeyDoc]:
    """Every probe key: top level, split.*, tasks[].* and heads[<kind>].* per head kind."""
    docs = []
    for doc in keys(ProbeConfig):
        docs.append(doc)
        if doc.key == "tasks":
            docs += keys(TaskSpec, "tasks[].")
        elif doc.key == "heads":
            docs.append(KeyDoc("heads[].kind", "str", "linear", "head kind; its keys follow", tuple(HEAD_SPECS)))
            for kind, spec in HEAD_SPECS.items():
                docs += [d for d in keys(spec, f"heads[{kind}].") if not d.key.endswith(".kind")]
    return docs


def help_text() -> str:
    """Every probe key with its type, default and meaning, for `strata probe --help`."""
    return render_keys("probe keys (YAML, top level or under probes:, or key=value on the command line):",
                       key_docs())
