"""One feature set's part of the report: probe matrix, scores, few-shot curves, maps, geometry, LEEP, advice.

Every choice (best layer, best head) is made on validation; test figures are those of the chosen
head. Figures are inline SVG (svg.py); maps carry their points as JSON for the hover script.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import analysis
from ..analysis.cka import ordered_layers
from ..analysis.recommend import full_data_heads
from ..analysis.score_table import SCORE_LABELS, layer_scores, score_agreement
from ..probes.config import SplitSpec
from ..probes.splits import split_task
from ..stores import FeatureStore
from ..stores.label_types import class_name
from . import svg
from .html import MapFigure, Section

log = logging.getLogger(__name__)

LOGIT_LAYERS = ("classifier", "fc", "heads", "head")  # source-classifier logits: LEEP, not a feature layer
NUMERIC_BINS = 7  # a regression task's map: colour bins of its value, by quantile
MAX_MAP_CLASSES = 19  # more classes than this: the rarest share one colour ("other"); hover still tells them apart


def layer_order(store: FeatureStore) -> list[str]:
    """The store's layers early to late (the encoder's order when recorded), source-classifier logits last."""
    names = ordered_layers(store)
    return [x for x in names if x not in LOGIT_LAYERS] + [x for x in names if x in LOGIT_LAYERS]


def feature_layers(store: FeatureStore) -> list[str]:
    return [layer for layer in layer_order(store) if layer not in LOGIT_LAYERS]


CHOSEN_COLUMNS = ["task", "layer", "head", "hparams", "metric", "selection_metric", "val_score", "val_accuracy",
                  "test_accuracy"]


def chosen_heads(results: pd.DataFrame, layers: Sequence[str]) -> pd.DataFrame:
    """Per (task, layer), full data: the head selected on validation, with its val and test accuracy (or r2).

    `selection_metric` and `val_score` are the probes' own choice (probes.selection_metric, e.g.
    balanced_accuracy; r2 for regression): heads and layers are ranked by `val_score`; results without that
    column (older ones) rank by validation accuracy, as they were selected.
    """
    ok = full_data_heads(results)
    ok = ok[ok["layer"].isin(layers)]
    rows = []
    for (task, layer), g in ok.groupby(["task", "layer"], sort=False):
        regression = g["task_type"].iloc[0] == "regression"
        metric = "r2" if regression else "accuracy"
        score = g["val_score"].astype(float) if "val_score" in g else pd.Series(np.nan, index=g.index)
        if score.isna().all():
            score = g[f"val_{metric}"].astype(float)
        r = g.loc[score.fillna(-np.inf).idxmax()]
        chosen_by = r.get("selection_metric") if "selection_metric" in g else None
        if not isinstance(chosen_by, str) or not chosen_by:
            chosen_by = metric
        rows.append({"task": task, "layer": layer, "head": r["head"], "hparams": r["hparams"], "metric": metric,
                     "selection_metric": chosen_by, "val_score": float(score.loc[r.name]),
                     "val_accuracy": float(r[f"val_{metric}"]), "test_accuracy": float(r[f"test_{metric}"])})
    df = pd.DataFrame(rows, columns=CHOSEN_COLUMNS)
    df["order"] = df["layer"].map({name: i for i, name in enumerate(layers)})
    return df.sort_values(["task", "order"]).drop(columns="order").reset_index(drop=True)


def best_layers(chosen: pd.DataFrame) -> dict[str, str]:
    """task -> the layer whose selected head has the best validation score, by the probes' selection metric
    (`val_score`; validation accuracy when absent), first in layer order on ties."""
    out = {}
    for task, g in chosen.groupby("task", sort=True):  # chosen_heads fills val_score, from accuracy where absent
        out[task] = str(g["layer"].iloc[int(np.argmax(g["val_score"].astype(float).fillna(-np.inf).to_numpy()))])
    return out


def selection_metrics(chosen: pd.DataFrame) -> dict[str, str]:
    """task -> the validation metric its heads and layers were chosen by."""
    return {str(t): str(g["selection_metric"].iloc[0]) for t, g in chosen.groupby("task", sort=True)}


def task_splits(store: FeatureStore, tasks: Sequence[str], splits_table: pd.DataFrame | None,
                spec: SplitSpec) -> dict[str, Any]:
    """The probes' splits: from their splits table when there is one, else generated as the probes would."""
    index = store.index()
    out = {}
    for task in tasks:
        try:
            given = splits_table if splits_table is not None and (splits_table["task"] == task).any() else None
            out[task] = split_task(index, task, spec, given=given)
        except ValueError as e:
            log.warning("report: no split for task %r (%s); its scores are left out", task, e)
    return out


NO_TEST = "the probes had no test split (split.test = 0, or a split column or file without test rows)"


