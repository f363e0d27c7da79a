"""ProbeConfig.from_dict: defaults, coercion, refusals that name the valid choices."""

import json

import pytest

from pipeline.probes.config import ConfigError, KNNHeadSpec, LinearHeadSpec, ProbeConfig, PrototypeHeadSpec, TaskSpec


def test_from_dict_builds_typed_config():
    c = ProbeConfig.from_dict({
        "tasks": ["species", {"name": "weight", "type": "regression"}],
        "layers": ["blocks.3", "blocks.5"],
        "heads": ["linear", {"kind": "knn", "ks": 5}, {"kind": "prototype", "metric": "euclidean"},
                  {"kind": "mlp", "hidden_sizes": [64, 32], "lrs": [1e-3, 1e-2]}, "auto"],
        "split": {"train": 0.8, "val": 0.1, "test": 0.1, "seed": 3},
        "few_shot": [None, 5],
        "device": "cpu",
    })
    assert c.tasks == (TaskSpec("species"), TaskSpec("weight", "regression"))
    assert c.layers == ("blocks.3", "blocks.5")
    assert isinstance(c.heads[0], LinearHeadSpec) and c.heads[1] == KNNHeadSpec(ks=(5,))
    assert c.heads[2] == PrototypeHeadSpec(metric="euclidean")
    assert c.heads[3].hidden_sizes == (64, 32) and c.heads[3].lrs == (1e-3, 1e-2)
    assert c.split.seed == 3 and c.few_shot == (None, 5)
    assert c.heads[0].solver == "lbfgs" and c.heads[0].tol == 1e-4
    assert ProbeConfig.from_dict({"tasks": ["a"], "heads": [{"kind": "linear", "tol": "1e-6"}]}).heads[0].tol == 1e-6
    # the resolved config is plain data and round-trips
    d = json.loads(json.dumps(c.to_dict()))
    assert ProbeConfig.from_dict(d) == c
    assert ProbeConfig.from_dict(c.to_dict()) == c  # tuples as well as lists


@pytest.mark.parametrize("d, needle", [
    ({"tasks": ["a"], "epoch": 3}, "valid keys"),
    ({"tasks": ["a"], "heads": [{"kind": "svm"}]}, "valid kinds: ['linear', 'mlp', 'prototype', 'knn', 'auto']"),
    ({"tasks": ["a"], "heads": [{"kind": "prototype", "metric": "manhattan"}]}, "valid: ['cosine', 'euclidean']"),
    ({"tasks": ["a"], "heads": [{"kind": "linear", "lr": 0.1}]}, "'lrs'"),
    ({"tasks": ["a"], "device": "tpu"}, "valid: ['cpu', 'cuda', 'auto']"),
    ({"tasks": ["a"], "split": {"train": 0.5, "val": 0.1, "test": 0.1}}, "sum to 1"),
    ({"tasks": ["a"], "split": {"frac": 0.5}}, "valid keys"),
    ({"tasks": ["a"], "selection_metric": "auc"}, "balanced_accuracy"),
    ({"tasks": [{"name": "a", "type": "ranking"}]}, "regression"),
    ({"tasks": ["a"], "few_shot": [0]}, ">= 1"),
    ({"heads": ["linear"]}, "'tasks' is required"),
    ({"tasks": ["a"], "heads": [{"kind": "linear", "solver": "sgd"}]}, "valid: ['lbfgs', 'adam']"),
    ({"tasks": ["a"], "heads": [{"kind": "linear", "tol": 0}]}, "tol=0.0 must be > 0"),
    ({"tasks": ["a"], "heads": [{"kind": "linear", "tol": "tight"}]}, "tol: expected a number, got 'tight'"),
    ({"tasks": ["a"], "split": {"column": "fold", "file": "s.parquet"}}, "both set"),
])
def test_from_dict_refuses_with_valid_choices(d, needle):
    with pytest.raises(ValueError) as e:
        ProbeConfig.from_dict(d)
    assert needle in str(e.value)


