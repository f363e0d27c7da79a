"""`jobs.extract` runs unchanged on a real Ray cluster through `ray job submit`, working dir uploaded."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.sources.demo import write_shapes
from pipeline.stores import FeatureStore

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
# Ray 2.60 leaves out .git, .venv, venv and __pycache__ by default and honours .gitignore / .rayignore
# (unless RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES or RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 say otherwise);
# the upload must not depend on either, so list what must never travel (gitwildmatch, relative paths).
EXCLUDES = ["/.git/", "/.venv/", "/stores/", "/data/", "/out/", "/build/", "/.whl/", "__pycache__/",
            "*.egg-info/", ".pytest_cache/"]
PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--runtime-env-agent-port", "--metrics-export-port", "--ray-client-server-port",
              "--node-manager-port", "--object-manager-port")


@dataclass(frozen=True)
class RayHead:
    temp_dir: Path
    dashboard: str
    env: dict
    address: str  # the GCS address other nodes join


def _free_ports(n: int) -> list[int]:
    """n distinct ports the OS considers free right now (held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _own_pids(marker: str) -> set[int]:
    """Processes whose command line or cwd names our temp dir, plus all their descendants."""
    parents, own = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cwd = os.readlink(entry / "cwd") if marker not in cmdline else marker
        except (OSError, ValueError, IndexError):
            continue
        if marker in cmdline or cwd.startswith(marker):
            own.add(pid)
    grown = True
    while grown:
        children = {p for p, pp in parents.items() if pp in own} - own
        own |= children
        grown = bool(children)
    own.discard(os.getpid())
    return own


def _stop_head(marker: str, *, grace_s: float = 5.0) -> set[int]:
    """TERM our Ray processes only (never `ray stop`: it kills every Ray on the machine), then KILL.

    gcs_server and the autoscaler monitor outlive SIGTERM by 15 s or more (`ray stop` waits 16 s);
    this head is throwaway, so a short grace then SIGKILL.
    """
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _own_pids(marker)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = _own_pids(marker)
        if not pids:
            break
    return _own_pids(marker)


def _wait_for_dashboard(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5).close()
            return
        except urllib.error.HTTPError:
            return  # it answers (401: token auth; `ray job` sends the token)
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    """A real `ray start --head` on free ports with its own short temp dir; only it is torn down."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # unix socket paths must stay short
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        # Token auth (Ray 2.60's default) with a throwaway token of our own: left alone, `ray start`
        # enables it whenever ~/.ray/auth_token exists, and `ray job` then does not send the token.
        token = temp_dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                # the GCS declares a killed node dead after about 5 s, not 30 (tests/test_multinode.py)
                "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
                # the job's `python` must be this venv's, whatever PATH the test was started with
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS))))
        cmd = [str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
               "--min-worker-port=0", "--max-worker-port=0",  # 0: OS-chosen, not the shared 10002-19999
               "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout}\n{started.stderr}"
        dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
        _wait_for_dashboard(dashboard)
        yield RayHead(temp_dir, dashboard, env, f"127.0.0.1:{ports['--port']}")
    finally:
        left = _stop_head(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of our Ray head survived SIGKILL: {sorted(left)}"


def _write_config(path: Path, images: Path, store_root: Path) -> Path:
    config = {
        "source": {"kind": "folder", "uri": str(images)},
        "encoder": {"name": "resnet18", "weights": "random:0", "layers": ["layer1", "layer3"],
                    "preprocessing": {"resize_size": 32, "crop_size": 32, "interpolation": "bilinear",
                                      "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                    "batch_size": 32},
        "store": {"root": str(store_root), "shard_rows": 64, "chunk_rows": 16},
        "run": {"local_max_images": 0},  # through Ray Data on the cluster, never in the driver
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.slow
def test_extract_job_through_ray_job_submit(ray_head, tmp_path):
    write_shapes(tmp_path / "shapes", n=60, size=32, seed=3)
    store_root = tmp_path / "stores"
    config = _write_config(tmp_path / "extract.yaml", tmp_path / "shapes" / "images", store_root)

    runtime_env = json.dumps({"excludes": EXCLUDES})
    cmd = [str(RAY), "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(REPO),
           "--runtime-env-json", runtime_env, "--", "python", "-m", "jobs.extract", "--config", str(config)]
    job = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=300)
    out = job.stdout + job.stderr
    assert job.returncode == 0, out[-6000:]
    summary = re.search(r"^store (\S+) version 1: 60 images, 0 errors, 60 encoded", out, re.M)
    assert summary, out[-6000:]

    # the job ran from the uploaded copy, and the upload left out the venv, git and data
    unpacked = ray_head.temp_dir / "session_latest" / "runtime_resources" / "working_dir_files"
    (pkg,) = [p for p in unpacked.iterdir() if p.is_dir()]  # beside it: the package's .zip.lock
    assert (pkg / "jobs" / "extract.py").is_file()
    assert not [name for name in (".venv", ".git", "stores", "data", "out") if (pkg / name).exists()]

    (featureset,) = [p for p in store_root.iterdir() if p.is_dir()]
    assert summary.group(1).rstrip("/").endswith(featureset.name)
    store = FeatureStore(str(featureset))
    assert len(store) == 60 and store.version == 1
    assert store.errors().num_rows == 0
    assert store.layer_dims == {"layer1": 64, "layer3": 256}
    for layer, dim in store.layer_dims.items():
        features = store.layer(layer)
        assert features.shape == (60, dim) and features.dtype == "float32"
        assert (features != 0).any(axis=1).all()
