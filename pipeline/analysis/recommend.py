"""Frozen features, partial or full fine-tuning: the textbook decision framework applied to probe evidence.

The thresholds are named constants; each says which background text (shared/reference/*.txt, by file
number) it comes from, or that it is our own choice where the texts give no number.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

log = logging.getLogger(__name__)

FROZEN = "keep the backbone frozen"
PARTIAL = "fine-tune the last stages"
FULL = "fine-tune fully"

# Target data size. 001: feature extraction suits "fewer than approximately one thousand images",
# partial fine-tuning "one thousand to ten thousand", full fine-tuning "more than ten thousand";
# 004's decision table also favours frozen below 1,000 examples.
FROZEN_MAX_TRAIN = 1_000
FULL_MIN_TRAIN = 10_000
# Per class. 003's data-requirements table: feature extraction 100+ per class, fine-tuning 500+.
FROZEN_MIN_PER_CLASS = 100
FINETUNE_MIN_PER_CLASS = 500
# Frozen linear-probe accuracy as a fraction of the target accuracy. 004's decision table: a probe at
# 80% of target favours frozen features, below 60% of target favours fine-tuning.
GOOD_PROBE_FRACTION = 0.80
POOR_PROBE_FRACTION = 0.60
# Where the best layer sits. 000 and 004 map domain similarity to the best extraction layer: very high
# -> penultimate, moderate -> middle, low -> early layers. We cut the depth into thirds.
EARLY_MAX_POSITION = 1 / 3
LATE_MIN_POSITION = 2 / 3
# Our choice: an earlier layer beating the last one by 5 accuracy points is read as the late layers
# being source-specific. For scale, 004 reports frozen-vs-fine-tuned gaps of 4-8 points on
# ImageNet-like targets and 21 points on a domain-shifted one (retinal OCT).
LAYER_GAP = 0.05
# Our choice: the texts (000) say LEEP correlates with transfer but give no absolute scale; below a
# quarter of the label entropy explained (relative LEEP, see leep.relative_leep) we call the source distant.
LOW_RELATIVE_LEEP = 0.25
# Our choice: a transferability score is trusted on this data when it ranks the layers like the probes'
# validation accuracy, with Kendall tau at least this (over 3 or more layers). Published comparisons of
# LEEP, LogME, NLEEP and SFDA report mean weighted tau of 0.4-0.7 against fine-tuned accuracy.
TRUSTED_SCORE_TAU = 0.5


@dataclass(frozen=True)
class Recommendation:
    task: str
    action: str              # FROZEN, PARTIAL or FULL
    reasons: tuple[str, ...]  # human-readable, with the numbers behind each step
    best_layer: str | None = None  # chosen on validation
    score_used: str | None = None  # the transferability score that entered the advice, if any


def _position(layers: Sequence[str], layer: str) -> tuple[float, str]:
    i = list(layers).index(layer)
    pos = i / (len(layers) - 1) if len(layers) > 1 else 1.0
    where = "early" if pos < EARLY_MAX_POSITION else "late" if pos >= LATE_MIN_POSITION else "middle"
    return pos, where


def recommend(task: str, *, n_train: int, layer_accuracy: Mapping[str, float], n_classes: int | None = None,
              samples_per_class: float | None = None, target_accuracy: float = 1.0,
              relative_leep: float | None = None, leep: float | None = None,
              test_accuracy: Mapping[str, float] | None = None,
              layer_scores: Mapping[str, Mapping[str, float]] | None = None,
              logit_layers: Sequence[str] = (), selection: Mapping[str, float] | None = None,
              selection_metric: str = "accuracy") -> Recommendation:
    """One task's recommendation from its frozen-probe evidence.

    `layer_accuracy` maps layer -> validation accuracy of the layer's selected probe, ordered early to
    late: the best layer and every judgement come from it. `test_accuracy` (layer -> test accuracy)
    is only quoted, for the chosen layer. `target_accuracy` is the accuracy you need (1.0 = judge
    raw accuracy). `relative_leep` (0..1) is an optional domain-similarity proxy; `leep` is only
    quoted. `layer_scores` maps a transferability score's name to its value per layer: the one that
    ranks the layers most like validation accuracy (Kendall tau >= TRUSTED_SCORE_TAU) is used as a
    second opinion on where the transferable layers are, and named in the reasons. `logit_layers` are
    the source classifier's outputs (ImageNet logits): they may hold the best probe, but the depth profile
    (where the best layer sits, how far the last layer lags) is over the feature layers alone, the last of
    them being the network's last feature layer; a best probe on the logits counts as late. `selection`
    (layer -> validation `selection_metric`, e.g. balanced accuracy) picks the best layer where the probes
    were selected on another metric than accuracy; the judgements stay in accuracy.
    """
    scores = {k: float(v) for k, v in layer_accuracy.items() if v is not None and v == v}
    if not scores:
        raise ValueError(f"task {task!r}: no layer accuracy to judge")
    layers = list(scores)
    if samples_per_class is None:
        samples_per_class = n_train / n_classes if n_classes else float(n_train)
    chosen = {k: float(v) for k, v in (selection or {}).items() if k in scores and v is not None and v == v}
    best = max(layers, key=lambda name: chosen[name]) if len(chosen) == len(layers) else \
        max(layers, key=lambda name: scores[name])
    depth = [x for x in layers if x not in logit_layers] or layers
    last = depth[-1]
    best_acc, last_acc = scores[best], scores[last]
    frac = best_acc / target_accuracy
    where = "late" if best not in depth else _position(depth, best)[1]
    gap = best_acc - last_acc
    reasons: list[str] = []

    # data size
    if n_train < FROZEN_MAX_TRAIN or samples_per_class < FROZEN_MIN_PER_CLASS:
        size = "small"
        reasons.append(f"{n_train:,} training samples ({samples_per_class:,.0f} per class): under {FROZEN_MAX_TRAIN:,} "
                       f"samples or {FROZEN_MIN_PER_CLASS} per class, the range where training only a head on "
                       f"frozen features avoids overfitting")
    elif n_train >= FULL_MIN_TRAIN and samples_per_class >= FINETUNE_MIN_PER_CLASS:
        size = "large"
        reasons.append(f"{n_train:,} training samples ({samples_per_class:,.0f} per class): at least "
                       f"{FULL_MIN_TRAIN:,} samples and {FINETUNE_MIN_PER_CLASS} per class, enough data to fine-tune the whole network")
    else:
        size = "medium"
        reasons.append(f"{n_train:,} training samples ({samples_per_class:,.0f} per class): between the frozen "
                       f"({FROZEN_MAX_TRAIN:,}; {FROZEN_MIN_PER_CLASS}/class) and full fine-tuning "
                       f"({FULL_MIN_TRAIN:,}; {FINETUNE_MIN_PER_CLASS}/class) ranges, where partial fine-tuning fits")

    # probe quality
    quality = "good" if frac >= GOOD_PROBE_FRACTION else "poor" if frac < POOR_PROBE_FRACTION else "fair"
    of_target = "" if target_accuracy == 1.0 else f" = {frac:.2f} of the {target_accuracy:.3f} target"
    rel = "" if target_accuracy == 1.0 else " of target"
    verdict = {"good": f"at or above {GOOD_PROBE_FRACTION:.2f}{rel}: frozen features already do well",
               "poor": f"below {POOR_PROBE_FRACTION:.2f}{rel}: frozen features fall well short",
               "fair": f"between {POOR_PROBE_FRACTION:.2f} and {GOOD_PROBE_FRACTION:.2f}{rel}: room to gain by "
                       f"adapting"}
    test = (test_accuracy or {}).get(best)
    quoted = "" if test is None or test != test else f" (test accuracy {test:.3f}, reported once)"
    by = f" (chosen by validation {selection_metric} {chosen[best]:.3f})" if chosen and best in chosen and \
        selection_metric != "accuracy" else ""
    reasons.append(f"best frozen probe: validation accuracy {best_acc:.3f} on layer {best!r}{by}{quoted}{of_target}; "
                   f"{verdict[quality]}")

    # layer profile
    shifted = where != "late" and gap >= LAYER_GAP
    from .score_table import MIN_LAYERS_FOR_RANKING as MIN_LAYERS

    used, score_best = _trusted_score(layer_scores, {x: scores[x] for x in depth})
    if best not in depth:
        reasons.append(f"best layer {best!r} is the source classifier's output, after the last feature layer "
                       f"{last!r} ({last_acc:.3f}, {gap:.3f} behind)")
    elif len(depth) > 1:
        reasons.append(f"best layer {best!r} is {where} (layer {depth.index(best) + 1} of {len(depth)} feature "
                       f"layers); the last feature layer {last!r} scores {last_acc:.3f} ({gap:.3f} behind the best)"
                       + ("; late layers look specific to the source task, a sign of domain shift" if shifted
                          else ""))
    if used is not None:
        name, tau = used
        _, score_where = _position(depth, score_best)
        agrees = where != "late" and score_where != "late" and gap > 0
        tipped = agrees and not shifted and gap >= LAYER_GAP / 2
        shifted = shifted or tipped
        reasons.append(f"{_LABEL.get(name, name)} ranks the layers like the probes (Kendall tau {tau:.2f} with "
                       f"validation accuracy) and puts {score_best!r} ({score_where}) first"
                       + ("; it confirms that the transferable features are not the last ones" if agrees else "")
                       + (f", so the {gap:.3f} gap to the last layer (at least {LAYER_GAP / 2:.3f} with this "
                          "support) is read as a sign of domain shift" if tipped else ""))
    elif layer_scores and len([x for x in depth if any(x in v for v in layer_scores.values())]) < MIN_LAYERS:
        reasons.append(f"too few feature layers with transferability scores (under {MIN_LAYERS}) to tell which score ranks "
                       "them like the probes; none is used")
    elif layer_scores:
        reasons.append(f"no transferability score ranks the layers like the probes here (Kendall tau below "
                       f"{TRUSTED_SCORE_TAU:.2f}); none is used")
    leep_low = relative_leep is not None and relative_leep < LOW_RELATIVE_LEEP
    if relative_leep is not None:
        raw = "" if leep is None else f" (LEEP {leep:.3f})"
        reasons.append(f"relative LEEP {relative_leep:.2f}{raw}: the source classifier explains "
                       f"{100 * relative_leep:.0f}% of the label entropy"
                       + (f"; below {LOW_RELATIVE_LEEP:.2f}, the source domain looks distant" if leep_low else ""))

    action, why = _decide(size, quality, shifted, where, leep_low)
    reasons.append(why)
    return Recommendation(task=task, action=action, reasons=tuple(reasons), best_layer=best,
                          score_used=None if used is None else used[0])


_LABEL = {"logme": "LogME", "nleep": "NLEEP", "h_score": "H-score", "knn_accuracy": "kNN accuracy", "leep": "LEEP"}


def _trusted_score(layer_scores: Mapping[str, Mapping[str, float]] | None, accuracy: Mapping[str, float]
                   ) -> tuple[tuple[str, float] | None, str | None]:
    """((name, Kendall tau) of the score that best ranks the layers like validation accuracy, its best layer)."""
    from .score_table import rank_agreement

    best: tuple[str, float] | None = None
    for name, by_layer in (layer_scores or {}).items():
        common = [layer for layer in accuracy if layer in by_layer and by_layer[layer] == by_layer[layer]]
        tau = rank_agreement([by_layer[x] for x in common], [accuracy[x] for x in common])["kendall_tau"]
        if tau == tau and tau >= TRUSTED_SCORE_TAU and (best is None or tau > best[1]):
            best = (name, tau)
    if best is None:
        return None, None
    by_layer = layer_scores[best[0]]  # type: ignore[index]
    return best, max((x for x in accuracy if x in by_layer and by_layer[x] == by_layer[x]), key=lambda x: by_layer[x])


def _decide(size: str, quality: str, shifted: bool, where: str, leep_low: bool) -> tuple[str, str]:
    if size == "small":
        if quality == "poor" and (shifted or leep_low):
            return PARTIAL, ("so: too little data for full fine-tuning, but the frozen features fall short and "
                             "the domain looks shifted; take the smallest adaptation step (last stages, low "
                             "learning rate) and watch validation for overfitting")
        if quality == "poor":
            return FROZEN, ("so: the frozen features fall short, but this little data would overfit a fine-tuned "
                            "backbone and nothing points at the late layers; label more data first, which helps "
                            "more than fine-tuning here")
        return FROZEN, "so: keep the backbone frozen; more labelled data helps more than fine-tuning here"
    if quality == "good" and not shifted:
        return FROZEN, "so: the remaining gap rarely justifies the cost of fine-tuning"
    if size == "large":
        if quality == "good":
            return PARTIAL, "so: accuracy is good but the late layers lag; re-train the last stages"
        return FULL, "so: with this much data, adapt every layer (low learning rate)"
    if quality == "poor" and shifted and where == "early":
        return FULL, ("so: only early layers transfer; the domain differs a lot, so adapt every layer "
                      "(low learning rate, strong regularisation for this data size)")
    return PARTIAL, "so: keep the early layers frozen and fine-tune the later stages"


def full_data_heads(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a probe results table that hold a selected head trained on full data (not few-shot)."""
    return table[(table["status"] == "ok") & table["selected"].astype(bool) & table["few_shot"].isna()]


