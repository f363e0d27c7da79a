"""Recommendations on constructed cases, and from a probe results table."""
from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pandas as pd
import pytest

from pipeline.analysis import FROZEN, FULL, PARTIAL, describe, recommend, recommend_from_results

# the package exports the function `recommend`, which shadows the submodule of the same name
rec_module = importlib.import_module("pipeline.analysis.recommend")
LAYERS = ["stem", "b1", "b2", "b3", "b4", "b5", "head"]


def _curve(values):
    return dict(zip(LAYERS, values))


def test_tiny_data_and_high_accuracy_keeps_features_frozen():
    r = recommend("pets", n_train=400, n_classes=4, layer_accuracy=_curve([.41, .55, .70, .82, .90, .93, .94]))
    assert r.action == FROZEN
    text = " ".join(r.reasons)
    assert "400 training samples (100 per class)" in text and "0.940" in text and "'head'" in text
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.action = FULL  # type: ignore[misc]


def test_lots_of_data_low_accuracy_early_best_layer_fine_tunes_fully():
    r = recommend("retina", n_train=60_000, n_classes=5,
                  layer_accuracy=_curve([.45, .52, .50, .44, .40, .36, .33]))
    assert r.action == FULL
    text = " ".join(r.reasons)
    assert "60,000 training samples (12,000 per class)" in text
    assert "best layer 'b1' is early" in text and "domain shift" in text and "0.520" in text


def test_medium_data_fair_accuracy_fine_tunes_the_last_stages():
    r = recommend("defects", n_train=4_000, n_classes=8,
                  layer_accuracy=_curve([.30, .42, .55, .63, .69, .72, .71]))
    assert r.action == PARTIAL
    assert any("partial fine-tuning fits" in s for s in r.reasons)


def test_medium_data_poor_accuracy_and_early_best_layer_fine_tunes_fully():
    r = recommend("sat", n_train=5_000, n_classes=10, layer_accuracy=_curve([.40, .50, .47, .43, .40, .38, .35]))
    assert r.action == FULL


def test_small_data_poor_accuracy_with_domain_shift_takes_the_smallest_step():
    shifted = recommend("xray", n_train=600, n_classes=3, layer_accuracy=_curve([.45, .52, .50, .44, .40, .36, .33]))
    assert shifted.action == PARTIAL and "overfitting" in shifted.reasons[-1]
    flat = recommend("xray", n_train=600, n_classes=3, layer_accuracy=_curve([.30, .35, .40, .45, .50, .52, .55]))
    assert flat.action == FROZEN  # poor, but the last layer is best: no sign the backbone is the problem
    assert "fall short" in flat.reasons[-1] and "label more data" in flat.reasons[-1]  # not "enough"


def test_many_classes_with_few_samples_each_count_as_small_data():
    r = recommend("birds", n_train=20_000, n_classes=400, layer_accuracy=_curve([.1, .2, .3, .4, .5, .55, .58]))
    assert r.action == FROZEN and "(50 per class)" in r.reasons[0]


def test_large_data_good_accuracy_stays_frozen_unless_the_late_layers_lag():
    good = recommend("cifar", n_train=50_000, n_classes=10, layer_accuracy=_curve([.4, .6, .7, .8, .88, .92, .93]))
    assert good.action == FROZEN
    lag = recommend("cifar", n_train=50_000, n_classes=10, layer_accuracy=_curve([.4, .6, .86, .85, .8, .76, .74]))
    assert lag.action == PARTIAL


