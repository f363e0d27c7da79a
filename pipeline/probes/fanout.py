"""Fan-out of the probe grid: one Ray task per layer (all its tasks, which share the training rows' basis)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pandas as pd

from pipeline.probes.candidates import log_knn_caps
from pipeline.probes.config import DEVICES, ProbeConfig
from pipeline.probes.data import FeatureTable, resolve_layers
from pipeline.probes.grid import GroupOutput, failure, train_layer
from pipeline.probes.progress import GridProgress
from pipeline.probes.results import ProbeResults, results_frame
from pipeline.probes.split_table import read_splits, splits_frame
from pipeline.probes.splits import TaskSplit, split_task, with_few_shot

log = logging.getLogger(__name__)


def run_probe_grid(table: FeatureTable, config: ProbeConfig, *, use_ray: bool = True,
                   num_cpus_per_group: float = 1.0, num_gpus_per_group: float | None = None,
                   given_splits: pd.DataFrame | None = None) -> ProbeResults:
    """Train the whole grid (heads x layers x tasks x hyperparameters x few-shot k) and select per group.

    Layers, tasks and splits are checked before any training (ValueError naming the fix). Each
    layer's (task, layer) groups then run as one Ray task (or in-process with use_ray=False): its
    features are sent once and tasks training on the same rows share the L-BFGS basis. A failing
    group becomes a row with status "failed" and its error, and the other groups finish.
    num_gpus_per_group defaults to 1 when config.device is "cuda", else 0 (Ray hides GPUs from
    tasks that do not request them, so device "auto" then trains on CPU). The splits come from
    `given_splits` (a checked splits table), else from config.split.file, else from the index or
    the id hashes; the splits used are returned with the results (`ProbeResults.splits`).
    """
    layers = resolve_layers(table, config.layers)
    index = table.index()
    if given_splits is None and config.split.file:
        given_splits = read_splits(config.split.file)
    splits = {t.name: with_few_shot(split_task(index, t, config.split, given=given_splits), config.few_shot,
                                    config.split.seed) for t in config.tasks}
    log_knn_caps(config, splits)
    for s in splits.values():
        log.info("task %r (%s): %d train / %d val / %d test rows, %d missing labels, split from %s", s.task,
                 s.task_type, len(s.rows["train"]), len(s.rows["val"]), len(s.rows["test"]), s.n_missing, s.source)
    groups = [(task, layer) for task in splits for layer in layers]
    num_gpus = (1.0 if config.device == "cuda" else 0.0) if num_gpus_per_group is None else num_gpus_per_group
    if use_ray:
        _ensure_ray_gpus(num_gpus)
    elif config.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"device 'cuda' asked for, but this process sees no CUDA GPU; valid here: "
                             f"{[d for d in DEVICES if d != 'cuda']} ('auto' uses a GPU where there is one)")
    t0 = time.perf_counter()
    progress = GridProgress(len(groups))
    if use_ray:
        outputs = _run_ray(table, config, splits, layers, num_cpus_per_group, num_gpus, progress)
    else:
        outputs = {}
        for layer in layers:  # one layer in memory at a time
            try:
                features = np.asarray(table.features(layer))
            except Exception as e:  # noqa: BLE001 - an unreadable layer fails its groups only
                log.exception("probe layer %r could not be read", layer)
                outputs.update({(t, layer): failure(t, layer, splits[t], e) for t in splits})
                progress.update(len(splits), 0)
                continue
            done = train_layer(features, splits, layer, config)
            outputs.update({(t, layer): o for t, o in done.items()})
            progress.update(len(done), sum(len(o.rows) for o in done.values()))
    rows = [r for g in groups for r in outputs[g].rows]
    heads = [h for g in groups for h in outputs[g].heads]
    n_failed = sum(1 for g in groups if outputs[g].rows and outputs[g].rows[0].get("status") == "failed")
    log.info("probe grid: %d groups (%d failed), %d heads in %.1fs", len(groups), n_failed, len(rows),
             time.perf_counter() - t0)
    return ProbeResults(results_frame(rows), heads, config.to_dict(),
                        splits=splits_frame(splits, config.few_shot, config.split.seed))


def _ensure_ray_gpus(num_gpus: float) -> None:
    """Ray started (or joined); a grid whose tasks each ask for a GPU is refused where the cluster has none:
    such tasks would wait forever, silently."""
    import ray

    if not ray.is_initialized():
        from ..extract.run import ray_logging_level

        ray.init(include_dashboard=False, logging_level=ray_logging_level())
        log.info("started a local Ray instance")
    have = ray.cluster_resources().get("GPU", 0)
    if num_gpus > 0 and have < num_gpus:
        raise ValueError(f"device 'cuda' asks for {num_gpus:g} GPU per probe task, but the Ray cluster has "
                         f"{have:g}; valid here: {[d for d in DEVICES if d != 'cuda']} ('auto' uses a GPU where "
                         f"there is one); on an autoscaling cluster, start a GPU node first")


def _run_ray(table: FeatureTable, config: ProbeConfig, splits: dict[str, TaskSplit], layers: list[str],
             num_cpus: float, num_gpus: float, progress: GridProgress) -> dict[tuple[str, str], GroupOutput]:
    import ray  # Ray stays out of the probe math: only the fan-out imports it

    remote = ray.remote(train_layer).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    split_ref, config_ref = ray.put(splits), ray.put(config)
    pending: dict[Any, str] = {}
    for layer in layers:
        feature_ref = ray.put(np.asarray(table.features(layer)))  # put once, read by the layer's task
        pending[remote.remote(feature_ref, split_ref, layer, config_ref)] = layer
    outputs: dict[tuple[str, str], GroupOutput] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        layer = pending.pop(done[0])
        try:
            got = ray.get(done[0])
            outputs.update({(t, layer): o for t, o in got.items()})
            progress.update(len(got), sum(len(o.rows) for o in got.values()))
        except Exception as e:  # noqa: BLE001 - RayTaskError, worker crash, ...
            cause = getattr(e, "cause", None) or e
            log.error("probe layer %r failed: %s", layer, e)
            outputs.update({(t, layer): failure(t, layer, splits[t], cause) for t in splits})
            progress.update(len(splits), 0)
    return outputs
