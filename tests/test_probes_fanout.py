"""Fan-out over real local Ray: groups run as tasks, a failing group is recorded, the others finish."""

import numpy as np
import pandas as pd
import pytest

from pipeline.probes import InMemoryFeatureTable, ProbeConfig, run_probe_grid

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def _table(n=600, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    z = rng.integers(0, 2, n)
    good = np.concatenate([rng.normal(size=(3, 16))[y] * 2, rng.normal(size=(2, 8))[z] * 2], 1)
    feats = {
        "noise": rng.normal(size=(n, 8)).astype(np.float16),
        "good": (good + rng.normal(size=good.shape)).astype(np.float16),
        "broken": rng.normal(size=(n, 12)).astype(np.float32),
    }
    feats["broken"][17, 4] = np.nan
    index = pd.DataFrame({"image_id": [f"im{i}" for i in range(n)], "shape": y, "colour": np.array(["r", "g"])[z]})
    return InMemoryFeatureTable(feats, index)


CFG = ProbeConfig.from_dict({
    "tasks": ["shape", "colour"], "device": "auto", "epochs": 15, "batch_size": 128, "patience": 4,
    "heads": [{"kind": "linear", "weight_decays": [1e-3, 1e-2]}, {"kind": "linear", "solver": "adam", "lrs": [1e-2],
                                                                    "weight_decays": [1e-2]}, {"kind": "knn", "ks": [5]}],
})


def test_fanout_on_ray_records_failure_and_finishes_the_rest(ray_local, monkeypatch):
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda obj, **kw: (puts.append(type(obj).__name__), real_put(obj, **kw))[1])
    res = run_probe_grid(_table(), CFG, use_ray=True)
    assert puts.count("ndarray") == 3  # features put once per layer, not once per (task, layer)
    assert puts.count("dict") == 1  # the splits, once
    t = res.table
    failed = t[t["status"] == "failed"]
    assert sorted(failed["task"]) == ["colour", "shape"] and set(failed["layer"]) == {"broken"}
    assert failed["error"].str.contains("NaN/inf features").all()
    assert failed["error"].str.contains("im17").all()
    ok = t[t["status"] == "ok"]
    assert set(zip(ok["task"], ok["layer"])) == {(a, b) for a in ("shape", "colour") for b in ("noise", "good")}
    assert len(ok) == 4 * 4 and len(res.heads) == 4
    board = res.leaderboard().set_index("task")
    assert board.loc["shape", "best_layer"] == "good" and board.loc["colour", "best_layer"] == "good"
    assert board.loc["shape", "test_accuracy"] > 0.9


def test_ray_and_in_process_agree(ray_local):
    table = _table(seed=1)
    cfg = ProbeConfig.from_dict(CFG.to_dict() | {"layers": ["noise", "good"]})
    a = run_probe_grid(table, cfg, use_ray=True).table
    b = run_probe_grid(table, cfg, use_ray=False).table
    pd.testing.assert_frame_equal(a.drop(columns="train_time_s"), b.drop(columns="train_time_s"), atol=1e-4)


def test_refusals_happen_before_any_work():
    with pytest.raises(ValueError, match=r"valid layers: \['noise', 'good', 'broken'\]"):
        run_probe_grid(_table(), ProbeConfig.from_dict({"tasks": ["shape"], "layers": ["head"]}), use_ray=False)
    with pytest.raises(ValueError, match="no such label column.*'colour'"):
        run_probe_grid(_table(), ProbeConfig.from_dict({"tasks": ["color"]}), use_ray=False)


def test_in_process_failure_is_recorded_too():
    res = run_probe_grid(_table(), ProbeConfig.from_dict(CFG.to_dict() | {"tasks": ["shape"]}), use_ray=False)
    assert list(res.failures["layer"]) == ["broken"]
    assert (res.table["status"] == "ok").sum() == 2 * 4


def test_cuda_without_a_gpu_is_refused_not_left_waiting(ray_local):
    """A Ray task asking for a GPU on a cluster without one would wait forever: refused before any work."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = ProbeConfig.from_dict({"tasks": ["shape"], "device": "cuda", "heads": [{"kind": "knn", "ks": [5]}]})
    with pytest.raises(ValueError, match=r"asks for 1 GPU per probe task, but the Ray cluster has 0; valid here: "
                                         r"\['cpu', 'auto'\]"):
        run_probe_grid(_table(), cfg, use_ray=True)
    with pytest.raises(ValueError, match=r"this process sees no CUDA GPU; valid here: \['cpu', 'auto'\]"):
        run_probe_grid(_table(), cfg, use_ray=False)
