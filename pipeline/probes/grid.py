"""Training of all heads of one (task, layer) group: the linear grid as one batched computation.

For each few-shot k (each k has its own training rows and so its own standardisation
statistics) the group:
- standardises the layer's features once with the training-row mean/std;
- trains EVERY linear head (all linear specs x lr x weight decay, with or without L2
  normalisation) as one batched computation: the weights of all H heads form one (d, H*C)
  matrix, each shared minibatch costs one matmul forward and one backward (the softmax /
  MSE gradients are written out, so there is no autograd graph), and one vectorised Adam
  step whose lr and L2 penalty are per-head vectors, under a cosine lr decay. Heads are
  independent, so this equals training each alone with the same seed
  (tests/test_probes_grid.py checks it against an autograd LinearProbe with torch.optim.Adam).
  Early stopping on validation is per head; each head keeps its best state and stopped heads
  are dropped from the batch;
- trains MLP heads (AdamW) and learnable prototypes ONE BY ONE with the same minibatch loop
  (not batched: dropout / batch norm make a batched MLP more code than it saves here);
- fits fixed prototypes in closed form and evaluates all kNN k values from one top-k search;
- selects on validation (best per head kind, and best overall), then computes test metrics
  once, for the selected heads only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.probes import metrics as M
from pipeline.probes.config import (AutoHeadSpec, HeadSpec, KNNHeadSpec, LinearHeadSpec, MLPHeadSpec, ProbeConfig,
                                    PrototypeHeadSpec)
from pipeline.probes.heads import (KNNProbe, LinearProbe, MLPProbe, ProbeHead, PrototypeProbe, choose_head,
                                   fit_standardizer)
from pipeline.probes.splits import TaskSplit

log = logging.getLogger(__name__)
_DEFAULT_SPECS = {"linear": LinearHeadSpec(), "mlp": MLPHeadSpec(), "prototype": PrototypeHeadSpec()}


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


@dataclass(frozen=True)
class Fit:
    """Training settings shared by every head of a group."""

    epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 1024
    patience: int = 10
    seed: int = 0
    metric: str = "accuracy"  # "r2" for regression
    min_batches: int = 10

    def batch_for(self, n: int) -> int:
        """batch_size, or less for a small training set: at least `min_batches` steps per epoch
        (down to 16 rows a batch), so that `epochs` buys enough optimizer steps."""
        return max(1, min(self.batch_size, max(16, math.ceil(n / self.min_batches))))


@dataclass
class LinearGridResult:
    """Best state of each of H batched linear heads (original order)."""

    weight: torch.Tensor  # (H, d, C)
    bias: torch.Tensor  # (H, C)
    best_epoch: torch.Tensor  # (H,)
    val_score: torch.Tensor  # (H,) selection metric of the kept (lowest validation loss) state
    steps: int  # optimizer steps of the batched computation


class _Tracker:
    """Per-head early stopping on the validation loss (cross-entropy / MSE).

    The loss is smooth where accuracy on a small validation set is noisy, so a head keeps its
    lowest-loss epoch and stops after `patience` epochs without a lower loss; the validation
    score of that kept state is what model selection compares.
    """

    def __init__(self, n: int, patience: int, device: torch.device) -> None:
        self.best = torch.full((n,), -math.inf, device=device)  # score at the kept state
        self.best_loss = torch.full((n,), math.inf, device=device)
        self.best_epoch = torch.zeros(n, dtype=torch.long, device=device)
        self.patience = patience

    def update(self, heads: torch.Tensor, score: torch.Tensor, loss: torch.Tensor, epoch: int) -> tuple:
        """Returns (improved, still_alive) masks over `heads`."""
        loss = torch.nan_to_num(loss.to(self.best_loss.dtype), nan=math.inf)
        score = score.to(self.best.dtype)
        improved = loss < self.best_loss[heads]
        self.best[heads] = torch.where(improved, torch.nan_to_num(score, nan=-math.inf), self.best[heads])
        self.best_loss[heads] = torch.where(improved, loss, self.best_loss[heads])
        self.best_epoch[heads] = torch.where(improved, torch.full_like(heads, epoch), self.best_epoch[heads])
        return improved, (epoch - self.best_epoch[heads]) < self.patience


def _loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    """Mean loss per head of (H, B, C) outputs: cross-entropy, or MSE for regression."""
    if regression:
        return ((out.squeeze(-1) - y) ** 2).mean(-1)
    h, b, c = out.shape
    return F.cross_entropy(out.reshape(h * b, c), y.repeat(h), reduction="none").view(h, b).mean(-1)


def _predict(out: torch.Tensor, regression: bool) -> torch.Tensor:
    return out.squeeze(-1) if regression else out.argmax(-1)


def train_linear_grid(z_train: torch.Tensor, y_train: torch.Tensor, z_val: torch.Tensor, y_val: torch.Tensor, *,
                      lrs: list[float], weight_decays: list[float], l2_normalize: list[bool], n_out: int,
                      regression: bool = False, fit: Fit = Fit(), betas=(0.9, 0.999), eps: float = 1e-8
                      ) -> LinearGridResult:
    """Train H = len(lrs) linear heads on one shared standardised input as one batched computation.

    The weights of all heads are one (d, H*C) matrix: a minibatch costs one matmul forward and
    one backward (gradients written out, no autograd). Head h has lr lrs[h] and L2 penalty
    weight_decays[h] on its weights (not its bias) and, if l2_normalize[h], sees each row scaled to
    norm sqrt(d) (a per-row factor applied to the shared product, so the input stays shared).
    Zero init; the minibatch order is drawn from a generator seeded with fit.seed, the same for
    any H, so each head follows exactly the path it would follow alone.
    """
    dev, (n, d), H = z_train.device, z_train.shape, len(lrs)
    W = torch.zeros(d, H, n_out, device=dev, dtype=z_train.dtype)
    b = torch.zeros(H, n_out, device=dev, dtype=z_train.dtype)
    opt = [torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(b), torch.zeros_like(b)]  # Adam m, v
    lr = torch.tensor(lrs, device=dev, dtype=z_train.dtype)
    wd = torch.tensor(weight_decays, device=dev, dtype=z_train.dtype)
    l2 = torch.tensor(l2_normalize, device=dev)
    live = torch.arange(H, device=dev)  # original ids of the heads still training
    best_W, best_b = W.clone(), b.clone()
    tracker = _Tracker(H, fit.patience, dev)
    gen = torch.Generator().manual_seed(fit.seed)
    bs = fit.batch_for(n)
    total = min(fit.epochs * math.ceil(n / bs), fit.max_steps or math.inf)
    step = 0
    for epoch in range(1, fit.epochs + 1):
        perm = torch.randperm(n, generator=gen).to(dev)
        for start in range(0, n, bs):
            if step >= total:
                break
            idx = perm[start:start + bs]
            x = z_train[idx]
            scale = _row_scale(x, l2)
            out = (x @ W.view(d, -1)).view(len(idx), -1, n_out) * scale[..., None] + b
            grad_out = _dloss(out, y_train[idx], regression)  # (B, H, C): d(mean loss of head h)/d out
            grad_W = (x.T @ (grad_out * scale[..., None]).view(len(idx), -1)).view_as(W) + wd[:, None] * W
            step += 1
            f = _cosine(step, total)
            _adam_(W, grad_W, opt[0], opt[1], lr * f, step, betas, eps)
            _adam_(b, grad_out.sum(0), opt[2], opt[3], lr * f, step, betas, eps)
        pred, vloss = _evaluate(z_val, y_val, W, b, l2, regression)
        score = M.batched_score(pred, y_val, metric=fit.metric, n_classes=n_out)
        improved, alive = tracker.update(live, score, vloss, epoch)
        best_W[:, live[improved]] = W[:, improved]
        best_b[live[improved]] = b[improved]
        if step >= total or not alive.any():
            break
        if not alive.all():  # drop stopped heads from the batched computation
            keep = alive.nonzero().squeeze(1)
            live, lr, wd, l2 = live[keep], lr[keep], wd[keep], l2[keep]
            W, opt[0], opt[1] = (t[:, keep].contiguous() for t in (W, opt[0], opt[1]))
            b, opt[2], opt[3] = (t[keep] for t in (b, opt[2], opt[3]))
    return LinearGridResult(best_W.permute(1, 0, 2).contiguous(), best_b, tracker.best_epoch, tracker.best, step)


def _cosine(step: int, total: float) -> float:
    """lr factor of a cosine decay from 1 (first step) towards 0 (last planned step)."""
    return 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total)) if math.isfinite(total) else 1.0


def _dloss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    """Gradient of each head's mean loss w.r.t. its outputs (B, H, C): softmax - onehot, or MSE."""
    if regression:
        return 2.0 * (out - y[:, None, None]) / len(y)
    g = torch.softmax(out, dim=-1)
    g[torch.arange(len(y), device=y.device), :, y] -= 1.0
    return g.div_(len(y))


