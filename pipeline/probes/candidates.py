"""Every head of one (task, layer, few-shot k) group, trained and predicting on validation, before selection.

Linear heads of the L-BFGS solver are fitted to convergence together (lbfgs.py), those of the Adam
solver as one batched minibatch computation (adam.py); MLP and learnable prototype heads train one
by one; fixed prototypes are class means; all kNN k values come from one top-k search. Within a
linear spec the heads are listed from the strongest penalty to the weakest, so that selection
("first wins ties") prefers the more regularised of two heads with equal validation scores, like
scikit-learn's LogisticRegressionCV over ascending Cs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from pipeline.probes.adam import Fit, fit_module, train_linear_grid
from pipeline.probes.config import (AutoHeadSpec, HeadSpec, KNNHeadSpec, LinearHeadSpec, MLPHeadSpec, ProbeConfig,
                                    PrototypeHeadSpec)
from pipeline.probes.heads import KNNProbe, LinearProbe, MLPProbe, ProbeHead, PrototypeProbe, choose_head
from pipeline.probes.lbfgs import LinearFit, SolverSettings, fit_logistic_grid, fit_ridge_grid, row_basis
from pipeline.probes.splits import TaskSplit

log = logging.getLogger(__name__)

POLISH_BATCH = 3  # heads refitted together per round: one batch costs about what one head does on narrow layers
POLISH_SKIP_REL = 1e-2  # a head provably within 1% (relative) of its optimal weights is not refitted
_DEFAULT_SPECS = {"linear": LinearHeadSpec(), "mlp": MLPHeadSpec(), "prototype": PrototypeHeadSpec()}


@dataclass
class Candidate:
    """One trained head of a group, before and after selection."""

    kind: str
    requested: str
    hparams: dict[str, Any]
    spec: HeadSpec
    head: ProbeHead
    val_pred: Any
    train_time_s: float
    best_epoch: int | None = None
    steps: int | None = None
    batch_heads: int = 1
    auto_reason: str | None = None
    converged: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupData:
    """Standardised inputs and targets of one group: z/y keyed by "train"/"val"/"test"."""

    z: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    n_out: int
    regression: bool
    make: Callable[[ProbeHead], ProbeHead]  # sets the group's standardisation on a new head
    bases: dict = field(default_factory=dict)  # L-BFGS eigen-bases by training rows, shared by a layer's tasks
    rows_key: bytes = b""  # the training rows, as a key of `bases`
    val_score: Callable[[Any], float] | None = None  # the selection metric of validation predictions


def train_candidates(data: GroupData, config: ProbeConfig, fit: Fit, n_classes: int
                     ) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """(trained candidates, (kind, reason) of the heads skipped) for the group's heads."""
    z, y, regression = data.z, data.y, data.regression
    per_class = len(y["train"]) / max(n_classes, 1)
    specs: list[tuple[HeadSpec, str, str | None]] = []  # (spec, requested, auto reason)
    skipped = []
    for spec in config.heads:
        if isinstance(spec, AutoHeadSpec):
            kind, why = ("linear", "regression task: linear head") if regression else choose_head(
                per_class, prototype_below=spec.prototype_below, linear_below=spec.linear_below)
            specs.append((_DEFAULT_SPECS[kind], "auto", why))
        elif regression and isinstance(spec, PrototypeHeadSpec):
            skipped.append(("prototype", "prototype heads need classes; not run for a regression task"))
        else:
            specs.append((spec, spec.kind, None))
    linear = [s for s in specs if isinstance(s[0], LinearHeadSpec)]
    cands = _lbfgs_candidates([s for s in linear if s[0].solver == "lbfgs"], data)
    cands += _adam_candidates([s for s in linear if s[0].solver == "adam"], data, fit)
    for spec, requested, why in specs:
        t0 = time.perf_counter()
        if isinstance(spec, MLPHeadSpec):
            for lr in spec.lrs:
                for wd in spec.weight_decays:
                    t0 = time.perf_counter()
                    torch.manual_seed(config.seed)  # the same init for the same spec, whatever the order
                    head = data.make(MLPProbe(z["train"].shape[1], data.n_out, hidden_sizes=spec.hidden_sizes,
                                              dropout=spec.dropout, batch_norm=spec.batch_norm,
                                              regression=regression))
                    info = fit_module(head, z["train"], y["train"], z["val"], y["val"], lr=lr, weight_decay=wd,
                                      fit=fit)
                    cands.append(_cand("mlp", requested, {"lr": lr, "weight_decay": wd}, spec, head, z, t0, why,
                                       best_epoch=info["best_epoch"], steps=info["steps"]))
        elif isinstance(spec, PrototypeHeadSpec):
            torch.manual_seed(config.seed)
            head = data.make(PrototypeProbe(z["train"].shape[1], data.n_out, metric=spec.metric,
                                            learnable=spec.learnable))
            head.set_class_means(z["train"], y["train"])
            info = {}
            if spec.learnable:
                info = fit_module(head, z["train"], y["train"], z["val"], y["val"], lr=spec.lr, weight_decay=0.0,
                                  fit=fit)
            hp = {"metric": spec.metric, "learnable": spec.learnable} | ({"lr": spec.lr} if spec.learnable else {})
            cands.append(_cand("prototype", requested, hp, spec, head, z, t0, why,
                               best_epoch=info.get("best_epoch"), steps=info.get("steps")))
        elif isinstance(spec, KNNHeadSpec):
            cands += _knn_candidates(spec, requested, why, data)
    return cands, skipped


