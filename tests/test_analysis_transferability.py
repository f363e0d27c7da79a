"""LogME, NLEEP, H-score and kNN accuracy against textbook implementations written from the papers' formulas."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from pipeline.analysis.transferability import (feature_basis, h_score, knn_accuracy, leep_from_posteriors,
                                               ledoit_wolf_shrinkage, logme, nleep)


def _data(n, d, c=3, seed=0, signal=1.5):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    X = rng.normal(size=(c, d))[y] * signal + rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    return X, y


# -- LogME (You et al. 2021) ---------------------------------------------------------------------
def _log_evidence(F, y, alpha, beta):
    """log p(y | F, alpha, beta): the marginal of y = F w + e, w ~ N(0, I/alpha), e ~ N(0, I/beta), in closed form."""
    n = len(y)
    cov = np.eye(n) / beta + F @ F.T / alpha
    return stats.multivariate_normal(mean=np.zeros(n), cov=cov).logpdf(y)


def _logme_reference(F, labels):
    """The paper's definition by brute force: maximise the closed-form evidence over (alpha, beta) numerically."""
    out = []
    for c in np.unique(labels):
        y = (labels == c).astype(float)
        res = optimize.minimize(lambda p: -_log_evidence(F, y, np.exp(p[0]), np.exp(p[1])), x0=[0.0, 0.0],
                                method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-11, "maxiter": 4000})
        out.append(-res.fun / len(y))
    return float(np.mean(out))


@pytest.mark.parametrize("n,d", [(40, 6), (25, 60)])  # more rows than dims, and fewer (the Gram path)
def test_logme_equals_the_maximised_closed_form_evidence(n, d):
    X, y = _data(n, d, seed=n)
    X = X - X.mean(0)  # centred like the standardised features scored in the report
    assert logme(X, y) == pytest.approx(_logme_reference(X, y), rel=1e-5, abs=1e-6)