@pytest.mark.parametrize("data, needle", [
    ({"tasks": ["a"], "heads": [{"kind": "linear", "lrs": ["fast"]}]},
     "probes.heads[0] (linear).lrs[0]: expected a number"),
    ({"tasks": ["a"], "few_shot": [2.5]}, "probes.few_shot[0]: expected an integer, got 2.5"),
    ({"tasks": ["a"], "split": {"stratified": "maybe"}}, "probes.split.stratified: expected true or false"),
    ({"tasks": "a", "patience": True}, "probes.patience: expected an integer"),
])
def test_probe_values_are_strict(data, needle):
    with pytest.raises(ConfigError) as e:
        ProbeConfig.from_dict(data)
    assert needle in str(e.value)


@pytest.mark.parametrize("d, needle", [
    ({"tasks": ["a"], "layers": []}, "probes.layers is empty"),
    ({"tasks": ["a"], "layers": ["blocks.2", "blocks.2"]}, "probes.layers lists 'blocks.2' twice"),
    ({"tasks": ["a", {"name": "a", "type": "classification"}]}, "probes.tasks lists 'a' twice"),
    ({"tasks": ["a"], "few_shot": [1, 1, None]}, "probes.few_shot lists 1 twice"),
    ({"tasks": ["a"], "few_shot": [None, 5, None]}, "probes.few_shot lists null twice"),
    ({"tasks": ["a"], "heads": [{"kind": "knn", "ks": [3, 3]}]}, "head 'knn': ks lists 3 twice"),
    ({"tasks": ["a"], "heads": [{"kind": "linear", "weight_decays": [1e-3, 0.001]}]},
     "head 'linear': weight_decays lists 0.001 twice"),
    ({"tasks": ["a"], "heads": [{"kind": "mlp", "lrs": [0.1, 0.1]}]}, "head 'mlp': lrs lists 0.1 twice"),
    ({"tasks": ["a"], "heads": ["linear", "knn", {"kind": "linear"}]}, "lists head 'linear' twice with the same"),
])
def test_empty_layers_and_duplicates_in_a_grid_axis_are_refused(d, needle):
    with pytest.raises(ConfigError) as e:
        ProbeConfig.from_dict(d)
    assert needle in str(e.value)
    assert ProbeConfig.from_dict({"tasks": ["a"], "layers": None}).layers is None  # null: every layer
    assert ProbeConfig.from_dict({"tasks": ["a"], "heads": [{"kind": "mlp", "hidden_sizes": [64, 64]}]})  # not an axis
    two = ProbeConfig.from_dict({"tasks": ["a"], "heads": ["linear", {"kind": "linear", "weight_decays": [0.1]}]})
    assert len(two.heads) == 2  # one kind, two settings: both are candidates


def test_probe_overrides_take_the_probes_prefix_or_none(tmp_path):
    from clirun import assert_fails, strata

    from pipeline.cli_jobs import probe_config

    prefixed = probe_config(None, ["probes.tasks=[a, b]", "probes.split.seed=3", "few_shot=[5, null]"])
    assert prefixed == probe_config(None, ["tasks=[a, b]", "split.seed=3", "probes.few_shot=[5, null]"])
    assert [t.name for t in prefixed.tasks] == ["a", "b"] and prefixed.split.seed == 3
    nested = tmp_path / "p.yaml"
    nested.write_text("probes:\n  probes:\n    tasks: [a]\n")
    line = assert_fails(strata("probe", "--store", str(tmp_path / "store"), "--config", str(nested)), 2,
                        "unknown key(s) ['probes']")
    assert "under one 'probes:' section, not two" in line
    assert_fails(strata("probe", "--store", str(tmp_path / "store"), "probes.tasks=[digit]", "layers=[]"), 2,
                 "probes.layers is empty")
