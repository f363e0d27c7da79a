"""Probe head modules (linear, MLP, prototype, kNN) that carry their own standardisation, and the auto choice."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def fit_standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std of training features; a constant feature gets std 1, as in scikit-learn.

    A floor such as 1e-6 would turn a feature that is constant on a small (few-shot) training set into
    z-scores around 1e6 on validation and test. "Constant" is scikit-learn's test (StandardScaler):
    the variance, computed in float64, is within rounding of zero relative to the mean.
    """
    x = x.double()
    var, mean = torch.var_mean(x, dim=0, correction=0)
    n, eps = len(x), torch.finfo(torch.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    std = torch.where(constant, torch.ones_like(var), var.sqrt())
    return mean.float(), std.float()


class ProbeHead(nn.Module):
    """Base of every head: raw features -> standardise with the training statistics -> `logits`.

    The statistics are buffers, so they are saved and reloaded with the head. For regression the
    head predicts a standardised target and `predict` maps it back with target_mean/target_std.
    """

    kind = "base"

    def __init__(self, dim: int, n_out: int, *, regression: bool = False) -> None:
        super().__init__()
        self.dim, self.n_out, self.regression = dim, n_out, regression
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, *, target_mean: float = 0.0,
                            target_std: float = 1.0) -> "ProbeHead":
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.target_mean.fill_(target_mean)
        self.target_std.fill_(target_std)
        return self

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.device, torch.float32) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or the standardised regression output) of raw features."""
        return self.logits(self.standardize(x))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict_standardized(self, z: torch.Tensor) -> torch.Tensor:
        """Class codes (or target values in original units) of already-standardised features."""
        out = self.logits(z)
        if self.regression:
            return out.squeeze(-1) * self.target_std + self.target_mean
        return out.argmax(-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Class codes (index into the saved classes) or regression values for raw features."""
        was_training = self.training
        self.eval()
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        out = self.predict_standardized(self.standardize(x)).cpu().numpy()
        self.train(was_training)
        return out


class LinearProbe(ProbeHead):
    """z -> W z + b; with `l2_normalize` the standardised z is scaled to norm sqrt(dim) first."""

    kind = "linear"

    def __init__(self, dim: int, n_out: int, *, l2_normalize: bool = False, regression: bool = False) -> None:
        super().__init__(dim, n_out, regression=regression)
        self.l2_normalize = l2_normalize
        self.weight = nn.Parameter(torch.zeros(n_out, dim))  # zero init: the loss is convex
        self.bias = nn.Parameter(torch.zeros(n_out))

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.l2_normalize:
            z = F.normalize(z, dim=-1) * math.sqrt(self.dim)
        return z @ self.weight.T + self.bias


