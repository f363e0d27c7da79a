"""Probe heads trained in parallel over heads x layers x tasks x hyperparameters on cached features."""

from pipeline.probes.config import (AutoHeadSpec, KNNHeadSpec, LinearHeadSpec, MLPHeadSpec, ProbeConfig,
                                    PrototypeHeadSpec, SplitSpec, TaskSpec)
from pipeline.probes.data import FeatureTable, InMemoryFeatureTable
from pipeline.probes.fanout import run_probe_grid
from pipeline.probes.grid import train_group, train_layer, train_linear_grid
from pipeline.probes.heads import KNNProbe, LinearProbe, MLPProbe, PrototypeProbe, choose_head
from pipeline.probes.results import ProbeResults, load_head
from pipeline.probes.split_table import read_splits, splits_frame
from pipeline.probes.splits import TaskSplit, split_task

__all__ = [
    "AutoHeadSpec", "FeatureTable", "InMemoryFeatureTable", "KNNHeadSpec", "KNNProbe", "LinearHeadSpec",
    "LinearProbe", "MLPHeadSpec", "MLPProbe", "ProbeConfig", "ProbeResults", "PrototypeHeadSpec", "PrototypeProbe",
    "SplitSpec", "TaskSpec", "TaskSplit", "choose_head", "load_head", "read_splits", "run_probe_grid",
    "split_task", "splits_frame", "train_group", "train_layer", "train_linear_grid",
]