def test_target_accuracy_and_leep_enter_the_reasons():
    # 0.72 of a 0.75 target is 0.96 of the target: good
    r = recommend("t", n_train=3_000, n_classes=3, layer_accuracy=_curve([.5, .6, .65, .68, .7, .71, .72]),
                  target_accuracy=0.75, relative_leep=0.1, leep=-1.2)
    assert r.action == FROZEN
    text = " ".join(r.reasons)
    assert "0.96 of the 0.750 target" in text and "relative LEEP 0.10 (LEEP -1.200)" in text
    assert f"below {rec_module.LOW_RELATIVE_LEEP:.2f}" in text
    # a distant source (low LEEP) tips a small, poor task into the smallest adaptation step
    small = recommend("t", n_train=500, n_classes=5, layer_accuracy=_curve([.2, .3, .35, .4, .42, .44, .45]),
                      relative_leep=0.1)
    assert small.action == PARTIAL
    assert "fine-tune" in describe(small) and describe(small).startswith("t: ")


def test_thresholds_are_documented_constants():
    names = ["FROZEN_MAX_TRAIN", "FULL_MIN_TRAIN", "FROZEN_MIN_PER_CLASS", "FINETUNE_MIN_PER_CLASS",
             "GOOD_PROBE_FRACTION", "POOR_PROBE_FRACTION", "LAYER_GAP", "LOW_RELATIVE_LEEP"]
    for name in names:
        assert isinstance(getattr(rec_module, name), (int, float))
    with pytest.raises(ValueError, match="no layer accuracy"):
        recommend("t", n_train=10, layer_accuracy={"a": float("nan")})


def test_from_a_probe_results_table_selects_on_validation_and_quotes_test():
    rows = []
    # "easy": l3 is best on validation, l2 on test: l3 must be chosen, its test figure quoted
    for task, n_train, n_cls, vals, tests in [("easy", 300, 3, [.5, .8, .95], [.5, .97, .93]),
                                              ("hard", 40_000, 4, [.6, .5, .3], [.6, .5, .3])]:
        for layer, val, test in zip(["l1", "l2", "l3"], vals, tests):
            for head, selected in [("linear", True), ("mlp", False)]:
                rows.append({"task": task, "task_type": "classification", "layer": layer, "few_shot": np.nan,
                             "head": head, "selected": selected, "status": "ok", "n_train": n_train,
                             "n_classes": n_cls, "val_accuracy": val if selected else 0.99,
                             "test_accuracy": test if selected else 0.99})
    rows.append({"task": "age", "task_type": "regression", "layer": "l1", "few_shot": np.nan, "head": "linear",
                 "selected": True, "status": "ok", "n_train": 100, "n_classes": np.nan, "val_accuracy": np.nan,
                 "test_accuracy": np.nan})
    rows.append({"task": "easy", "task_type": "classification", "layer": "l3", "few_shot": 5, "head": "linear",
                 "selected": True, "status": "ok", "n_train": 15, "n_classes": 3, "val_accuracy": 1.0,
                 "test_accuracy": 0.1})
    recs = recommend_from_results(pd.DataFrame(rows), ["l1", "l2", "l3"], relative_leep={"hard": 0.05})
    assert [(r.task, r.action, r.best_layer) for r in recs] == [("easy", FROZEN, "l3"), ("hard", FULL, "l1")]
    easy = " ".join(recs[0].reasons)
    assert "validation accuracy 0.950 on layer 'l3' (test accuracy 0.930, reported once)" in easy
    assert "relative LEEP 0.05" in " ".join(recs[1].reasons)


