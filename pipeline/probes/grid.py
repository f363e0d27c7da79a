"""Training of all heads of one (task, layer) group, selection on validation, test metrics for the selected heads.

For each few-shot k (each k has its own training rows and so its own standardisation statistics)
the group standardises the layer's features once with the training-row mean/std, trains every
head of the grid (candidates.py), selects on validation (best per head kind, and best overall;
first wins ties), then computes test metrics once, for the selected heads only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.probes import metrics as M
from pipeline.probes.adam import Fit, fit_module, train_linear_grid
from pipeline.probes.candidates import Candidate, GroupData, train_candidates
from pipeline.probes.config import ProbeConfig
from pipeline.probes.heads import fit_standardizer
from pipeline.probes.splits import TaskSplit

log = logging.getLogger(__name__)

__all__ = ["Fit", "GroupOutput", "SavedHead", "check_finite", "failure", "fit_module", "resolve_device",
           "train_group", "train_layer", "train_linear_grid"]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@dataclass
class SavedHead:
    """A selected head as plain data: tensors for safetensors and a JSON-able sidecar."""

    state: dict[str, np.ndarray]
    meta: dict[str, Any]


@dataclass
class GroupOutput:
    rows: list[dict[str, Any]]
    heads: list[SavedHead]


def check_finite(features: np.ndarray, rows: np.ndarray, image_ids: np.ndarray, layer: str) -> None:
    """Refuse NaN/inf features: they would silently poison every head of the group."""
    bad_rows = rows[~np.isfinite(features[rows]).all(axis=1)]
    if len(bad_rows):
        raise ValueError(f"layer {layer!r}: {len(bad_rows)} rows have NaN/inf features, e.g. image_id "
                         f"{list(image_ids[bad_rows[:3]])}; re-extract the layer or drop it from probes.layers")


def train_group(features: np.ndarray, split: TaskSplit, layer: str, config: ProbeConfig, *,
                bases: dict | None = None) -> GroupOutput:
    """All heads x hyperparameters x few-shot k of one (task, layer); raises on unusable input.

    `bases` caches the L-BFGS heads' eigen-basis by training rows, for tasks of the same layer that
    train on the same rows (train_layer passes one).
    """
    labelled = np.concatenate([split.rows[s] for s in ("train", "val", "test")])
    check_finite(features, labelled, split.image_ids, layer)
    device = resolve_device(config.device)
    metric = "r2" if split.task_type == "regression" else config.selection_metric
    fit = Fit(config.epochs, config.max_steps, config.batch_size, config.patience, config.seed, metric)
    out = GroupOutput([], [])
    for k in config.few_shot:
        rows, saved = _train_subset(features, split, layer, k, config, fit, device, {} if bases is None else bases)
        out.rows += rows
        out.heads += saved
    return out


def train_layer(features: np.ndarray, splits: dict[str, TaskSplit], layer: str, config: ProbeConfig
                ) -> dict[str, GroupOutput]:
    """train_group for every task of one layer (one fan-out unit): a task's failure is its result, not a crash."""
    bases: dict = {}
    out = {}
    for task, split in splits.items():
        try:
            out[task] = train_group(features, split, layer, config, bases=bases)
        except Exception as e:  # noqa: BLE001 - a group's failure is a result, not a crash
            log.exception("probe group task=%r layer=%r failed", task, layer)
            out[task] = failure(task, layer, split, e)
    return out


def failure(task: str, layer: str, split: TaskSplit, err: BaseException) -> GroupOutput:
    """The one row a failed (task, layer) group leaves in the results."""
    return GroupOutput([{"task": task, "task_type": split.task_type, "layer": layer, "status": "failed",
                         "error": f"{type(err).__name__}: {err}", "n_missing": split.n_missing}], [])


def _tensors(features, split, train_rows, device):
    """Standardised x and targets of train/val/test, plus the statistics."""
    x = {s: torch.from_numpy(np.asarray(features[r], dtype=np.float32)).to(device)
         for s, r in (("train", train_rows), ("val", split.rows["val"]), ("test", split.rows["test"]))}
    mean, std = fit_standardizer(x["train"])
    z = {s: (v - mean) / std for s, v in x.items()}
    t = {s: split.targets[r] for s, r in (("train", train_rows), ("val", split.rows["val"]),
                                          ("test", split.rows["test"]))}
    if split.task_type == "regression":
        t_mean, t_std = float(t["train"].mean()), float(t["train"].std() or 1.0)
        y = {s: torch.tensor((v - t_mean) / t_std, dtype=torch.float32, device=device) for s, v in t.items()}
    else:
        t_mean, t_std = 0.0, 1.0
        y = {s: torch.tensor(v, dtype=torch.long, device=device) for s, v in t.items()}
    return z, y, t, (mean, std, t_mean, t_std)