def recommend_from_results(table: pd.DataFrame, layers: Sequence[str], *, target_accuracy: float = 1.0,
                           relative_leep: Mapping[str, float] | None = None, leep: Mapping[str, float] | None = None,
                           scores: pd.DataFrame | None = None, logit_layers: Sequence[str] = ()
                           ) -> list[Recommendation]:
    """A recommendation per classification task of a probe results table (`ProbeResults.table`).

    Uses each layer's selected head (full data, not few-shot): its validation accuracy to choose and
    judge, its test accuracy only to quote. `layers` gives their early-to-late order (e.g.
    `store.layers`). `scores`: a score_table.layer_scores frame (task, layer, <score columns>).
    Regression tasks are skipped: the framework is phrased in accuracy.
    """
    ok = full_data_heads(table)
    out = []
    for task, g in ok.groupby("task", sort=True):
        if (g["task_type"] == "regression").any():
            log.info("recommend: skipping regression task %r", task)
            continue
        g = g.set_index("layer")
        val, test = g["val_accuracy"].astype(float), g["test_accuracy"].astype(float)
        metric = str(g["selection_metric"].dropna().iloc[0]) if "selection_metric" in g and \
            g["selection_metric"].notna().any() else "accuracy"
        selection = g["val_score"].astype(float).to_dict() if "val_score" in g and metric != "accuracy" else None
        ordered = {name: val[name] for name in layers if name in val.index}
        unknown = sorted(set(val.index) - set(layers))
        if unknown:
            log.warning("recommend(%s): layers %s not in the given order; left out", task, unknown)
        by_score = None
        if scores is not None and len(scores):
            mine = scores[scores["task"] == task].set_index("layer")
            by_score = {c: mine[c].astype(float).to_dict() for c in mine.columns
                        if c not in ("task", "n_rows") and pd.api.types.is_numeric_dtype(mine[c])}
        out.append(recommend(str(task), n_train=int(g["n_train"].max()), n_classes=int(g["n_classes"].max()),
                             layer_accuracy=ordered, test_accuracy=test.to_dict(), target_accuracy=target_accuracy,
                             relative_leep=None if relative_leep is None else relative_leep.get(task),
                             leep=None if leep is None else leep.get(task), layer_scores=by_score,
                             logit_layers=logit_layers, selection=selection, selection_metric=metric))
    return out


def describe(rec: Recommendation) -> str:
    """Multi-line text of a recommendation, for logs and reports."""
    return "\n".join([f"{rec.task}: {rec.action}"] + [f"  - {r}" for r in rec.reasons])


def as_frame(recs: Sequence[Recommendation]) -> pd.DataFrame:
    return pd.DataFrame([{"task": r.task, "action": r.action, "best_layer": r.best_layer, "score_used": r.score_used,
                          "reasons": list(r.reasons)} for r in recs])


__all__ = ["FROZEN", "FULL", "PARTIAL", "Recommendation", "as_frame", "describe", "recommend",
           "recommend_from_results"]
