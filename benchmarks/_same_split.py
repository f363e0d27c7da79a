"""Same-split comparison of strata's linear probes with scikit-learn, on real feature stores (see bench_probes.py)."""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd

from pipeline.probes import ProbeConfig, split_task
from pipeline.probes.candidates import sklearn_c
from pipeline.probes.config import LinearHeadSpec
from pipeline.probes.grid import train_group
from pipeline.probes.split_table import splits_frame
from pipeline.stores import FeatureStore


def store_config(store: FeatureStore, *, heads: list[dict], epochs: int = 100, device: str = "cpu") -> ProbeConfig:
    """Every label column with 2+ classes as a task, 60/20/20 split (the demos' probe config)."""
    index = store.index()
    tasks = [c for c in store.label_columns if c in index and index[c].nunique() >= 2]
    return ProbeConfig.from_dict({"tasks": tasks, "heads": heads, "device": device, "epochs": epochs,
                                  "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0}})


def strata_cells(store: FeatureStore, config: ProbeConfig, layers: list[str]) -> pd.DataFrame:
    """Per (task, layer): time and the selected linear head's val/test accuracy, one train_group call per cell."""
    index = store.index()
    splits = {t.name: split_task(index, t, config.split) for t in config.tasks}
    if config.device != "cpu":  # CUDA context, cuBLAS/cuSOLVER handles and kernels load on first use: not timed
        first = next(iter(splits.values()))
        train_group(np.asarray(store.layer(layers[0])), first, layers[0], config, bases={})
    rows = []
    for layer in layers:
        x = np.asarray(store.layer(layer))
        bases: dict = {}  # as train_layer shares it: the first task of a layer pays for the basis
        for task, split in splits.items():
            t0 = time.perf_counter()
            out = train_group(x, split, layer, config, bases=bases)
            dt = time.perf_counter() - t0
            sel = next(r for r in out.rows if r.get("selected_in_kind") and r["head"] == "linear")
            rows.append({"store": store.meta["featureset"].split("__")[0], "task": task, "layer": layer,
                         "time_s": dt, "val": sel["val_accuracy"], "test": sel["test_accuracy"],
                         "hparams": json.loads(sel["hparams"]), "steps": sel["steps"],
                         "converged": sel.get("converged")})
            print(f"  strata {rows[-1]['store']} {task} {layer}: {dt:.2f} s, test {sel['test_accuracy']:.4f}",
                  flush=True)
    return pd.DataFrame(rows), splits_frame(splits, (None,), config.split.seed)


def sklearn_cells(store: FeatureStore, split_table: pd.DataFrame, layers: list[str], weight_decays: list[float], *,
                  tol: float, max_iter: int) -> pd.DataFrame:
    """Per (task, layer): LogisticRegression per penalty on the given split; C selected on validation."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    index = store.index()
    pos = pd.Index(index["image_id"])
    wds = sorted(weight_decays, reverse=True)  # strongest penalty (smallest C) first: first wins ties
    rows = []
    for layer in layers:
        x = np.asarray(store.layer(layer), dtype=np.float64)
        for task, g in split_table[split_table["few_shot_k"].isna()].groupby("task", sort=False):
            rows_of = {s: pos.get_indexer(g.loc[g["split"] == s, "image_id"]) for s in ("train", "val", "test")}
            y = index[task].astype(str).to_numpy()
            t0 = time.perf_counter()
            scaler = StandardScaler().fit(x[rows_of["train"]])
            z = {s: scaler.transform(x[r]) for s, r in rows_of.items()}
            yy = {s: y[r] for s, r in rows_of.items()}
            n, k = len(rows_of["train"]), len(set(yy["train"]))
            best, n_iter, unconverged = None, 0, 0
            for wd in wds:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    m = LogisticRegression(C=sklearn_c(wd, n, k), tol=tol, max_iter=max_iter).fit(z["train"],
                                                                                                  yy["train"])
                unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
                n_iter += int(np.max(m.n_iter_))
                val = float(np.mean(m.predict(z["val"]) == yy["val"]))
                if best is None or val > best[0]:
                    best = (val, wd, m)
            test = float(np.mean(best[2].predict(z["test"]) == yy["test"]))
            rows.append({"task": task, "layer": layer, "sk_time_s": time.perf_counter() - t0, "sk_val": best[0],
                         "sk_test": test, "sk_wd": best[1], "sk_iters": n_iter, "sk_unconverged": unconverged})
            print(f"  sklearn {task} {layer}: {rows[-1]['sk_time_s']:.2f} s, test {test:.4f}", flush=True)
    return pd.DataFrame(rows)


def same_split_table(store_uris: list[str], *, tol: float, max_iter: int, with_adam: bool = True,
                     linear: dict | None = None, device: str = "cpu") -> pd.DataFrame:
    """One row per (store, task, layer): strata L-BFGS, (strata Adam,) scikit-learn; accuracies in points."""
    frames = []
    for uri in store_uris:
        store = FeatureStore(uri)
        layers = list(store.layers)
        cfg = store_config(store, heads=[{"kind": "linear", **(linear or {})}], device=device)
        ours, split_table = strata_cells(store, cfg, layers)
        wds = list(LinearHeadSpec().weight_decays)
        sk = sklearn_cells(store, split_table, layers, wds, tol=tol, max_iter=max_iter)
        both = ours.merge(sk, on=["task", "layer"])
        if with_adam:
            adam = store_config(store, heads=[{"kind": "linear", "solver": "adam", "lrs": [0.01, 0.1],
                                               "weight_decays": [1e-4, 1e-3, 1e-2]}], epochs=60, device=device)
            adam = replace(adam, split=cfg.split)
            a, _ = strata_cells(store, adam, layers)
            both = both.merge(a[["task", "layer", "time_s", "test"]].rename(
                columns={"time_s": "adam_time_s", "test": "adam_test"}), on=["task", "layer"])
        frames.append(both)
    df = pd.concat(frames, ignore_index=True)
    df["diff_pts"] = 100 * (df["test"] - df["sk_test"])
    df["speedup"] = df["sk_time_s"] / df["time_s"]
    return df


def print_same_split(df: pd.DataFrame) -> None:
    cols = ["store", "task", "layer", "test", "sk_test", "diff_pts", "time_s", "sk_time_s", "speedup", "steps",
            "sk_iters", "sk_unconverged"] + [c for c in ("adam_test", "adam_time_s") if c in df]
    out = df[cols].copy()
    out["wd"] = df["hparams"].map(lambda h: h["weight_decay"])
    out["sk_wd"] = df["sk_wd"]
    with pd.option_context("display.width", 250, "display.max_rows", 500):
        print(out.round(4).to_string(index=False))
    within = (df["diff_pts"].abs() <= 0.5).mean()
    print(f"\ncells within 0.5 points of scikit-learn: {within:.0%} ({int((df['diff_pts'].abs() <= 0.5).sum())}"
          f"/{len(df)}); worst {df['diff_pts'].min():+.2f} / {df['diff_pts'].max():+.2f} points, "
          f"mean {df['diff_pts'].mean():+.2f}")
    print(f"time: strata {df['time_s'].sum():.1f} s, scikit-learn {df['sk_time_s'].sum():.1f} s -> "
          f"{df['sk_time_s'].sum() / df['time_s'].sum():.1f}x"
          + (f"; strata's former Adam grid {df['adam_time_s'].sum():.1f} s, mean test "
             f"{df['adam_test'].mean():.4f} vs L-BFGS {df['test'].mean():.4f}" if "adam_time_s" in df else ""))