def test_logme_with_labels_outside_the_feature_span_has_the_known_answer():
    """y orthogonal to every feature: the evidence is maximal with w = 0 (alpha -> inf), beta = n / ||y||^2,
    so LogME = -(1/2) (log(2 pi ||y||^2 / n) + 1) per class."""
    n = 12
    y = np.array([0, 1] * (n // 2))
    ones = (y == 1).astype(float)
    F = np.zeros((n, 2))
    F[0, 0], F[2, 0] = 1.0, -1.0  # +1 and -1 on two rows of the same class: orthogonal to both one-hot columns
    F[1, 1], F[3, 1] = 1.0, -1.0
    assert abs(F.T @ ones).max() == 0 and abs(F.T @ (1 - ones)).max() == 0
    per_class = [-0.5 * (np.log(2 * np.pi * (col @ col) / n) + 1) for col in (ones, 1 - ones)]
    assert logme(F, y) == pytest.approx(np.mean(per_class), abs=1e-6)


def test_logme_ranks_informative_features_above_noise():
    X, y = _data(300, 20, seed=1, signal=2.0)
    noise = np.random.default_rng(9).normal(size=X.shape)
    assert logme(X, y) > logme(noise, y)


# -- H-score (Bao et al. 2019) and its shrinkage form (Ibrahim et al. 2023) ---------------------
def _h_reference(F, labels, shrink=None):
    """tr(cov(f)^-1 cov(E[f|y])) with d x d matrices, as in the paper; cov with 1/n; pinv or a shrunk inverse."""
    Fc = F - F.mean(0)
    n, d = Fc.shape
    cov_f = Fc.T @ Fc / n
    g = np.zeros_like(Fc)
    for c in np.unique(labels):
        g[labels == c] = Fc[labels == c].mean(0)
    cov_g = g.T @ g / n
    if shrink is None:
        return float(np.trace(np.linalg.pinv(cov_f, rcond=1e-12) @ cov_g))
    target = np.trace(cov_f) / d * np.eye(d)
    return float(np.trace(np.linalg.inv((1 - shrink) * cov_f + shrink * target) @ cov_g))


@pytest.mark.parametrize("n,d", [(60, 8), (30, 50)])
def test_h_score_matches_the_d_by_d_formula(n, d):
    from sklearn.covariance import ledoit_wolf_shrinkage as sk_shrinkage

    X, y = _data(n, d, seed=d)
    a = sk_shrinkage(X)
    assert ledoit_wolf_shrinkage(feature_basis(X)) == pytest.approx(a, rel=1e-9)
    assert h_score(X, y) == pytest.approx(_h_reference(X, y, shrink=a), rel=1e-8)
    assert h_score(X, y, shrinkage=False) == pytest.approx(_h_reference(X, y), rel=1e-6)


def test_plain_h_score_saturates_when_dims_reach_rows():
    """With d >= n - 1 the unshrunk score is classes - 1 whatever the features: why shrinkage is the default."""
    X, y = _data(20, 40, c=4, seed=3)
    noise = np.random.default_rng(0).normal(size=X.shape)
    assert h_score(X, y, shrinkage=False) == pytest.approx(3.0) == h_score(noise, y, shrinkage=False)


def test_h_score_ranks_informative_features_above_noise():
    X, y = _data(300, 10, c=4, seed=4, signal=1.0)
    noise = np.random.default_rng(0).normal(size=X.shape)
    assert h_score(X, y) > h_score(noise, y) and h_score(X, y, shrinkage=False) > h_score(noise, y, shrinkage=False)


# -- NLEEP (Li et al. 2021) ------------------------------------------------------------------------
def _leep_reference(theta, y):
    """(1/n) sum_i log sum_z P(y_i|z) theta_iz, P(y, z) = (1/n) sum_{i: y_i = y} theta_iz, loops as in the paper."""
    n, Z = theta.shape
    classes = np.unique(y)
    joint = np.zeros((len(classes), Z))
    for i in range(n):
        joint[np.searchsorted(classes, y[i])] += theta[i] / n
    total = 0.0
    for i in range(n):
        row = np.searchsorted(classes, y[i])
        total += np.log(sum(joint[row, z] / joint[:, z].sum() * theta[i, z] for z in range(Z)))
    return total / n


def test_nleep_is_leep_of_the_gaussian_mixture_posteriors():
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    X, y = _data(90, 12, seed=5)
    Xc = X - X.mean(0)
    pca = PCA(n_components=0.8, svd_solver="full").fit(Xc)
    Z = pca.transform(Xc)
    gmm = GaussianMixture(n_components=15, covariance_type="diag", random_state=0, reg_covar=1e-6).fit(Z)
    expected = _leep_reference(gmm.predict_proba(Z), y)
    assert nleep(X, y, seed=0) == pytest.approx(expected, rel=1e-4)


def test_leep_from_posteriors_matches_the_loop_formula():
    rng = np.random.default_rng(2)
    theta = rng.dirichlet(np.ones(7), size=50)
    y = rng.integers(0, 4, 50)
    assert leep_from_posteriors(theta, y, 4) == pytest.approx(_leep_reference(theta, y), rel=1e-12)


# -- kNN accuracy --------------------------------------------------------------------------------
def test_knn_accuracy_equals_scikit_learn_cosine_knn():
    from sklearn.neighbors import KNeighborsClassifier

    X, y = _data(200, 10, seed=7, signal=0.7)
    ref = KNeighborsClassifier(n_neighbors=5, metric="cosine", algorithm="brute").fit(X[:150], y[:150])
    assert knn_accuracy(X[:150], y[:150], X[150:], y[150:], k=5) == pytest.approx(ref.score(X[150:], y[150:]))


def test_scores_refuse_a_single_class():
    X, _ = _data(30, 5)
    with pytest.raises(ValueError, match="at least two classes"):
        logme(X, np.zeros(30))


def test_knn_accuracy_is_invariant_to_a_relabelling_of_the_classes():
    """Vote ties go to the tied class with the nearer neighbours (as the kNN probe head), not the first name."""
    X, y = _data(400, 8, c=6, seed=3, signal=0.4)
    names = np.array([f"class{i}" for i in range(6)])
    rng = np.random.default_rng(0)
    scores = set()
    for _ in range(6):
        perm = names[rng.permutation(6)]  # one to one: only the names (and so their order) change
        scores.add(knn_accuracy(X[:300], perm[y[:300]], X[300:], perm[y[300:]], k=4))
    assert len(scores) == 1, scores


def test_knn_accuracy_predicts_as_the_knn_probe_head_does_on_vote_ties():
    """The score and the head implement one rule (most votes, then the nearer neighbours): every held-out row,
    labelled with the head's prediction, scores 1.0. k=4 over 4 classes makes vote ties common. Rows that
    the head's float16 bank could order differently (a neighbour within 2e-3 of the next) are left out."""
    import torch

    from pipeline.probes.heads import KNNProbe

    X, y = _data(1500, 8, c=4, seed=5, signal=0.3)
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    bank, q, k = X[:400], X[400:], 4
    sims = -np.sort(-(q @ bank.T), 1)[:, :k + 1]
    q = q[(-np.diff(sims, axis=1)).min(1) > 2e-3]
    head = KNNProbe(8, 4, k=k).set_bank(torch.from_numpy(bank).float(), torch.from_numpy(y[:400]))
    pred = head.logits(torch.from_numpy(q).float()).argmax(1).numpy()
    votes = np.sort(np.eye(4)[y[:400]][np.argsort(-(q @ bank.T), 1)[:, :k]].sum(1), 1)
    assert (votes[:, -1] == votes[:, -2]).sum() >= 10, "too few vote ties to tell the rules apart"
    assert knn_accuracy(bank, y[:400], q, pred, k=k) == 1.0
    assert knn_accuracy(bank, y[:400], q, (pred + 1) % 4, k=k) == 0.0
