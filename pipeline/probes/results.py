"""The results of a probe grid: a table, the selected heads, a leaderboard, and their on-storage form."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import safetensors.torch
import torch

from pipeline import storage
from pipeline.probes.grid import SavedHead
from pipeline.probes.heads import ProbeHead, build_head
from pipeline.probes.split_table import write_splits

log = logging.getLogger(__name__)

COLUMNS = [
    "task", "task_type", "layer", "few_shot", "head", "requested", "hparams", "selection_metric", "val_score",
    "selected", "selected_in_kind", "auto_reason", "n_classes", "n_train", "n_val", "n_test", "n_missing",
    "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_r2", "val_mae",
    "test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_r2", "test_mae", "test_per_class_accuracy",
    "best_epoch", "steps", "converged", "batch_heads", "train_time_s", "status", "error",
]


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows of the grid as a DataFrame with a fixed column order and stable dtypes."""
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    for col in ("few_shot", "best_epoch", "steps", "batch_heads", "n_classes", "n_train", "n_val", "n_test",
                "n_missing"):
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("selected", "selected_in_kind"):
        df[col] = df[col].where(df[col].notna(), False).astype(bool)
    df["converged"] = df["converged"].astype("boolean")
    return df.sort_values(["task", "layer", "few_shot", "head"], kind="stable", na_position="first",
                          ignore_index=True)


class ProbeResults:
    """Results table (one row per trained head, or one per failed group) plus the selected heads."""

    def __init__(self, table: pd.DataFrame, heads: list[SavedHead], config: dict[str, Any] | None = None, *,
                 splits: pd.DataFrame | None = None) -> None:
        self.table = table
        self.heads = heads
        self.config = config
        self.splits = splits  # image_id, task, split, few_shot_k: see split_table

    @property
    def failures(self) -> pd.DataFrame:
        return self.table[self.table["status"] == "failed"]

    def leaderboard(self) -> pd.DataFrame:
        """Best layer and head per task (and few-shot k) by validation score, with its test metrics."""
        ok = self.table[(self.table["status"] == "ok") & self.table["selected"]]
        if ok.empty:
            return pd.DataFrame(columns=["task", "few_shot", "best_layer", "head"])
        out = []
        for (task, k), g in ok.groupby(["task", "few_shot"], dropna=False, sort=True):
            best = g.loc[g["val_score"].astype(float).fillna(-np.inf).idxmax()]
            metric = best["selection_metric"]
            test = "mae" if metric == "r2" else "accuracy"
            out.append({"task": task, "few_shot": k, "best_layer": best["layer"], "head": best["head"],
                        "hparams": best["hparams"], "metric": metric, "val": best["val_score"],
                        f"test_{metric}": best[f"test_{metric}"], f"test_{test}": best[f"test_{test}"],
                        "layers_compared": g["layer"].nunique(), "auto_reason": best["auto_reason"]})
        return pd.DataFrame(out)

    def head(self, task: str, layer: str, few_shot: int | None = None) -> ProbeHead:
        """The selected head of (task, layer, few_shot) as a module."""
        for h in self.heads:
            m = h.meta
            if (m["task"], m["layer"], m["few_shot"]) == (task, layer, few_shot):
                return build_head(m, {k: torch.from_numpy(v) for k, v in h.state.items()})
        raise KeyError(f"no selected head for task={task!r} layer={layer!r} few_shot={few_shot}")

    def write(self, out_uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
        """Write config.json, heads/<task>/<layer>/<k>/head.{safetensors,json}, splits.parquet, results.parquet,
        then _SUCCESS.

        Any fsspec URI (S3 endpoint and credentials from `storage_options` or the environment); each file
        is written whole (retried on transient store errors), and `_SUCCESS` last. Re-writing overwrites
        the same names. Returns the written paths.
        """
        fs, root = storage.resolve(out_uri, storage_options)
        root = root.rstrip("/")
        written: list[str] = []

        def put(rel: str, data: bytes) -> None:
            path = f"{root}/{rel}"
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            storage.atomic_write_bytes(fs, path, data)
            written.append(path)

        if self.config is not None:
            put("config.json", json.dumps(self.config, indent=2, default=str).encode())
        for h in self.heads:
            rel = head_path(h.meta["task"], h.meta["layer"], h.meta["few_shot"])
            sidecar = json.dumps(h.meta, indent=1, default=_json_default)
            tensors = {k: torch.from_numpy(np.array(v, order="C")) for k, v in h.state.items()}  # a writable copy
            put(rel + ".safetensors", safetensors.torch.save(tensors, metadata={"strata_probe": sidecar}))
            put(rel + ".json", sidecar.encode())
        if self.splits is not None:
            put("splits.parquet", write_splits(self.splits))
        buf = io.BytesIO()
        self.table.to_parquet(buf, index=False)
        put("results.parquet", buf.getvalue())
        put("_SUCCESS", b"")
        log.info("probe results written to %s (%d heads)", storage.redact_uri(out_uri), len(self.heads))
        return written


def head_path(task: str, layer: str, few_shot: int | None) -> str:
    """Relative path (without suffix) of a saved head: heads/<task>/<layer>/<all|k{few_shot}>/head."""
    return f"heads/{_slug(task)}/{_slug(layer)}/{'all' if few_shot is None else f'k{few_shot}'}/head"


def _slug(name: object) -> str:
    """A path segment per name, one to one: a name that is not already safe ('$x$', '日本', '..') keeps its safe
    characters and gets '~' and a hash of the name, and '~' is never in a safe name."""
    name = str(name)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    if safe == name and safe.strip("."):
        return safe
    return f"{safe.strip('.') or '_'}~{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def load_head(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[ProbeHead, dict[str, Any]]:
    """Load a saved head (`.../head.safetensors`, sidecar `.../head.json` next to it): (module, meta).

    `module.predict(raw_features)` returns class codes; `meta["classes"][code]` is the label.
    """
    fs, path = storage.resolve(uri, storage_options)
    state = safetensors.torch.load(fs.cat_file(path))
    meta = json.loads(fs.cat_file(re.sub(r"\.safetensors$", ".json", path)))
    return build_head(meta, state), meta


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    return str(o)