def test_a_score_that_ranks_layers_like_validation_is_used_and_named():
    acc = _curve([.50, .62, .70, .74, .73, .69, .66])  # best in the middle, 8 points above the last layer
    agrees = {"logme": _curve([-1.0, -.9, -.8, -.7, -.72, -.75, -.8]), "h_score": _curve([7, 6, 5, 4, 3, 2, 1])}
    r = recommend("t", n_train=5_000, n_classes=5, layer_accuracy=acc, layer_scores=agrees)
    assert r.score_used == "logme" and r.best_layer == "b3"
    assert "LogME ranks the layers like the probes" in " ".join(r.reasons) and "'b3' (middle) first" in " ".join(r.reasons)
    none = recommend("t", n_train=5_000, n_classes=5, layer_accuracy=acc, layer_scores={"h_score": agrees["h_score"]})
    assert none.score_used is None and "none is used" in " ".join(none.reasons)
    # a trusted score that also puts the best layer before the last ones tips a borderline gap into "shifted"
    small_gap = _curve([.50, .62, .70, .745, .73, .72, .71])  # 3.5 points: under LAYER_GAP alone
    alone = recommend("t", n_train=5_000, n_classes=5, layer_accuracy=small_gap)
    backed = recommend("t", n_train=5_000, n_classes=5, layer_accuracy=small_gap,
                       layer_scores={"nleep": _curve([1, 2, 3, 4, 3.5, 3.2, 3.0])})
    assert "domain shift" not in " ".join(alone.reasons)
    assert backed.score_used == "nleep" and "not the last ones" in " ".join(backed.reasons)
    assert "0.035 gap to the last layer" in " ".join(backed.reasons) and "domain shift" in " ".join(backed.reasons)


def test_the_source_logits_are_not_the_last_feature_layer():
    """The demo's case: ImageNet logits probed after bn2 lag the best layer by 4 points; bn2 only by 2."""
    acc = {"b1": .90, "b2": .96, "b4": .99, "b6": .985, "bn2": .97, "classifier": .949}
    logme = {"logme": {"b1": 1.0, "b2": 2.0, "b4": 4.0, "b6": 3.5, "bn2": 3.0}}  # agrees: the gap's support
    as_layer = recommend("digit", n_train=1_000, n_classes=10, layer_accuracy=acc, layer_scores=logme)
    assert as_layer.action == PARTIAL and "domain shift" in " ".join(as_layer.reasons)  # a false alarm
    r = recommend("digit", n_train=1_000, n_classes=10, layer_accuracy=acc, layer_scores=logme,
                  logit_layers=["classifier"])
    text = " ".join(r.reasons)
    assert r.action == FROZEN and "domain shift" not in text and r.best_layer == "b4"
    assert "layer 3 of 5 feature layers); the last feature layer 'bn2' scores 0.970" in text
    best_on_logits = recommend("t", n_train=5_000, n_classes=10, logit_layers=["classifier"],
                               layer_accuracy={"b1": .5, "b2": .6, "bn2": .7, "classifier": .75})
    assert best_on_logits.best_layer == "classifier"
    assert "the source classifier's output, after the last feature layer 'bn2'" in " ".join(best_on_logits.reasons)


def test_too_few_layers_to_rank_scores_is_said_as_such():
    r = recommend("t", n_train=5_000, n_classes=5, layer_accuracy={"a": .6, "b": .7},
                  layer_scores={"logme": {"a": 1.0, "b": 2.0}})
    assert r.score_used is None and "too few feature layers with transferability scores (under 3)" in " ".join(r.reasons)
    assert "Kendall tau below" not in " ".join(r.reasons)


def test_probes_selected_on_another_metric_choose_the_layer_by_it():
    """Probes selected on balanced accuracy: the report's best layer and the recommendation's agree."""
    rows = [{"task": "rare", "task_type": "classification", "layer": layer, "few_shot": np.nan, "head": "linear",
             "selected": True, "status": "ok", "n_train": 2_000, "n_classes": 4, "val_accuracy": acc,
             "test_accuracy": acc, "selection_metric": "balanced_accuracy", "val_score": bal}
            for layer, acc, bal in [("l1", .70, .40), ("l2", .90, .55), ("l3", .88, .72)]]
    (rec,) = recommend_from_results(pd.DataFrame(rows), ["l1", "l2", "l3"])
    assert rec.best_layer == "l3"  # l2 by accuracy
    assert "validation accuracy 0.880 on layer 'l3' (chosen by validation balanced_accuracy 0.720)" in " ".join(
        rec.reasons)
    (plain,) = recommend_from_results(pd.DataFrame(rows).assign(selection_metric="accuracy"), ["l1", "l2", "l3"])
    assert plain.best_layer == "l2"
