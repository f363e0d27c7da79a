"""Minibatch training of probe heads: the batched Adam linear grid, and one head at a time (MLP, learnable prototypes).

The batched grid trains H linear heads on one shared standardised input as one computation: the
weights of all heads are one (d, H*C) matrix, each shared minibatch costs one matmul forward and
one backward (the softmax / MSE gradients are written out, so there is no autograd graph), and
one vectorised Adam step whose lr and L2 penalty are per-head vectors, under a cosine lr decay.
Heads are independent, so this equals training each alone with the same seed
(tests/test_probes_adam.py checks it against an autograd LinearProbe with torch.optim.Adam).
Early stopping on validation is per head; each head keeps its best state and stopped heads are
dropped from the batch. MLP heads (AdamW) and learnable prototypes train one by one with the
same minibatch loop (dropout / batch norm make a batched MLP more code than it saves here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.probes import metrics as M
from pipeline.probes.heads import ProbeHead


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
