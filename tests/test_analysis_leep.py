"""LEEP: a hand-computed example, informative vs shuffled logits, numerical edge cases, the store path."""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_analysis_cka import write_store

from pipeline.analysis import leep, leep_chance, relative_leep, store_leep

# Four images, two source classes z1 z2, two target labels a b. theta = softmax(logits) per image:
THETA = np.array([[0.8, 0.2],   # a
                  [0.6, 0.4],   # a
                  [0.3, 0.7],   # b
                  [0.1, 0.9]])  # b
LABELS = ["a", "a", "b", "b"]
# P(y, z) = (1/4) sum_i theta_iz [y_i = y]:  P(a,z1) = 1.4/4 = .35  P(a,z2) = .6/4 = .15
#                                            P(b,z1) = 0.4/4 = .10  P(b,z2) = 1.6/4 = .40
# P(z1) = .45, P(z2) = .55  ->  P(a|z1) = 7/9, P(a|z2) = 3/11, P(b|z1) = 2/9, P(b|z2) = 8/11
# EEP_1 = .8 * 7/9 + .2 * 3/11 = 67/99     EEP_2 = .6 * 7/9 + .4 * 3/11 = 57/99
# EEP_3 = .3 * 2/9 + .7 * 8/11 = 57/99     EEP_4 = .1 * 2/9 + .9 * 8/11 = 67/99
EXPECTED = (2 * math.log(67 / 99) + 2 * math.log(57 / 99)) / 4  # = -0.471248


def test_hand_computed_example():
    assert EXPECTED == pytest.approx(-0.471248, abs=1e-6)
    assert leep(np.log(THETA), LABELS) == pytest.approx(EXPECTED, abs=1e-12)
    assert leep(np.log(THETA) + 123.0, LABELS) == pytest.approx(EXPECTED, abs=1e-12)  # softmax is shift-free
    assert leep(THETA, LABELS, from_probs=True) == pytest.approx(EXPECTED, abs=1e-12)
    # any hashable labels; only their identity matters
    assert leep(np.log(THETA), [("x", 1), ("x", 1), 7, 7]) == pytest.approx(EXPECTED, abs=1e-12)


def test_chance_level_and_relative_scale():
    labels = ["a", "a", "a", "b"]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert leep_chance(labels) == pytest.approx(-h)
    # an uninformative source (same theta for every image) scores exactly -H(Y)
    assert leep(np.tile([[2.0, -1.0, 0.5]], (4, 1)), labels) == pytest.approx(-h, abs=1e-12)
    assert relative_leep(np.tile([[2.0, -1.0, 0.5]], (4, 1)), labels) == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < relative_leep(np.log(THETA), LABELS) < 1.0


def test_informative_logits_beat_shuffled_ones():
    rng = np.random.default_rng(0)
    n, n_src, n_tgt = 3000, 50, 5
    y = rng.integers(0, n_tgt, n)
    logits = rng.normal(size=(n, n_src))
    logits[np.arange(n), y * 7 + rng.integers(0, 3, n)] += 4.0  # each target class maps to a few source classes
    informative = leep(logits, y)
    shuffled = leep(rng.permutation(logits), y)
    assert informative > shuffled + 0.5
    assert shuffled == pytest.approx(leep_chance(y), abs=0.05)
    assert relative_leep(logits, y) > 0.3 > relative_leep(rng.permutation(logits), y)


def test_extreme_logits_stay_finite():
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [1e4, -1e4, 0.0]])  # z3 never predicted
    value = leep(logits, [0, 1, 0])
    assert math.isfinite(value) and value == pytest.approx(0.0, abs=1e-9)  # z determines y exactly
    assert math.isfinite(leep(logits.astype(np.float16), [0, 1, 1]))


def test_input_errors():
    with pytest.raises(ValueError, match="missing"):
        leep(np.zeros((3, 2)), ["a", None, "b"])
    with pytest.raises(ValueError, match="logits must be"):
        leep(np.zeros((3, 2)), ["a", "b"])


def test_store_leep_reads_a_classifier_layer(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 10)).astype(np.float32)
    logits[np.arange(150), y] += 3.0
    labels = [int(v) if i % 10 else None for i, v in enumerate(y)]  # every 10th row unlabelled
    store = write_store(str(tmp_path / "s"), {"classifier": logits, "pooled": rng.normal(size=(150, 4))},
                        {"task": labels})
    keep = [i for i, v in enumerate(labels) if v is not None]
    assert store_leep(store, "task") == pytest.approx(leep(logits[keep], [labels[i] for i in keep]), abs=1e-9)