def _cand(kind, requested, hparams, spec, head, z, t0, why, **kw) -> Candidate:
    val_pred = head.predict_standardized(z["val"]).cpu().numpy()
    return Candidate(kind, requested, hparams, spec, head, val_pred, time.perf_counter() - t0, auto_reason=why, **kw)


def _linear_head(data: GroupData, spec: LinearHeadSpec, weight: torch.Tensor, bias: torch.Tensor) -> LinearProbe:
    head = data.make(LinearProbe(data.z["train"].shape[1], data.n_out, l2_normalize=spec.l2_normalize,
                                 regression=data.regression))
    with torch.no_grad():
        head.weight.copy_(weight.T)
        head.bias.copy_(bias)
    return head


def sklearn_c(weight_decay: float, n_train: int, n_classes: int) -> float:
    """scikit-learn's LogisticRegression C for this penalty (binomial for two classes: twice the multinomial C)."""
    if weight_decay <= 0:
        return float("inf")
    return (2.0 if n_classes == 2 else 1.0) / (weight_decay * n_train)


def _lbfgs_candidates(specs, data: GroupData) -> list[Candidate]:
    """Every L-BFGS linear head of the group, on one shared basis of the training rows."""
    if not specs:
        return []
    t0 = time.perf_counter()
    zt = data.z["train"]
    if data.rows_key not in data.bases:  # kept for the layer's other tasks (train_layer drops it after)
        data.bases[data.rows_key] = row_basis(zt)
    basis = data.bases[data.rows_key]
    fits = []
    for spec, req, why in specs:
        wds = sorted(spec.weight_decays, reverse=True)
        if data.regression:
            f = fit_ridge_grid(zt, data.y["train"], weight_decays=wds, l2_normalize=spec.l2_normalize, basis=basis)
        else:
            f = fit_logistic_grid(zt, data.y["train"], weight_decays=wds, n_classes=data.n_out,
                                  l2_normalize=spec.l2_normalize, basis=basis,
                                  settings=SolverSettings(tol=spec.tol, max_iter=spec.max_iter))
            f = _polish_first(f, data, spec, wds, basis)
        fits.append((spec, req, why, wds, f))
    n_heads = sum(len(f[3]) for f in fits)
    share = (time.perf_counter() - t0) / n_heads  # the batched wall time, split evenly
    out = []
    for spec, req, why, wds, f in fits:
        for i, wd in enumerate(wds):
            head = _linear_head(data, spec, f.weight[i], f.bias[i])
            hp = {"solver": "lbfgs", "weight_decay": wd, "l2_normalize": spec.l2_normalize}
            if not data.regression:
                hp["C"] = float(f"{sklearn_c(wd, len(zt), data.n_out):.12g}")  # 50000.0, not 50000.00000000001
            out.append(Candidate("linear", req, hp, spec, head, head.predict_standardized(data.z["val"]).cpu().numpy(),
                                 share, steps=int(f.iterations[i]), batch_heads=n_heads, auto_reason=why,
                                 converged=bool(f.converged[i])))
    return out