def _train_subset(features, split, layer, k, config, fit, device, bases) -> tuple[list[dict], list[SavedHead]]:
    train_rows = split.few_shot(k, config.split.seed)
    z, y, t, stats = _tensors(features, split, train_rows, device)
    regression = split.task_type == "regression"
    n_out = 1 if regression else split.n_classes
    make = lambda head: head.set_standardization(stats[0], stats[1], target_mean=stats[2],  # noqa: E731
                                                 target_std=stats[3]).to(device)
    key = "r2" if regression else config.selection_metric
    val_metric = (lambda p: M.regression_metrics(t["val"], p)) if regression else (
        lambda p: M.classification_metrics(t["val"], p))
    val_score = None if regression else (lambda p: val_metric(p)[key])
    data = GroupData(z, y, n_out, regression, make, bases, train_rows.tobytes(), val_score)
    with torch.random.fork_rng(devices=[]):  # MLP init / dropout draw from the global RNG
        torch.manual_seed(config.seed)
        cands, skipped = train_candidates(data, config, fit, split.n_classes)
    vals = [val_metric(c.val_pred) for c in cands]
    best = _select(cands, vals, key)
    base = {"task": split.task, "task_type": split.task_type, "layer": layer, "few_shot": k,
            "n_classes": split.n_classes, "n_train": len(train_rows), "n_val": len(split.rows["val"]),
            "n_test": len(split.rows["test"]), "n_missing": split.n_missing, "selection_metric": key}
    rows, saved = [], []
    for i, (c, v) in enumerate(zip(cands, vals)):
        row = dict(base, head=c.kind, requested=c.requested, hparams=json.dumps(c.hparams, sort_keys=True),
                   val_score=v[key], best_epoch=c.best_epoch, steps=c.steps, converged=c.converged,
                   batch_heads=c.batch_heads,
                   selected=i == best[None], selected_in_kind=i == best[c.kind], auto_reason=c.auto_reason,
                   train_time_s=c.train_time_s, status="ok", error=None)
        row.update({f"val_{m}": x for m, x in v.items()})
        if row["selected_in_kind"] and len(split.rows["test"]):
            pred = c.head.predict_standardized(z["test"]).cpu().numpy()
            row.update(_test_metrics(t["test"], pred, split))
        if row["selected"]:
            saved.append(_saved(c, split, layer, k, config))
        rows.append(row)
    for kind, reason in skipped:
        rows.append(dict(base, head=kind, requested=kind, status="skipped", error=reason))
    return rows, saved


def _select(cands: list[Candidate], vals: list[dict], key: str) -> dict:
    """Index of the best candidate overall (key None) and per kind, by validation `key` (first wins ties)."""
    best: dict = {}
    for i, (c, v) in enumerate(zip(cands, vals)):
        score = -math.inf if math.isnan(v[key]) else v[key]
        for group in (None, c.kind):
            if group not in best or score > best[group][1]:
                best[group] = (i, score)
    return {g: i for g, (i, _) in best.items()}


def _test_metrics(y_true, pred, split) -> dict[str, Any]:
    if split.task_type == "regression":
        return {f"test_{m}": x for m, x in M.regression_metrics(y_true, pred).items()}
    row = {f"test_{m}": x for m, x in M.classification_metrics(y_true, pred).items()}
    per_class = M.per_class_accuracy(np.asarray(split.classes, dtype=object)[y_true],
                                     np.asarray(split.classes, dtype=object)[pred])
    row["test_per_class_accuracy"] = json.dumps({str(c): a for c, a in per_class.items()})
    return row


def _saved(c: Candidate, split: TaskSplit, layer: str, k: int | None, config: ProbeConfig) -> SavedHead:
    state = {name: t.detach().cpu().contiguous().numpy() for name, t in c.head.state_dict().items()}
    meta = {"task": split.task, "task_type": split.task_type, "layer": layer, "few_shot": k, "kind": c.kind,
            "requested": c.requested, "auto_reason": c.auto_reason, "hparams": c.hparams,
            "spec": dataclasses.asdict(c.spec), "classes": list(split.classes), "dim": c.head.dim,
            "n_out": c.head.n_out, "standardization": {"mean": state["mean"].tolist(), "std": state["std"].tolist(),
                                                       "target_mean": float(state["target_mean"]),
                                                       "target_std": float(state["target_std"])},
            "selection_metric": "r2" if split.task_type == "regression" else config.selection_metric}
    return SavedHead(state, meta)