@torch.no_grad()
def _evaluate(z, y, W, b, l2, regression, chunk_elems: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictions (H, n) and mean loss (H,) of the batched heads, in row chunks."""
    d, H, C = W.shape
    preds, loss = [], torch.zeros(H, device=z.device, dtype=z.dtype)
    rows = max(1, chunk_elems // max(1, H * C))
    for s in range(0, len(z), rows):
        x, t = z[s:s + rows], y[s:s + rows]
        out = (x @ W.view(d, -1)).view(len(x), H, C) * _row_scale(x, l2)[..., None] + b
        if regression:
            preds.append(out[..., 0])
            loss += ((out[..., 0] - t[:, None]) ** 2).sum(0)
        else:
            preds.append(out.argmax(-1))
            loss += (torch.logsumexp(out, -1) - out.gather(-1, t[:, None, None].expand(-1, H, 1))[..., 0]).sum(0)
    return torch.cat(preds).T, loss / max(len(z), 1)


def _row_scale(x: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """(B, H) factor: sqrt(d)/||x_b|| for L2-normalising heads, 1 for the others."""
    if not bool(l2.any()):
        return torch.ones(len(x), len(l2), device=x.device, dtype=x.dtype)
    inv = math.sqrt(x.shape[1]) / x.norm(dim=1).clamp_min(1e-12)
    return torch.where(l2[None, :], inv[:, None], torch.ones_like(inv)[:, None])


def _adam_(p, g, m, v, lr, step, betas, eps) -> None:
    """In-place Adam step (torch.optim.Adam's formula) with a per-head lr vector (head axis: dim -2)."""
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt().div_(math.sqrt(1 - b2 ** step)).add_(eps)
    p.sub_((lr / (1 - b1 ** step))[:, None] * m / denom)


def fit_module(head: ProbeHead, z_train: torch.Tensor, y_train: torch.Tensor, z_val: torch.Tensor,
               y_val: torch.Tensor, *, lr: float, weight_decay: float, fit: Fit = Fit(),
               decoupled: bool = True) -> dict[str, Any]:
    """Train one head with Adam and a cosine lr decay, early stopping on validation.

    weight_decay applies to weight matrices only: decoupled (torch.optim.AdamW) by default, or
    an L2 penalty (torch.optim.Adam, decoupled=False; the linear grid's semantics).

    Loads the best validation state into `head`; returns {"best_epoch", "val_score", "steps"}.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = (torch.optim.AdamW if decoupled else torch.optim.Adam)(groups, lr=lr)
    bs = fit.batch_for(len(z_train))
    total = min(fit.epochs * math.ceil(len(z_train) / bs), fit.max_steps or math.inf)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i + 1, total))
    tracker = _Tracker(1, fit.patience, z_train.device)
    one = torch.zeros(1, dtype=torch.long, device=z_train.device)
    best_state = {k: v.clone() for k, v in head.state_dict().items()}
    gen, n, step = torch.Generator().manual_seed(fit.seed), len(z_train), 0
    has_bn = any(isinstance(mod, torch.nn.BatchNorm1d) for mod in head.modules())
    for epoch in range(1, fit.epochs + 1):
        head.train()
        perm = torch.randperm(n, generator=gen).to(z_train.device)
        for start in range(0, n, bs):
            idx = perm[start:start + bs]
            if has_bn and len(idx) < 2 or step >= total:
                continue
            opt.zero_grad(set_to_none=True)
            _loss(head.logits(z_train[idx])[None], y_train[idx], head.regression).sum().backward()
            opt.step()
            sched.step()
            step += 1
        head.eval()
        with torch.no_grad():
            out = head.logits(z_val)[None]
            score = M.batched_score(_predict(out, head.regression), y_val, metric=fit.metric, n_classes=head.n_out)
            improved, alive = tracker.update(one, score, _loss(out, y_val, head.regression), epoch)
        if bool(improved[0]):
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        if not bool(alive[0]) or step >= total:
            break
    head.load_state_dict(best_state)
    return {"best_epoch": int(tracker.best_epoch[0]), "val_score": float(tracker.best[0]), "steps": step}


@dataclass
class Candidate:
    """One trained head of a group, before and after selection."""

    kind: str
    requested: str
    hparams: dict[str, Any]
    spec: HeadSpec
    head: ProbeHead
    val_pred: np.ndarray
    train_time_s: float
    best_epoch: int | None = None
    steps: int | None = None
    batch_heads: int = 1
    auto_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


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


def train_group(features: np.ndarray, split: TaskSplit, layer: str, config: ProbeConfig) -> GroupOutput:
    """All heads x hyperparameters x few-shot k of one (task, layer); raises on unusable input."""
    labelled = np.concatenate([split.rows[s] for s in ("train", "val", "test")])
    check_finite(features, labelled, split.image_ids, layer)
    device = resolve_device(config.device)
    metric = "r2" if split.task_type == "regression" else config.selection_metric
    fit = Fit(config.epochs, config.max_steps, config.batch_size, config.patience, config.seed, metric)
    out = GroupOutput([], [])
    for k in config.few_shot:
        rows, saved = _train_subset(features, split, layer, k, config, fit, device)
        out.rows += rows
        out.heads += saved
    return out


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


def _train_subset(features, split, layer, k, config, fit, device) -> tuple[list[dict], list[SavedHead]]:
    train_rows = split.few_shot(k, config.split.seed)
    z, y, t, stats = _tensors(features, split, train_rows, device)
    regression = split.task_type == "regression"
    n_out = 1 if regression else split.n_classes
    with torch.random.fork_rng(devices=[]):  # MLP init / dropout draw from the global RNG
        torch.manual_seed(config.seed)
        cands, skipped = _train_candidates(z, y, split, config, fit, n_out, stats)
    val_metric = (lambda p: M.regression_metrics(t["val"], p)) if regression else (
        lambda p: M.classification_metrics(t["val"], p))
    key = "r2" if regression else config.selection_metric
    vals = [val_metric(c.val_pred) for c in cands]
    best = _select(cands, vals, key)
    base = {"task": split.task, "task_type": split.task_type, "layer": layer, "few_shot": k,
            "n_classes": split.n_classes, "n_train": len(train_rows), "n_val": len(split.rows["val"]),
            "n_test": len(split.rows["test"]), "n_missing": split.n_missing, "selection_metric": key}
    rows, saved = [], []
    for i, (c, v) in enumerate(zip(cands, vals)):
        row = dict(base, head=c.kind, requested=c.requested, hparams=json.dumps(c.hparams, sort_keys=True),
                   val_score=v[key], best_epoch=c.best_epoch, steps=c.steps, batch_heads=c.batch_heads,
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


def _train_candidates(z, y, split, config, fit, n_out, stats) -> tuple[list[Candidate], list[tuple[str, str]]]:
    regression = split.task_type == "regression"
    per_class = len(y["train"]) / max(split.n_classes, 1)
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
    make = lambda head: head.set_standardization(stats[0], stats[1], target_mean=stats[2],  # noqa: E731
                                                 target_std=stats[3]).to(z["train"].device)
    cands = _linear_candidates([s for s in specs if isinstance(s[0], LinearHeadSpec)], z, y, n_out, regression,
                               fit, make)
    for spec, requested, why in specs:
        t0 = time.perf_counter()
        if isinstance(spec, MLPHeadSpec):
            for lr in spec.lrs:
                for wd in spec.weight_decays:
                    t0 = time.perf_counter()
                    torch.manual_seed(config.seed)  # the same init for the same spec, whatever the order
                    head = make(MLPProbe(z["train"].shape[1], n_out, hidden_sizes=spec.hidden_sizes,
                                         dropout=spec.dropout, batch_norm=spec.batch_norm, regression=regression))
                    info = fit_module(head, z["train"], y["train"], z["val"], y["val"], lr=lr, weight_decay=wd,
                                      fit=fit)
                    cands.append(_cand("mlp", requested, {"lr": lr, "weight_decay": wd}, spec, head, z, t0, why,
                                       best_epoch=info["best_epoch"], steps=info["steps"]))
        elif isinstance(spec, PrototypeHeadSpec):
            torch.manual_seed(config.seed)
            head = make(PrototypeProbe(z["train"].shape[1], n_out, metric=spec.metric, learnable=spec.learnable))
            head.set_class_means(z["train"], y["train"])
            info = {}
            if spec.learnable:
                info = fit_module(head, z["train"], y["train"], z["val"], y["val"], lr=spec.lr, weight_decay=0.0,
                                  fit=fit)
            hp = {"metric": spec.metric, "learnable": spec.learnable} | ({"lr": spec.lr} if spec.learnable else {})
            cands.append(_cand("prototype", requested, hp, spec, head, z, t0, why,
                               best_epoch=info.get("best_epoch"), steps=info.get("steps")))
        elif isinstance(spec, KNNHeadSpec):
            cands += _knn_candidates(spec, requested, why, z, y, n_out, regression, make)
    return cands, skipped


def _cand(kind, requested, hparams, spec, head, z, t0, why, **kw) -> Candidate:
    val_pred = head.predict_standardized(z["val"]).cpu().numpy()
    return Candidate(kind, requested, hparams, spec, head, val_pred, time.perf_counter() - t0, auto_reason=why, **kw)


def _linear_candidates(specs, z, y, n_out, regression, fit, make) -> list[Candidate]:
    """Every linear head of the group in one train_linear_grid call."""
    heads = [(spec, req, why, lr, wd) for spec, req, why in specs for lr in spec.lrs for wd in spec.weight_decays]
    if not heads:
        return []
    t0 = time.perf_counter()
    res = train_linear_grid(z["train"], y["train"], z["val"], y["val"], lrs=[h[3] for h in heads],
                            weight_decays=[h[4] for h in heads], l2_normalize=[h[0].l2_normalize for h in heads],
                            n_out=n_out, regression=regression, fit=fit)
    share = (time.perf_counter() - t0) / len(heads)  # the batched wall time, split evenly
    out = []
    for i, (spec, req, why, lr, wd) in enumerate(heads):
        head = make(LinearProbe(z["train"].shape[1], n_out, l2_normalize=spec.l2_normalize, regression=regression))
        with torch.no_grad():
            head.weight.copy_(res.weight[i].T)
            head.bias.copy_(res.bias[i])
        val_pred = head.predict_standardized(z["val"]).cpu().numpy()
        out.append(Candidate("linear", req, {"lr": lr, "weight_decay": wd, "l2_normalize": spec.l2_normalize}, spec,
                             head, val_pred, share, int(res.best_epoch[i]), res.steps, len(heads), why))
    return out


def _knn_candidates(spec, requested, why, z, y, n_out, regression, make) -> list[Candidate]:
    t0 = time.perf_counter()
    base = make(KNNProbe(z["train"].shape[1], n_out, k=spec.ks[0], cosine=spec.cosine, regression=regression))
    base.set_bank(z["train"], y["train"])
    scores = base.scores_for_ks(z["val"], list(spec.ks))
    share = (time.perf_counter() - t0) / len(spec.ks)
    out = []
    for k, s in zip(spec.ks, scores):
        head = make(KNNProbe(z["train"].shape[1], n_out, k=k, cosine=spec.cosine, regression=regression))
        head.bank, head.bank_targets = base.bank, base.bank_targets
        pred = (s.squeeze(-1) * head.target_std + head.target_mean) if regression else s.argmax(-1)
        out.append(Candidate("knn", requested, {"k": k, "cosine": spec.cosine}, spec, head, pred.cpu().numpy(),
                             share, batch_heads=len(spec.ks), auto_reason=why))
    return out


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
