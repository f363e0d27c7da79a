"""Benchmark: strata's linear-probe grid vs scikit-learn LogisticRegression fitted head by head.

Two tables:

1. **Same split, real stores** (`--stores`): on each feature store (the digits and shapes demos),
   for every (task, layer) cell, strata's validation-selected linear head (the default L-BFGS
   solver over its default penalty grid) against scikit-learn's LogisticRegression fitted to
   convergence on exactly the same split (read back from the run's splits table) and the same
   penalties (C = 1 / (lambda n), 2 / (lambda n) for two classes), standardised with the training
   rows' statistics, C selected on validation accuracy (ties: the stronger penalty, like
   LogisticRegressionCV), test accuracy reported. Also strata's former minibatch Adam grid. Times per
   cell include standardisation, fitting, selection and test; both sides run with the same number
   of threads (--threads).

    python benchmarks/bench_probes.py --stores stores/digits__... stores/shapes__...

2. **Synthetic** (default): the cost of the grid on many rows. 20,000 float16 rows, four layers
   (dims 32/96/320/1280) that carry a latent class structure through a random non-linear
   projection plus noise (deeper layers: more of the fine-grained signal; earlier layers: more of
   an attribute signal), three label tasks (20 fine classes, 5 coarse classes, 4 attribute
   classes). Every (task, layer) group gets the same 5 L2 penalties on both sides, the same split
   and train-only standardisation; both select on validation and report test.

    python benchmarks/bench_probes.py            # 20k rows, 4 layers x 3 tasks x 5 penalties = 60 heads
    python benchmarks/bench_probes.py --quick    # 5k rows, small dims
    python benchmarks/bench_probes.py --solver adam   # strata's minibatch Adam grid instead
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings

import numpy as np
import pandas as pd
import torch

from _machine import machine_header  # benchmarks/ is on sys.path when run as a script
from _same_split import print_same_split, same_split_table
from pipeline.probes import InMemoryFeatureTable, ProbeConfig, run_probe_grid, split_task


def make_table(n: int, dims: list[int], seed: int = 0) -> InMemoryFeatureTable:
    """Latent fine/coarse/attribute classes -> per-layer non-linear random projections + noise."""
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 20, n)
    coarse = fine // 4
    attr = rng.integers(0, 4, n)
    coarse_mu = rng.normal(size=(5, 48)) * 1.0
    fine_mu = coarse_mu[np.arange(20) // 4] + rng.normal(size=(20, 48)) * 0.6
    attr_mu = rng.normal(size=(4, 16)) * 1.0
    latent_f = fine_mu[fine] + rng.normal(size=(n, 48)) * 1.5
    latent_a = attr_mu[attr] + rng.normal(size=(n, 16)) * 1.0
    feats = {}
    for depth, d in enumerate(dims):
        w_sem = (depth + 1) / len(dims)  # semantic (fine/coarse) signal grows with depth, attribute fades
        latent = np.concatenate([latent_f * w_sem, latent_a * (1.2 - w_sem)], axis=1)
        proj = rng.normal(size=(latent.shape[1], d)) / np.sqrt(latent.shape[1])
        h = latent @ proj
        x = np.maximum(h, 0) + 0.1 * h + rng.normal(size=(n, d)) * 0.5  # leaky-ReLU-like features + noise
        feats[f"layer{depth + 1}_d{d}"] = x.astype(np.float16)
    index = pd.DataFrame({"image_id": [f"img{i:06d}" for i in range(n)], "fine": fine, "coarse": coarse,
                          "attribute": attr})
    return InMemoryFeatureTable(feats, index)


def run_sklearn(table: InMemoryFeatureTable, cfg: ProbeConfig, wds: list[float], max_iter: int) -> pd.DataFrame:
    """One LogisticRegression per (task, layer, penalty) at the same C; select on val (ties: smaller C), report test."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from pipeline.probes.candidates import sklearn_c
    from pipeline.probes.heads import fit_standardizer

    rows = []
    for task in cfg.tasks:
        split = split_task(table.index(), task, cfg.split)
        y = split.targets
        tr, va, te = split.rows["train"], split.rows["val"], split.rows["test"]
        for layer in table.layers:
            t0 = time.perf_counter()
            x = table.features(layer).astype(np.float32)
            mean, std = (t.numpy() for t in fit_standardizer(torch.from_numpy(x[tr])))
            z = (x - mean) / std
            best = (-1.0, None)
            for wd in sorted(wds, reverse=True):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model = LogisticRegression(C=sklearn_c(wd, len(tr), split.n_classes),
                                               max_iter=max_iter).fit(z[tr], y[tr])
                acc = float((model.predict(z[va]) == y[va]).mean())
                if acc > best[0]:
                    best = (acc, model)
            test = float((best[1].predict(z[te]) == y[te]).mean())
            rows.append({"task": task.name, "layer": layer, "sk_time_s": time.perf_counter() - t0, "sk_val": best[0],
                         "sk_test": test, "sk_C": best[1].C})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5k rows, dims 32/96/320/640: a few seconds")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--ray", action="store_true", help="fan the groups out over a local Ray (init time excluded)")
    ap.add_argument("--epochs", type=int, default=30, help="Adam solver only")
    ap.add_argument("--solver", default="lbfgs", choices=["lbfgs", "adam"], help="strata's linear solver (synthetic)")
    ap.add_argument("--device", default="cpu", help="strata's torch device (scikit-learn runs on the CPU)")
    ap.add_argument("--max-iter", type=int, default=10_000, help="sklearn max_iter (lbfgs)")
    ap.add_argument("--no-sklearn", action="store_true", help="time strata only")
    ap.add_argument("--stores", nargs="+", default=None, help="feature stores for the same-split table")
    ap.add_argument("--threads", type=int, default=None, help="torch and BLAS threads, the same for both sides")
    ap.add_argument("--tol", type=float, default=1e-4, help="sklearn tol in the same-split table (its default)")
    ap.add_argument("--strata-tol", type=float, default=None, help="strata's lbfgs tol (default: its own)")
    ap.add_argument("--strata-polish-tol", type=float, default=None,
                    help="strata's lbfgs polish_tol (0: off; default: its own default)")
    ap.add_argument("--no-adam", action="store_true", help="same-split table without the Adam grid")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine_header("bench_probes"))
    if args.threads:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)
    linear = ({"tol": args.strata_tol} if args.strata_tol else {}) | (
        {"polish_tol": args.strata_polish_tol or None} if args.strata_polish_tol is not None else {})
    if args.stores:
        df = same_split_table(args.stores, tol=args.tol, max_iter=args.max_iter, with_adam=not args.no_adam,
                              linear=linear, device=args.device)
        print_same_split(df)
        return
    n = args.rows or (5_000 if args.quick else 20_000)
    dims = [32, 96, 320, 640] if args.quick else [32, 96, 320, 1280]
    table = make_table(n, dims)
    wds = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1]  # L2 penalties: sklearn gets the same ones as C (5 heads a group)
    cfg = ProbeConfig.from_dict({
        "tasks": ["fine", "coarse", "attribute"], "device": args.device, "epochs": args.epochs,
        "batch_size": 1024, "patience": 10, "seed": 0,
        "heads": [{"kind": "linear", "solver": args.solver, "lrs": [1e-2], "weight_decays": wds} | linear],
    })
    print(f"rows={n} layers={dims} tasks=3 heads/group={len(wds)} -> {len(dims) * 3 * len(wds)} linear heads; "
          f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()}")
    if args.ray:
        import ray

        ray.init(include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    t0 = time.perf_counter()
    res = run_probe_grid(table, cfg, use_ray=args.ray)
    strata_s = time.perf_counter() - t0
    t = res.table
    assert (t["status"] == "ok").all(), t[t["status"] != "ok"]
    sel = t[t["selected"]].set_index(["task", "layer"])
    ours = pd.DataFrame({"strata_time_s": t.groupby(["task", "layer"])["train_time_s"].sum(),
                         "strata_val": sel["val_accuracy"], "strata_test": sel["test_accuracy"],
                         "strata_wd": sel["hparams"].map(lambda h: json.loads(h)["weight_decay"]),
                         "strata_steps": sel["steps"]}).reset_index()
    if args.no_sklearn:
        print(ours.round(4).to_string(index=False), f"\nstrata: {strata_s:.2f} s")
        return
    t1 = time.perf_counter()
    sk = run_sklearn(table, cfg, wds, args.max_iter)
    sk_s = time.perf_counter() - t1
    both = ours.merge(sk, on=["task", "layer"])
    both["test_diff_pts"] = 100 * (both["strata_test"] - both["sk_test"])
    pd.set_option("display.width", 200)
    print(both.round(4).to_string(index=False))
    print(f"\nstrata batched grid (whole run_probe_grid{', Ray' if args.ray else ', in-process'}): {strata_s:.2f} s")
    print(f"sklearn LogisticRegression head by head ({len(sk) * len(wds)} fits):            {sk_s:.2f} s")
    print(f"speed-up: {sk_s / strata_s:.1f}x   mean test accuracy strata={both['strata_test'].mean():.4f} "
          f"sklearn={both['sk_test'].mean():.4f}   worst group diff={both['test_diff_pts'].min():+.2f} pts, "
          f"mean diff={both['test_diff_pts'].mean():+.2f} pts")


if __name__ == "__main__":
    main()