def _polish_first(f: LinearFit, data: GroupData, spec: LinearHeadSpec, wds: list[float], basis) -> LinearFit:
    """Refit the head that validation ranks first to spec.polish_tol, and again, until the first is a refitted one.

    A weakly penalised head stopped at the loose `tol` is not at its optimum yet, and such an early
    stop can score better on validation than the optimum does: selection would then pick what the
    solver happened to do. Polishing the leaders (POLISH_BATCH at a time, warm-started) until the
    first is a polished one selects among optima, at the cost of refitting a few heads rather than
    the whole grid at the tight tolerance. A head whose gradient bounds its distance to the optimum
    within POLISH_SKIP_REL of its weights' norm (a strong penalty, typically) counts as polished.
    """
    zt, zv = data.z["train"], data.z["val"]
    if data.val_score is None or not len(zv) or not spec.polish_tol or spec.polish_tol >= spec.tol:
        return f
    w, b, iters, conv, loss, gn = (t.clone() for t in (f.weight, f.bias, f.iterations, f.converged, f.loss,
                                                       f.grad_norm))
    sw, sb = (t.clone() for t in f.start)

    def score(i: int) -> float:
        s = data.val_score(_linear_head(data, spec, w[i], b[i]).predict_standardized(zv).cpu().numpy())
        return -math.inf if math.isnan(s) else s

    scores = [score(i) for i in range(len(wds))]
    polished = set(torch.nonzero(f.near_optimum(wds, POLISH_SKIP_REL)).flatten().tolist())
    while (rank := sorted(range(len(wds)), key=lambda i: (-scores[i], i)))[0] not in polished:  # first wins ties
        batch = [i for i in rank if i not in polished][:POLISH_BATCH]
        g = fit_logistic_grid(zt, data.y["train"], weight_decays=[wds[i] for i in batch], n_classes=data.n_out,
                              l2_normalize=spec.l2_normalize, basis=basis,
                              settings=SolverSettings(tol=spec.polish_tol, max_iter=spec.max_iter),
                              start=(sw[batch], sb[batch]))
        for k, i in enumerate(batch):
            w[i], b[i], conv[i], loss[i], gn[i] = g.weight[k], g.bias[k], g.converged[k], g.loss[k], g.grad_norm[k]
            iters[i] += g.iterations[k]
            sw[i], sb[i] = g.start[0][k], g.start[1][k]
            scores[i] = score(i)
        polished.update(batch)
    return LinearFit(w, b, iters, conv, loss, (sw, sb), gn)


def _adam_candidates(specs, data: GroupData, fit: Fit) -> list[Candidate]:
    """Every Adam linear head of the group in one train_linear_grid call."""
    heads = [(spec, req, why, lr, wd) for spec, req, why in specs
             for wd in sorted(spec.weight_decays, reverse=True) for lr in spec.lrs]
    if not heads:
        return []
    z, y = data.z, data.y
    t0 = time.perf_counter()
    res = train_linear_grid(z["train"], y["train"], z["val"], y["val"], lrs=[h[3] for h in heads],
                            weight_decays=[h[4] for h in heads], l2_normalize=[h[0].l2_normalize for h in heads],
                            n_out=data.n_out, regression=data.regression, fit=fit)
    share = (time.perf_counter() - t0) / len(heads)
    out = []
    for i, (spec, req, why, lr, wd) in enumerate(heads):
        head = _linear_head(data, spec, res.weight[i], res.bias[i])
        hp = {"solver": "adam", "lr": lr, "weight_decay": wd, "l2_normalize": spec.l2_normalize}
        out.append(Candidate("linear", req, hp, spec, head, head.predict_standardized(z["val"]).cpu().numpy(), share,
                             int(res.best_epoch[i]), res.steps, len(heads), why))
    return out


def log_knn_caps(config: ProbeConfig, splits: Mapping[str, TaskSplit]) -> None:
    """Say once per task and training set, in the driver, which kNN ks exceed the training rows and are capped
    at them (a vote over every row): the groups of every layer cap them the same way, silently."""
    for spec in (h for h in config.heads if isinstance(h, KNNHeadSpec)):
        for s in splits.values():
            for fs_k in config.few_shot:
                n_train = len(s.few_shot(fs_k, config.split.seed))
                capped = [k for k in spec.ks if k > n_train]
                if capped:
                    log.info("task %r%s: knn ks %s exceed the %d training rows and are capped at k=%d (a vote over "
                             "every row); heads kept: k=%s", s.task, "" if fs_k is None else f", few-shot k={fs_k}",
                             capped, n_train, n_train, list(dict.fromkeys(min(k, n_train) for k in spec.ks)))


def _knn_candidates(spec: KNNHeadSpec, requested: str, why: str | None, data: GroupData) -> list[Candidate]:
    """One head per effective k: a k above the training rows votes over all of them, so it is recorded as
    that many (the saved head too), and ks that come to the same effective k give one head (the first)."""
    z, y, regression, n_out = data.z, data.y, data.regression, data.n_out
    t0 = time.perf_counter()
    n_train = len(z["train"])
    ks: list[int] = []
    for k in spec.ks:
        if min(k, n_train) not in ks:
            ks.append(min(k, n_train))
    base = data.make(KNNProbe(z["train"].shape[1], n_out, k=ks[0], cosine=spec.cosine, regression=regression))
    base.set_bank(z["train"], y["train"])
    scores = base.scores_for_ks(z["val"], ks)
    share = (time.perf_counter() - t0) / len(ks)
    out = []
    for k, s in zip(ks, scores):
        head = data.make(KNNProbe(z["train"].shape[1], n_out, k=k, cosine=spec.cosine, regression=regression))
        head.bank, head.bank_targets = base.bank, base.bank_targets
        pred = (s.squeeze(-1) * head.target_std + head.target_mean) if regression else s.argmax(-1)
        out.append(Candidate("knn", requested, {"k": k, "cosine": spec.cosine}, spec, head, pred.cpu().numpy(),
                             share, batch_heads=len(ks), auto_reason=why))
    return out
