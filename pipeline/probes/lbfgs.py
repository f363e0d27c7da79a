"""Linear probes fitted to convergence: every L2 penalty of a group at once, by batched L-BFGS in the rows' own basis.

The problem of each head is scikit-learn's LogisticRegression (multinomial cross-entropy, an L2
penalty lambda/2 ||W||^2 on the mean training loss, bias not penalised), solved to a gradient
tolerance rather than stopped after a fixed number of epochs. Three things make the batched
solve cheap:

- **The rows' basis.** With an L2 penalty the optimal weights lie in the span of the training
  rows, so the problem is solved exactly in r = rank <= min(n, d) coordinates Q = Z V (V: an
  orthonormal basis of that span, from the eigenvectors of Z Z^T or Z^T Z). On a 6400-wide
  layer with 1,000 training rows every iteration is 6x cheaper, and the basis is computed once
  for all penalties.
- **A preconditioner for free.** In that basis Q^T Q is diagonal (eigenvalues e_j), so the
  curvature of head h along coordinate j is about c e_j / n + lambda_h, with c a typical softmax
  curvature. L-BFGS runs on coordinates rescaled by its square root. The penalty term is floored
  (max(lambda_h, floor)): near a separating solution the softmax curvature of most rows vanishes,
  and an unfloored weak penalty would stretch the low-variance coordinates by up to 1/sqrt(lambda),
  which made weakly penalised heads stop on the gradient test far from their optimum (or take
  hundreds of iterations to a tight one).
- **One computation for every head.** The H heads' weights form one (r, H * C) matrix: a loss
  and gradient evaluation of all heads is one matmul forward and one backward; each head keeps
  its own L-BFGS memory, step length (Armijo backtracking) and stopping test, and converged heads
  leave the batch.

Regression heads get the closed-form ridge solution in the same basis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


FLOAT32_MIN_TOL = 1e-5  # below this gradient tolerance the matmuls run in float64 too


@dataclass(frozen=True)
class SolverSettings:
    """tol: stop a head when the largest absolute gradient entry of its mean loss is below it.

    scikit-learn's `tol` means the same on the same objective. max_iter caps the iterations (a head
    stopped by it is reported as not converged); memory: L-BFGS pairs kept; curvature: c of the
    preconditioner (scikit-learn's binomial bound is 0.25, softmax's 0.5; the typical curvature at
    the solution is lower, and 0.1 measured fewest iterations on the demo stores); floor: the least
    penalty term of the preconditioner (1e-2: 2-3x fewer iterations to tol 1e-6 on the demo stores
    than none, and no early stop far from the optimum at tol 1e-4; the solution is the same). dtype: the
    precision of losses, gradients and the L-BFGS state (see _Objective); the matmuls run in the
    features' precision, or in float64 when tol < FLOAT32_MIN_TOL.
    """

    tol: float = 1e-4
    max_iter: int = 1000
    memory: int = 10
    curvature: float = 0.1
    floor: float = 1e-2
    dtype: torch.dtype = torch.float64


@dataclass(frozen=True)
class RowBasis:
    """Coordinates Q (n, r) of the training rows in an orthonormal basis of their span, e = ||Q_:,j||^2.

    The basis itself is V (d, r) when d <= n; when d > n it is z^T Q / e, never formed: weights are
    mapped back through the training rows z instead (to_features).
    """

    Q: torch.Tensor
    e: torch.Tensor
    V: torch.Tensor | None = None
    z: torch.Tensor | None = None

    def to_features(self, w: torch.Tensor) -> torch.Tensor:
        """(H, r, C) weights in the basis -> (H, d, C) weights on the features."""
        if self.V is not None:
            return torch.einsum("dr,hrc->hdc", self.V, w)
        return torch.einsum("nd,hnc->hdc", self.z, torch.einsum("nr,hrc->hnc", self.Q / self.e, w))


@dataclass
class LinearFit:
    """H fitted heads in feature space, with how the solver got there."""

    weight: torch.Tensor  # (H, d, C)
    bias: torch.Tensor  # (H, C)
    iterations: torch.Tensor  # (H,)
    converged: torch.Tensor  # (H,) bool
    loss: torch.Tensor  # (H,) final training objective
    start: tuple[torch.Tensor, torch.Tensor] | None = None  # (H, r, C) weights in the basis, (H, C) bias: a warm start
    grad_norm: torch.Tensor | None = None  # (H,) 2-norm of the final gradient (weights and bias)

    def near_optimum(self, weight_decays: list[float], rel: float) -> torch.Tensor:
        """(H,) bool: the bound ||w - w*|| <= ||g|| / lambda is at most rel * ||w||.

        The bound is lambda-strong convexity in the weights; the bias is unpenalised, so it is a close
        guide rather than a proof (tests/test_probes_lbfgs.py checks it holds).
        """
        lam = torch.tensor(weight_decays, dtype=self.grad_norm.dtype, device=self.grad_norm.device)
        return self.grad_norm <= rel * lam * self.start[0].flatten(1).norm(dim=1)


def row_basis(z: torch.Tensor, *, rel_tol: float | None = None) -> RowBasis:
    """Eigen-basis of the training rows' span, from the n x n or d x d Gram matrix, whichever is smaller.

    The Gram matrix is formed in z's precision (the costly n * d * min(n, d) product), its eigen-
    decomposition in float64. Directions with eigenvalue below rel_tol * max (1e-6 for float32 z,
    1e-10 for float64: below rounding of the Gram matrix) carry no signal and are dropped.
    """
    n, d = z.shape
    rel_tol = rel_tol if rel_tol is not None else (1e-10 if z.dtype == torch.float64 else 1e-6)
    e, vecs = torch.linalg.eigh((z @ z.T if d > n else z.T @ z).double())
    keep = e > rel_tol * e.max().clamp_min(1e-300)
    e, vecs = e[keep].to(z.dtype), vecs[:, keep].to(z.dtype)
    if d > n:  # vecs = U, z = U sqrt(e) V^T: Q = U sqrt(e)
        return RowBasis(Q=vecs * e.sqrt(), e=e, z=z)
    Q = z @ vecs
    return RowBasis(Q=Q, e=(Q * Q).sum(0), V=vecs)


def _scaled_rows(basis: RowBasis, dim: int) -> torch.Tensor:
    """Q with each row scaled to norm sqrt(dim): L2 normalisation of z, done in the basis (||z_i|| = ||Q_i||)."""
    return basis.Q * (math.sqrt(dim) / basis.Q.norm(dim=1).clamp_min(1e-12))[:, None]


def fit_logistic_grid(z: torch.Tensor, y: torch.Tensor, *, weight_decays: list[float], n_classes: int,
                      l2_normalize: bool = False, settings: SolverSettings = SolverSettings(),
                      basis: RowBasis | None = None,
                      start: tuple[torch.Tensor, torch.Tensor] | None = None) -> LinearFit:
    """Multinomial logistic regression for every penalty in weight_decays, to convergence.

    Zero init, or `start` (a LinearFit's, on the same basis); deterministic. For two classes the
    softmax's two weight vectors share the penalty, which makes it scikit-learn's binomial model with
    C = 2 / (lambda * n); else C = 1 / (lambda * n).
    """
    basis = basis or row_basis(z)
    Q = _scaled_rows(basis, z.shape[1]) if l2_normalize else basis.Q
    e = (Q * Q).sum(0) if l2_normalize else basis.e
    if settings.tol < FLOAT32_MIN_TOL:  # float32 matmuls cannot resolve such small gradients
        Q = Q.double()
    w, b, iters, conv, loss, gnorm = _lbfgs(Q, e.to(settings.dtype), y,
                                     torch.tensor(weight_decays, dtype=settings.dtype, device=Q.device),
                                     n_classes, settings, start)
    return LinearFit(basis.to_features(w.to(basis.Q.dtype)), b.to(basis.Q.dtype), iters, conv, loss, (w, b), gnorm)


def fit_ridge_grid(z: torch.Tensor, y: torch.Tensor, *, weight_decays: list[float], l2_normalize: bool = False,
                   basis: RowBasis | None = None) -> LinearFit:
    """Least squares with penalty lambda/2 ||w||^2 on the mean squared error, closed form, per penalty (float64)."""
    basis = basis or row_basis(z)
    Q = (_scaled_rows(basis, z.shape[1]) if l2_normalize else basis.Q).double()
    t = y.double()
    q_mean, t_mean = Q.mean(0), t.mean()
    Qc = Q - q_mean
    ev, P = torch.linalg.eigh(Qc.T @ Qc)
    proj = P.T @ (Qc.T @ (t - t_mean))
    n = len(t)
    ws, bs = [], []
    for lam in weight_decays:  # minimise ||Qc w - t_c||^2 / n + lam / 2 ||w||^2
        w = P @ (proj / (ev.clamp_min(0) + n * lam / 2))
        ws.append(w)
        bs.append(t_mean - q_mean @ w)
    W = torch.stack(ws)[..., None]  # (H, r, 1)
    H = len(weight_decays)
    resid = torch.stack([((Q @ W[h, :, 0] + bs[h]) - t).pow(2).mean() for h in range(H)])
    lam = torch.tensor(weight_decays, dtype=Q.dtype, device=Q.device)
    return LinearFit(basis.to_features(W.to(z.dtype)), torch.stack(bs)[:, None].to(z.dtype),
                     torch.ones(H, dtype=torch.long), torch.ones(H, dtype=torch.bool),
                     resid + lam / 2 * W.pow(2).sum((1, 2)))


class _Objective:
    """Mean cross-entropy + lambda/2 ||w||^2 of live heads, in preconditioned coordinates x = w * sqrt(h).

    The two matmuls run in Q's precision; everything after the logits (softmax, losses, gradients, the
    L-BFGS state) in x's, float64: near a separating solution the per-row losses fall below float32's
    resolution, the Armijo test would then fail on rounding and the steps stall.
    """

    def __init__(self, Q: torch.Tensor, y: torch.Tensor, n_classes: int, dtype: torch.dtype) -> None:
        self.Q, self.n, self.r, self.C = Q, Q.shape[0], Q.shape[1], n_classes
        self.onehot = torch.nn.functional.one_hot(y, n_classes).to(dtype)

    def __call__(self, x: torch.Tensor, lam: torch.Tensor, sq: torch.Tensor):
        """(objective (H,), gradient in x (H, r+1, C), gradient in w (H, r+1, C)); the last row is the bias."""
        n, r, C, H = self.n, self.r, self.C, x.shape[0]
        w = x / sq[..., None]
        wq = w[:, :r].permute(1, 0, 2).reshape(r, H * C).to(self.Q.dtype)
        logits = (self.Q @ wq).view(n, H, C).to(x.dtype) + w[:, r][None]
        top = logits.amax(-1, keepdim=True)
        ex = (logits - top).exp()
        se = ex.sum(-1, keepdim=True)  # one exp for loss and softmax: logsumexp + softmax were slow on few classes
        lse = (top + se.log())[..., 0]
        f = (lse - (logits * self.onehot[:, None]).sum(-1)).mean(0) + 0.5 * lam * w[:, :r].pow(2).sum((1, 2))
        G = (ex / se - self.onehot[:, None]) / n  # (n, H, C)
        gq = (self.Q.T @ G.reshape(n, H * C).to(self.Q.dtype)).to(x.dtype)
        gw = gq.view(r, H, C).permute(1, 0, 2) + lam[:, None, None] * w[:, :r]
        g = torch.cat([gw, G.sum(0)[:, None]], 1)
        return f, g / sq[..., None], g


def _lbfgs(Q: torch.Tensor, e: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, n_classes: int,
           s: SolverSettings, start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """Batched L-BFGS; (w (H, r, C), b (H, C), iterations, converged, objective, gradient 2-norm), in input order."""
    n, r = Q.shape
    H, C, dt, dev = len(lam), n_classes, s.dtype, Q.device
    penalty = lam.clamp_min(s.floor)[:, None]
    h = torch.cat([s.curvature * e[None, :] / n + penalty, torch.full((H, 1), s.curvature, dtype=dt, device=dev)], 1)
    sq_all = h.sqrt()  # (H, r+1): preconditioned coordinate x = w * sq
    objective = _Objective(Q, y, C, dt)
    live = torch.arange(H, device=dev)
    x = torch.zeros(H, r + 1, C, dtype=dt, device=dev)
    if start is not None:
        x = torch.cat([start[0], start[1][:, None]], 1).to(dt) * sq_all[..., None]
    out_w, out_f = torch.zeros_like(x), torch.zeros(H, dtype=dt, device=dev)
    out_g = torch.zeros(H, dtype=dt, device=dev)
    iters = torch.zeros(H, dtype=torch.long)
    converged = torch.zeros(H, dtype=torch.bool)
    lam_l, sq = lam, sq_all
    f, g, graw = objective(x, lam_l, sq)
    mem = _Memory(s.memory, len(live), dt, dev)
    it = 0
    while len(live) and it < s.max_iter:
        it += 1
        p = -mem.apply(g)
        gp = (g * p).sum((1, 2))
        uphill = gp >= 0  # a stale memory can give a non-descent direction: restart that head along -g
        if uphill.any():
            p[uphill] = -g[uphill]
            gp = (g * p).sum((1, 2))
        t = torch.ones(len(live), dtype=dt, device=dev)
        for _ in range(40):  # Armijo backtracking, per head
            x_new = x + t[:, None, None] * p
            f_new, g_new, graw_new = objective(x_new, lam_l, sq)
            ok = f_new <= f + 1e-4 * t * gp
            if bool(ok.all()):
                break
            t = torch.where(ok, t, t * 0.5)
        mem.push(x_new - x, g_new - g)
        x, f, g, graw = x_new, f_new, g_new, graw_new
        done = graw.abs().amax((1, 2)) <= s.tol
        stalled = ~ok | (t < 1e-10)  # no usable step length gives a decrease: at the precision limit
        finished = done | stalled
        if bool(finished.any()):
            ids = live[finished]
            out_w[ids] = x[finished] / sq[finished][..., None]
            out_f[ids] = f[finished]
            out_g[ids] = graw[finished].flatten(1).norm(dim=1)
            iters[ids.cpu()] = it
            converged[ids.cpu()] = done[finished].cpu()
            keep = ~finished
            live, x, f, g, graw, lam_l, sq = (v[keep] for v in (live, x, f, g, graw, lam_l, sq))
            mem.keep(keep)
    if len(live):
        out_w[live] = x / sq[..., None]
        out_f[live] = f
        out_g[live] = graw.flatten(1).norm(dim=1)
        iters[live.cpu()] = it
    return out_w[:, :r], out_w[:, r], iters, converged, out_f, out_g


class _Memory:
    """The L-BFGS pairs of every head. A head whose new pair fails the curvature test (s.y > 0) stores a
    zero pair (rho 0: no effect), so one head's flat stretch never freezes the others' memories."""

    def __init__(self, size: int, heads: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = size
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []
        self.rho: list[torch.Tensor] = []
        self.gamma = torch.ones(heads, dtype=dtype, device=device)  # initial Hessian scale s.y / y.y

    def push(self, step: torch.Tensor, dg: torch.Tensor) -> None:
        sy, yy = (step * dg).sum((1, 2)), (dg * dg).sum((1, 2))
        valid = (sy > 1e-10 * yy) & (yy > 0)
        self.S.append(torch.where(valid[:, None, None], step, torch.zeros_like(step)))
        self.Y.append(torch.where(valid[:, None, None], dg, torch.zeros_like(dg)))
        self.rho.append(torch.where(valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), torch.zeros_like(sy)))
        self.gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), self.gamma)
        if len(self.S) > self.size:
            self.S.pop(0)
            self.Y.pop(0)
            self.rho.pop(0)

    def keep(self, mask: torch.Tensor) -> None:
        self.S, self.Y, self.rho = ([v[mask] for v in lst] for lst in (self.S, self.Y, self.rho))
        self.gamma = self.gamma[mask]

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """Two-loop recursion, per head (dim 0): an approximation of H^-1 g."""
        q = g.clone()
        alpha = []
        for ss, yy, rh in zip(reversed(self.S), reversed(self.Y), reversed(self.rho)):
            a = rh * (ss * q).sum((1, 2))
            q -= a[:, None, None] * yy
            alpha.append(a)
        q *= self.gamma[:, None, None]
        for ss, yy, rh, a in zip(self.S, self.Y, self.rho, reversed(alpha)):
            q += (a - rh * (yy * q).sum((1, 2)))[:, None, None] * ss
        return q
