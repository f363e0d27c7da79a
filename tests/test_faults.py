"""Faults: a killed driver resumes, a killed encoder actor is retried, an S3 restart mid-write loses nothing."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from pipeline.config import ExtractConfig, load_config
from pipeline.encoders import build_encoder
from pipeline.extract import run_extract
from pipeline.images import decode_rgb
from pipeline.sources.demo import write_shapes
from pipeline.stores import FeatureStore

REPO = Path(__file__).resolve().parents[1]
TINY = {"name": "resnet18", "weights": "random:0", "layers": ["layer1", "layer2"], "batch_size": 16,
        "preprocessing": {"resize_size": 32, "crop_size": 32, "interpolation": "bilinear",
                          "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_shapes(root / "src", n=240, size=32, seed=5)
    return root / "src" / "images"


def _cfg_dict(images, root, shard_rows=16):
    return {"source": {"kind": "folder", "uri": str(images)}, "encoder": TINY,
            "store": {"root": str(root), "shard_rows": shard_rows, "chunk_rows": 16}}


def _check_complete(store: FeatureStore, images: Path, cfg: ExtractConfig) -> None:
    """Every image exactly once, with the features of a single-process reference forward."""
    ids = list(store.index().image_id)
    assert sorted(ids) == sorted(p.name for p in images.glob("*.png"))
    enc = build_encoder(cfg.encoder, device="cpu")
    px = enc.preprocessing.batch([decode_rgb((images / i).read_bytes()) for i in ids])
    ref = enc.encode(px)
    for layer, t in ref.items():
        np.testing.assert_allclose(store.layer(layer), t.numpy().astype(np.float16).astype(np.float32),
                                   rtol=2e-2, atol=2e-3)


def _shard_records(root: Path) -> list[Path]:
    return list(root.glob("*/_manifest/shards/*.json"))


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == proc.pid]
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:  # it died of the group's SIGKILL after it was listed
                pass
        time.sleep(0.5)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.slow
def test_killed_driver_resumes_and_equals_an_uninterrupted_run(images, tmp_path):
    root = tmp_path / "stores"
    cfg_path = tmp_path / "extract.yaml"
    cfg_path.write_text(yaml.safe_dump(_cfg_dict(images, root, shard_rows=16)))
    cmd = [sys.executable, "-m", "jobs.extract", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while len(_shard_records(root)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before it could be killed"
    finally:
        _kill_tree(proc)  # SIGKILL to the driver and its local Ray: the cluster is gone
    done_before = len(_shard_records(root))
    assert 2 <= done_before < 15, done_before
    assert not list(root.glob("*/_manifest/versions/*.json"))  # nothing was published

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{done_before} shards already written" in rerun.stdout or \
        f"{done_before} shards already written" in rerun.stderr
    cfg = load_config(ExtractConfig, cfg_path)
    (featureset,) = [p for p in root.iterdir() if p.is_dir()]
    store = FeatureStore(str(featureset))
    assert store.versions() == [1]
    _check_complete(store, images, cfg)


def _worker_pids(name: str) -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if name in text:
            pids.append(p.info["pid"])
    return pids


@pytest.mark.slow
def test_encoder_actor_killed_mid_run(ray_local, images, tmp_path):
    root = tmp_path / "stores"
    cfg = load_config(ExtractConfig, _write(tmp_path, _cfg_dict(images, root, shard_rows=16)))
    killed: list[int] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            if len(_shard_records(root)) >= 2:
                pids = _worker_pids("MapWorker(Map(EncodeShard))")
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_extract(cfg)
    t.join(timeout=5)
    assert killed, "no encoder actor was found to kill"
    assert summary.images == 240 and summary.errors == 0
    _check_complete(FeatureStore(summary.store_uri), images, cfg)


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.s3
@pytest.mark.slow
def test_s3_restart_mid_write_loses_nothing(ray_local, images, tmp_path, s3_server, s3_bucket):
    from dataclasses import replace

    cfg = load_config(ExtractConfig, _write(tmp_path, _cfg_dict(images, s3_bucket.url("features"), shard_rows=16)))
    cfg = replace(cfg, store=replace(cfg.store, storage_options=s3_bucket.storage_options))
    fs = __import__("s3fs").S3FileSystem(**s3_bucket.storage_options)
    restarted = threading.Event()

    def restarter():
        deadline = time.time() + 240
        while time.time() < deadline:
            fs.invalidate_cache()
            if len(fs.glob(f"{s3_bucket.name}/features/*/_manifest/shards/*.json")) >= 2:
                s3_server.restart()
                restarted.set()
                return
            time.sleep(0.1)

    t = threading.Thread(target=restarter, daemon=True)
    t.start()
    try:
        summary = run_extract(cfg)
        failure = None
    except Exception as e:  # a clear failure is an allowed outcome
        summary, failure = None, e
    t.join(timeout=60)
    assert restarted.is_set()
    if failure is not None:
        assert str(failure)
        fs.invalidate_cache()
        assert not fs.glob(f"{s3_bucket.name}/features/*/_manifest/versions/*.json")
        summary = run_extract(cfg)  # a re-run completes what was left
    store = FeatureStore(summary.store_uri, storage_options=s3_bucket.storage_options)
    _check_complete(store, images, cfg)
