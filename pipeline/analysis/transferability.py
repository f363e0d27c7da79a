"""Transferability scores of a feature layer for a labelled task, without training a probe: LogME, NLEEP, H-score, kNN.

All take training features (rows x dims; the report passes the probes' standardised training rows)
and their class labels; higher is better for each. Wide layers are handled in the rows' own basis
(the eigenvectors of the n x n Gram matrix when dims > rows), which gives the same numbers as the
textbook d x d forms at a fraction of the cost; `FeatureBasis` computes it once for all scores.

- LogME (You et al., ICML 2021): the maximum log evidence, per row, of a Bayesian linear regression
  from the features to each one-hot label column, averaged over classes; alpha (prior precision)
  and beta (noise precision) by MacKay's fixed-point updates.
- NLEEP (Li et al., CVPR 2021): LEEP with a Gaussian mixture on the PCA-reduced features (80% of
  the variance, 5 components per class) in place of a source classifier.
- H-score (Bao et al., ICIP 2019): tr(cov(f)^-1 cov(E[f | y])). Its inverse covariance is
  ill-posed when dims approach rows (with dims >= rows - 1 the plain score is always classes - 1),
  so by default the covariance is shrunk towards a multiple of the identity by the Ledoit-Wolf
  weight, as Ibrahim et al. (ICLR 2023) recommend; shrinkage=False gives the original (pseudo-inverse).
- kNN accuracy: cosine k-nearest-neighbour vote of the training rows, scored on held-out rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

NLEEP_VARIANCE = 0.8
NLEEP_COMPONENTS_PER_CLASS = 5
NLEEP_MAX_DIMS = 64  # our caps: a diagonal GMM on at most this many principal components, with at most
NLEEP_MAX_COMPONENTS = 200  # this many components (5 per class of a 1,000-class task would be 5,000), stays cheap
KNN_K = 10


@dataclass(frozen=True)
class FeatureBasis:
    """Thin SVD of the (uncentred) features F = U diag(s) Vt, and of the centred ones, from one Gram matrix each."""

    U: np.ndarray   # (n, k) left singular vectors of F
    s2: np.ndarray  # (k,) squared singular values of F
    Uc: np.ndarray  # (n, kc) left singular vectors of F - mean
    s2c: np.ndarray  # (kc,) squared singular values of F - mean
    n: int
    d: int


def _left_svd(F: np.ndarray, rel_tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    n, d = F.shape
    if d >= n:
        e, U = np.linalg.eigh(F @ F.T)
    else:
        e, V = np.linalg.eigh(F.T @ F)
        keep = e > rel_tol * max(e.max(), 1e-300)
        e, V = e[keep], V[:, keep]
        return (F @ V) / np.sqrt(e), e
    keep = e > rel_tol * max(e.max(), 1e-300)
    return U[:, keep], e[keep]


def feature_basis(features: np.ndarray) -> FeatureBasis:
    F = np.asarray(features, dtype=np.float64)
    U, s2 = _left_svd(F)
    Uc, s2c = _left_svd(F - F.mean(0))
    return FeatureBasis(U, s2, Uc, s2c, *F.shape)


def _codes(labels: Sequence[Any]) -> tuple[np.ndarray, int]:
    codes, classes = pd.factorize(pd.Series(np.asarray(labels, dtype=object)), sort=True)
    if (codes < 0).any():
        raise ValueError(f"{int((codes < 0).sum())} labels are missing; drop those rows first")
    if len(classes) < 2:
        raise ValueError(f"need at least two classes; got {list(classes)}")
    return codes, len(classes)


def logme(features: np.ndarray, labels: Sequence[Any], *, basis: FeatureBasis | None = None,
          max_iter: int = 100, rtol: float = 1e-7) -> float:
    """LogME: mean over classes of max over (alpha, beta) of log p(y_c | F, alpha, beta) / n.

    p(y | F, alpha, beta) = N(y; 0, I / beta + F F^T / alpha), the evidence of y = F w + noise with
    w ~ N(0, I / alpha) and noise ~ N(0, I / beta). Fixed point: gamma = sum_j beta s_j / (alpha +
    beta s_j), alpha = gamma / ||m||^2, beta = (n - gamma) / ||y - F m||^2, with m the posterior mean.
    """
    b = basis or feature_basis(features)
    codes, n_classes = _codes(labels)
    if len(codes) != b.n:
        raise ValueError(f"{len(codes)} labels for {b.n} feature rows")
    Y = np.eye(n_classes)[codes]  # (n, C) one-hot columns
    return float(np.mean([_logme_column(b, Y[:, c], max_iter, rtol) for c in range(n_classes)]))


def _logme_column(b: FeatureBasis, y: np.ndarray, max_iter: int, rtol: float) -> float:
    n, s2 = b.n, b.s2
    x2 = (b.U.T @ y) ** 2
    rest = max(float(y @ y) - float(x2.sum()), 0.0)  # energy of y outside the features' span

    def evidence(log_alpha: float, log_beta: float) -> float:
        alpha, beta = np.exp(log_alpha), np.exp(log_beta)
        t = alpha / beta
        m2 = float(np.sum(s2 * x2 / (s2 + t) ** 2))  # ||m||^2, m the posterior mean of w
        res2 = float(np.sum(x2 * (t / (s2 + t)) ** 2)) + rest  # ||y - F m||^2
        # log|A| of A = alpha I_d + beta F^T F: k eigenvalues alpha + beta s_j, d - k equal to alpha
        logdet = float(np.sum(np.log(alpha + beta * s2))) + (b.d - len(s2)) * log_alpha
        return (b.d * log_alpha + n * log_beta - logdet - beta * res2 - alpha * m2 - n * np.log(2 * np.pi)) / 2

    alpha, beta, converged = 1.0, 1.0, False
    for _ in range(max_iter):  # MacKay's fixed point
        t = alpha / beta
        gamma = float(np.sum(s2 / (s2 + t)))
        m2 = float(np.sum(s2 * x2 / (s2 + t) ** 2))
        res2 = float(np.sum(x2 * (t / (s2 + t)) ** 2)) + rest
        if m2 <= 0 or res2 <= 0 or n - gamma <= 0:
            break
        alpha, beta = gamma / m2, (n - gamma) / res2
        if abs(alpha / beta - t) <= rtol * t:
            converged = True
            break
    x0 = np.clip([np.log(alpha), np.log(beta)], -_LOG_BOUND, _LOG_BOUND)
    if not converged:  # y (almost) inside or orthogonal to the features' span: the maximum is at a bound
        from scipy.optimize import minimize

        x0 = minimize(lambda p: -evidence(*p), x0, method="L-BFGS-B", bounds=[(-_LOG_BOUND, _LOG_BOUND)] * 2).x
    return evidence(*x0) / n


_LOG_BOUND = 40.0  # alpha, beta in [e^-40, e^40]


def h_score(features: np.ndarray, labels: Sequence[Any], *, shrinkage: bool = True,
            basis: FeatureBasis | None = None) -> float:
    """tr(cov(f)^-1 cov(E[f | y])), covariances with 1/n; cov(f) Ledoit-Wolf-shrunk unless shrinkage=False."""
    b = basis or feature_basis(features)
    codes, n_classes = _codes(labels)
    n, d = b.n, b.d
    onehot = np.eye(n_classes)[codes]
    class_mean_u = (onehot.T @ b.Uc) / onehot.sum(0)[:, None]  # (C, kc): class means of each left vector
    between = (onehot.sum(0)[:, None] * class_mean_u ** 2).sum(0)  # ||M u_j||^2, M = class-averaging projection
    eig = b.s2c / n  # eigenvalues of cov(f) on the span
    if not shrinkage:
        return float(np.sum(between))  # pinv: (s_j^2 / n) / (s_j^2 / n) on the span
    a = ledoit_wolf_shrinkage(b)
    mu = eig.sum() / d
    return float(np.sum(eig * between / ((1 - a) * eig + a * mu)))


def ledoit_wolf_shrinkage(b: FeatureBasis) -> float:
    """The Ledoit-Wolf weight of the identity target (scikit-learn's ledoit_wolf_shrinkage), from the n x n Gram."""
    n, d = b.n, b.d
    K = (b.Uc * b.s2c) @ b.Uc.T  # Gram of the centred rows
    trace_s = np.trace(K) / n
    mu = trace_s / d
    delta_ = np.sum(b.s2c ** 2) / n ** 2  # ||S||_F^2
    beta_ = np.sum(np.diag(K) ** 2)  # sum_i ||x_i||^4
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * trace_s + d * mu ** 2) / d
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def nleep(features: np.ndarray, labels: Sequence[Any], *, components_per_class: int = NLEEP_COMPONENTS_PER_CLASS,
          variance: float = NLEEP_VARIANCE, max_dims: int = NLEEP_MAX_DIMS, covariance: str = "diag",
          seed: int = 0, basis: FeatureBasis | None = None) -> float:
    """NLEEP = (1/n) sum_i log sum_v P(y_i | v) P(v | x_i), v the components of a GMM on PCA(features).

    The PCA keeps `variance` of the variance (at most `max_dims` components); the GMM has
    components_per_class x classes components (at most n / 2 and NLEEP_MAX_COMPONENTS), `covariance`
    as in scikit-learn.
    """
    from sklearn.mixture import GaussianMixture

    b = basis or feature_basis(features)
    codes, n_classes = _codes(labels)
    order = np.argsort(b.s2c)[::-1]
    ratio = np.cumsum(b.s2c[order]) / b.s2c.sum()
    keep = min(int(np.searchsorted(ratio, variance) + 1), max_dims, len(order))
    X = b.Uc[:, order[:keep]] * np.sqrt(b.s2c[order[:keep]])  # principal component scores
    k = max(1, min(components_per_class * n_classes, b.n // 2, NLEEP_MAX_COMPONENTS))
    gmm = GaussianMixture(n_components=k, covariance_type=covariance, random_state=seed, reg_covar=1e-6).fit(X)
    return leep_from_posteriors(gmm.predict_proba(X), codes, n_classes)


def leep_from_posteriors(theta: np.ndarray, codes: np.ndarray, n_classes: int) -> float:
    """LEEP of soft assignments theta (n, Z) to latent classes: (1/n) sum_i log sum_z P(y_i | z) theta_iz."""
    joint = np.eye(n_classes)[codes].T @ theta / len(codes)  # P(y, z)
    cond = joint / np.maximum(joint.sum(0, keepdims=True), 1e-300)  # P(y | z)
    return float(np.mean(np.log(np.maximum(np.sum(cond[codes] * theta, axis=1), 1e-300))))


def knn_accuracy(train: np.ndarray, train_labels: Sequence[Any], held_out: np.ndarray,
                 held_out_labels: Sequence[Any], *, k: int = KNN_K, chunk: int = 2048) -> float:
    """Accuracy on held-out rows of a cosine k-nearest-neighbour majority vote over the training rows.

    A tie in votes goes to the tied class whose neighbours have the larger summed similarity (of
    sigmoid(cosine), as the kNN probe head does), not to a class by its name, so that relabelling
    the classes one to one leaves the score unchanged.
    """
    classes, tr = np.unique(np.asarray(train_labels, dtype=object).astype(str), return_inverse=True)
    tr = tr.ravel()
    te = np.asarray(held_out_labels, dtype=object).astype(str)
    bank = _unit(np.asarray(train, dtype=np.float32))
    q = _unit(np.asarray(held_out, dtype=np.float32))
    k = min(k, len(bank))
    correct = 0
    for lo in range(0, len(q), chunk):
        sim = q[lo:lo + chunk] @ bank.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        rows = np.repeat(np.arange(len(top)), k)
        votes = np.zeros((len(top), len(classes)))
        np.add.at(votes, (rows, tr[top].ravel()), 1.0)
        near = np.zeros((len(top), len(classes)))
        np.add.at(near, (rows, tr[top].ravel()), 1.0 / (1.0 + np.exp(-np.take_along_axis(sim, top, 1).ravel())))
        tied = votes == votes.max(1, keepdims=True)
        pred = np.where(tied, near, -np.inf).argmax(1)  # the most votes; among those, the nearest neighbours
        correct += int(np.sum(classes[pred] == te[lo:lo + chunk]))
    return correct / max(len(q), 1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