def few_shot_figures(results: pd.DataFrame, layers: Sequence[str], best: dict[str, str]
                     ) -> tuple[list, list, list[str]]:
    """(rows for report.json, (caption, svg) figures, notes): test accuracy of the validation-selected head vs k.

    A task whose probes had no test split is drawn on validation values (the caption says so: they are the
    values the heads were selected on); a task with nothing to draw gets a note, never an empty chart.
    """
    ok = results[(results["status"] == "ok") & results["layer"].isin(layers)]
    if not ok["few_shot"].notna().any():
        return [], [], []
    ks = sorted(int(k) for k in ok["few_shot"].dropna().unique())
    x = [str(k) for k in ks] + (["all"] if ok["few_shot"].isna().any() else [])
    key = ok["few_shot"].astype("Float64").fillna(np.inf)
    rows, figs, notes = [], [], []
    for task, g in ok.groupby("task", sort=True):
        what = "r2" if (g["task_type"] == "regression").any() else "accuracy"
        picked = g[g["selected"].astype(bool) | g["selected_in_kind"].astype(bool)]
        on_test = pd.to_numeric(picked.get(f"test_{what}", pd.Series(dtype=float)), errors="coerce").notna().any()
        metric = f"{'test' if on_test else 'val'}_{what}"
        kx = key[g.index]
        per_layer = {}
        for layer in [name for name in layers if name in set(g["layer"])]:
            sel = g[(g["layer"] == layer) & g["selected"].astype(bool)]
            per_layer[layer] = [_at(sel, kx, k, metric) for k in ks + [np.inf]][:len(x)]
        if not any(np.isfinite(v) for vals in per_layer.values() for v in vals):
            why = f"no validation scores either; {NO_TEST}" if not on_test else "every value is missing"
            notes.append(f"{task}: no few-shot curve to draw ({why}).")
            continue
        for layer, vals in per_layer.items():
            rows += [{"task": task, "layer": layer, "head": "selected", "k": k, metric: v}
                     for k, v in zip(x, vals)]
        per = "k training rows" if what == "r2" else "k per class"
        shown = what if on_test else f"validation {what}"
        why = "" if on_test else f" Validation values: {NO_TEST}; they are the values the heads were selected on."
        figs.append((f"{task}: {shown} against k, per layer.{why}", svg.line_chart(
            x, per_layer, title=f"few-shot: {task}", ylabel=metric.replace("_", " "), xlabel=per)))
        at_best = g[(g["layer"] == best.get(task)) & g["selected_in_kind"].astype(bool)]
        per_kind = {kind: [_at(h, kx, k, metric) for k in ks + [np.inf]][:len(x)]
                    for kind, h in at_best.groupby("head", sort=True)}
        if len(per_kind) > 1 and any(np.isfinite(v) for vals in per_kind.values() for v in vals):
            rows += [{"task": task, "layer": best[task], "head": kind, "k": k, metric: v}
                     for kind, vals in per_kind.items() for k, v in zip(x, vals)]
            figs.append((f"{task}: {shown} against k per head kind, layer {best[task]}.{why}", svg.line_chart(
                x, per_kind, title=f"few-shot by head: {task} @ {best[task]}", ylabel=metric.replace("_", " "),
                xlabel=per)))
    return rows, figs, notes


def _at(g: pd.DataFrame, key: pd.Series, k: float, metric: str) -> float:
    hit = g[key[g.index] == k]
    return float(hit[metric].iloc[0]) if len(hit) else float("nan")


