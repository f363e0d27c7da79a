"""Per-class test accuracy of each classification task's chosen head: which classes transfer worst."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pandas as pd

from ..analysis.recommend import full_data_heads
from ..stores.label_types import class_name

WORST = 10  # classes shown per task on the page; report.json has them all


def per_class_rows(results: pd.DataFrame, chosen: pd.DataFrame, best: Mapping[str, str],
                   names: Mapping[str, Sequence[str]]) -> list[dict]:
    """One row per (task, class) for the head chosen on validation at the task's best layer, worst class first,
    its name beside it where the source named the label's integers (a ``ClassLabel``)."""
    if "test_per_class_accuracy" not in results:
        return []
    full = full_data_heads(results)
    rows = []
    for task, layer in sorted(best.items()):
        pick = chosen[(chosen["task"] == task) & (chosen["layer"] == layer) & (chosen["metric"] == "accuracy")]
        if pick.empty:
            continue
        head = pick.iloc[0]
        match = full[(full["task"] == task) & (full["layer"] == layer) & (full["head"] == head["head"])
                     & (full["hparams"] == head["hparams"])]
        raw = next((v for v in match["test_per_class_accuracy"] if isinstance(v, str) and v), None)
        if raw is None:
            continue
        accuracy = json.loads(raw)
        for label, value in sorted(accuracy.items(), key=lambda kv: (kv[1], kv[0])):
            rows.append({"task": task, "layer": layer, "class": label,
                         "name": _name(names.get(task), label), "test_accuracy": value})
    return rows


def worst_classes(rows: list[dict], worst: int = WORST) -> list[dict]:
    """The ``worst`` rows of each task (rows come worst first), with how many classes the task has."""
    out, seen = [], {}
    for r in rows:
        seen[r["task"]] = seen.get(r["task"], 0) + 1
        if seen[r["task"]] <= worst:
            out.append(r)
    return [{**r, "of_classes": seen[r["task"]]} for r in out]


def _name(names: Sequence[str] | None, label: str) -> str | None:
    """``label`` as the probes wrote it: "3", or "3.0" for an integer column with nulls (read as floats)."""
    try:
        return class_name(names, float(label))
    except ValueError:
        return None