class MLPProbe(ProbeHead):
    """Linear -> [BatchNorm1d] -> ReLU -> Dropout for each hidden size, then a Linear output."""

    kind = "mlp"

    def __init__(self, dim: int, n_out: int, *, hidden_sizes: tuple[int, ...] = (512,), dropout: float = 0.1,
                 batch_norm: bool = True, regression: bool = False) -> None:
        super().__init__(dim, n_out, regression=regression)
        layers: list[nn.Module] = []
        prev = dim
        for h in hidden_sizes:
            layers += [nn.Linear(prev, h)] + ([nn.BatchNorm1d(h)] if batch_norm else [])
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, n_out))
        self.net = nn.Sequential(*layers)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PrototypeProbe(ProbeHead):
    """Scores classes by similarity to a prototype per class (the class mean of the training features).

    cosine: scale * cos(z, p); euclidean: -scale * ||z - p||^2 / dim. With `learnable` the
    prototypes and the log-scale are parameters that can be fine-tuned, else they are buffers.
    """

    kind = "prototype"

    def __init__(self, dim: int, n_out: int, *, metric: str = "cosine", learnable: bool = False) -> None:
        super().__init__(dim, n_out)
        self.metric = metric
        protos = torch.zeros(n_out, dim)
        log_scale = torch.tensor(math.log(10.0) if metric == "cosine" else 0.0)
        if learnable:
            self.prototypes, self.log_scale = nn.Parameter(protos), nn.Parameter(log_scale)
        else:
            self.register_buffer("prototypes", protos)
            self.register_buffer("log_scale", log_scale)

    @torch.no_grad()
    def set_class_means(self, z: torch.Tensor, y: torch.Tensor) -> "PrototypeProbe":
        """Prototypes = per-class mean of standardised (and, for cosine, L2-normalised) features."""
        src = F.normalize(z, dim=-1) if self.metric == "cosine" else z
        onehot = F.one_hot(y, self.n_out).float()
        self.prototypes.copy_((onehot.T @ src) / onehot.sum(0).clamp_min(1).unsqueeze(1))
        return self

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        scale = self.log_scale.exp()
        if self.metric == "cosine":
            return scale * F.normalize(z, dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        return -scale * torch.cdist(z, self.prototypes).pow(2) / self.dim


class KNNProbe(ProbeHead):
    """k-nearest-neighbour vote over a memory bank of standardised training features (float16).

    Classification scores are vote counts (ties broken by summed similarity); regression predicts
    the neighbours' mean target.
    """

    kind = "knn"

    def __init__(self, dim: int, n_out: int, *, k: int = 10, cosine: bool = True, bank_size: int = 0,
                 regression: bool = False) -> None:
        super().__init__(dim, n_out, regression=regression)
        self.k, self.cosine = k, cosine
        self.register_buffer("bank", torch.zeros(bank_size, dim, dtype=torch.float16))
        self.register_buffer("bank_targets", torch.zeros(bank_size) if regression
                             else torch.zeros(bank_size, dtype=torch.long))

    @torch.no_grad()
    def set_bank(self, z: torch.Tensor, targets: torch.Tensor) -> "KNNProbe":
        bank = F.normalize(z, dim=-1) if self.cosine else z
        self.bank = bank.to(torch.float16)
        self.bank_targets = targets.clone()
        return self

    @torch.no_grad()
    def scores_for_ks(self, z: torch.Tensor, ks: list[int], chunk: int = 2048) -> list[torch.Tensor]:
        """Scores for several k from one top-k search: a list of (n, n_out) tensors."""
        kmax = min(max(ks), len(self.bank))
        bank = self.bank.float()
        outs: list[list[torch.Tensor]] = [[] for _ in ks]
        for start in range(0, len(z), chunk):
            q = z[start:start + chunk]
            if self.cosine:
                sim = F.normalize(q, dim=-1) @ bank.T
            else:
                sim = -torch.cdist(q, bank).pow(2)
            top_sim, top_idx = sim.topk(kmax, dim=1)
            tgt = self.bank_targets[top_idx]
            for i, k in enumerate(ks):
                k = min(k, kmax)
                if self.regression:
                    outs[i].append(tgt[:, :k].float().mean(1, keepdim=True))
                else:
                    votes = F.one_hot(tgt[:, :k], self.n_out).float()
                    # under one vote (at most k sigmoids, each < 1, over k + 1) and as large as that: float32 keeps it
                    tie = (torch.sigmoid(top_sim[:, :k]).unsqueeze(-1) * votes).sum(1) / (k + 1)
                    outs[i].append(votes.sum(1) + tie)
        return [torch.cat(o) for o in outs]

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.scores_for_ks(z, [self.k])[0]


def choose_head(samples_per_class: float, *, prototype_below: float = 10.0,
                linear_below: float = 150.0) -> tuple[str, str]:
    """The head kind for this much training data per class, and the reason in words.

    Fewer than `prototype_below` per class: prototype (class means need no fitting and do not
    overfit); fewer than `linear_below`: linear (limited data, low capacity); else MLP.
    """
    spc = f"{samples_per_class:.1f} training samples per class"
    if samples_per_class < prototype_below:
        return "prototype", f"{spc} < {prototype_below:g}: prototype head (very few examples)"
    if samples_per_class < linear_below:
        return "linear", f"{spc} < {linear_below:g}: linear head (limited data)"
    return "mlp", f"{spc} >= {linear_below:g}: MLP head (ample data)"


def build_head(meta: dict[str, Any], state: dict[str, torch.Tensor] | None = None) -> ProbeHead:
    """Rebuild a head from its sidecar metadata (kind, spec, hparams, dim, n_out) and load `state`."""
    kind, spec, dim, n_out = meta["kind"], meta["spec"], meta["dim"], meta["n_out"]
    regression = meta.get("task_type") == "regression"
    if kind == "linear":
        head: ProbeHead = LinearProbe(dim, n_out, l2_normalize=spec["l2_normalize"], regression=regression)
    elif kind == "mlp":
        head = MLPProbe(dim, n_out, hidden_sizes=tuple(spec["hidden_sizes"]), dropout=spec["dropout"],
                        batch_norm=spec["batch_norm"], regression=regression)
    elif kind == "prototype":
        head = PrototypeProbe(dim, n_out, metric=spec["metric"], learnable=spec["learnable"])
    elif kind == "knn":
        size = len(state["bank"]) if state is not None else 0
        head = KNNProbe(dim, n_out, k=meta["hparams"]["k"], cosine=spec["cosine"], bank_size=size,
                        regression=regression)
    else:
        raise ValueError(f"head kind {kind!r} unknown; valid: ['linear', 'mlp', 'prototype', 'knn']")
    if state is not None:
        head.load_state_dict(state)
    return head.eval()