def scores_section(store: FeatureStore, splits: dict[str, Any], layers: Sequence[str], chosen: pd.DataFrame,
                   leep_by_task: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(scores per task and layer, with LEEP; each score's rank agreement with the probes across layers)."""
    scores = layer_scores(store, splits, layers)
    if leep_by_task:
        scores["leep"] = scores["task"].map(leep_by_task)
    names = [c for c in ("logme", "nleep", "h_score", "knn_accuracy", "leep") if c in scores]
    agree = score_agreement(scores, chosen[["task", "layer", "val_accuracy", "test_accuracy"]], score_names=names)
    if len(agree):
        agree["score"] = agree["score"].map(lambda s: SCORE_LABELS.get(s, s))
    return scores, agree


def map_figures(store: FeatureStore, tasks: Sequence[str], best: dict[str, str], *, sample: int,
                seed: int = 0, numeric: Sequence[str] = ()) -> list[MapFigure]:
    """A hoverable map for every task, drawn on its best layer; one embedding per distinct layer. Tasks in
    ``numeric`` (regression) are coloured by quantile bins of their value, low to high, not as classes."""
    index = store.index()
    uri_of = dict(zip(index["image_id"].astype(str), index["uri"].astype(str))) if "uri" in index else {}
    out, embedded = [], {}
    for task in tasks:
        layer = best.get(task)
        if layer is None:
            continue
        if layer not in embedded:
            embedded[layer] = analysis.layer_map(store, layer, tasks=list(tasks), sample=sample, seed=seed, threads=1)
        m = embedded[layer]
        names = store.class_names.get(task)
        labels = [_label_text(v, names) for v in m.labels[task]]
        if task in numeric:
            codes, colours, legend = _numeric_colours(m.labels[task])
        else:
            codes, colours, legend = _class_colours(labels)
        if (codes < 0).any():
            legend.append((None, svg.MISSING_COLOUR, int((codes < 0).sum())))
        ids = [str(i) for i in m.image_ids]
        map_id = f"map-{store.meta['featureset']}-{len(out)}"
        total = len(index)
        sampled = (f"all {total} images" if len(ids) >= total
                   else f"{len(ids)} of {total} images, a uniform random sample (seed {seed}; cap --map-sample)")
        out.append(MapFigure(
            map_id=map_id, caption=f"{m.method} of layer {layer} (best for {task} on validation), coloured by "
                                   f"{task}: {sampled}",
            svg=svg.scatter_map(m.coords, codes, colours, data_id=map_id),
            data={"task": task, "layer": layer, "ids": ids, "labels": labels, "uris": [uri_of.get(i, "") for i in ids]},
            legend=legend))
    return out


def _label_text(value, names) -> str | None:
    """A label as the map shows it: its class name first where the source named its integers."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    name = class_name(names, value)
    return str(value) if name is None else f"{name} ({int(value)})"


def _class_colours(labels: list) -> tuple[np.ndarray, list[str], list]:
    counts = pd.Series([x for x in labels if x is not None], dtype=object).value_counts()
    shown = sorted(counts.index[:MAX_MAP_CLASSES] if len(counts) > MAX_MAP_CLASSES + 1 else counts.index)
    colours = svg.palette(len(shown) + (len(counts) > len(shown)))
    code_of = {lab: i for i, lab in enumerate(shown)}
    other = len(shown)
    codes = np.array([-1 if x is None else code_of.get(x, other) for x in labels])
    legend = [(lab, colours[i], int(counts[lab])) for i, lab in enumerate(shown)]
    if len(counts) > len(shown):
        rest = counts.index[len(shown):]
        legend.append((f"other ({len(rest)} classes)", colours[other], int(counts[rest].sum())))
    return codes, colours, legend


def _numeric_colours(values, bins: int = NUMERIC_BINS) -> tuple[np.ndarray, list[str], list]:
    """Quantile bins of a numeric label; the legend gives each bin's range."""
    x = pd.to_numeric(pd.Series(np.asarray(values, dtype=object)), errors="coerce").to_numpy(float)
    ok = np.isfinite(x)
    edges = np.unique(np.quantile(x[ok], np.linspace(0, 1, bins + 1))) if ok.any() else np.array([0.0])
    n = max(len(edges) - 1, 1)
    codes = np.full(len(x), -1)
    codes[ok] = np.clip(np.searchsorted(edges, x[ok], side="right") - 1, 0, n - 1)
    colours = svg.ramp(n)
    lo = edges[:-1] if len(edges) > 1 else edges
    hi = edges[1:] if len(edges) > 1 else edges
    legend = [(f"{svg.fmt(a, 3)} to {svg.fmt(b, 3)}", colours[i], int((codes == i).sum()))
              for i, (a, b) in enumerate(zip(lo, hi))]
    return codes, colours, legend


def section_figures(sec: Section, chosen: pd.DataFrame, tasks: Sequence[str], layers: Sequence[str],
                    cka: Any) -> None:
    on_test = chosen["test_accuracy"].astype(float).notna().any()
    column = "test_accuracy" if on_test else "val_accuracy"
    split = "test" if on_test else "validation"
    why = "" if on_test else f" Validation values: {NO_TEST}."
    m = chosen.pivot(index="task", columns="layer", values=column).reindex(index=tasks, columns=layers)
    r2 = sorted(set(chosen.loc[chosen["metric"] == "r2", "task"]))
    also = f" (r2 for the regression tasks: {', '.join(r2)})" if r2 else ""
    sec.figures.append((f"{split.capitalize()} accuracy of the head selected on validation, per task and layer{also}."
                        f"{why}", svg.heatmap(
        m.to_numpy(float), tasks, layers, title=f"probe {'test' if on_test else 'val'} "
                                                f"{'score' if r2 else 'accuracy'} (task x layer)", vmin=0.0, vmax=1.0)))
    sec.figures.append(("The same as curves, early to late layers.", svg.line_chart(
        layers, {t: m.loc[t].to_numpy(float) for t in tasks}, title=f"probe {'score' if r2 else 'accuracy'} per layer",
        ylabel=f"{'test' if on_test else 'val'} accuracy" + (" / r2" if r2 else ""), xlabel="layer (early -> late)")))
    sec.figures.append(("Linear CKA between layers (1 = the same representation up to rotation and scale).",
                        svg.heatmap(cka.matrix, cka.layers, cka.layers, title="linear CKA between layers",
                                    vmin=0, vmax=1)))


def records(df: pd.DataFrame) -> list[dict]:
    """A frame as JSON-able rows (numpy scalars to Python)."""
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in df.to_dict("records")]
