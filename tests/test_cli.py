"""The `strata` command as a user runs it: expected failures end in one line and an exit code, never a
traceback (unless -v); -v/-q anywhere on the line; --version."""
from __future__ import annotations

import socket
import sys

import numpy as np
import pytest

from clirun import assert_fails, last_line, strata
from pipeline.failures import JOB_FAILED, NOT_FOUND, STORAGE
from pipeline.sources.demo import write_shapes
from storekit import write_store

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "store.shard_rows=16", "store.chunk_rows=16"]


def _store_with_a_broken_layer(root) -> str:
    """A committed feature set whose `broken` layer was overwritten with NaN after the fact (the writer refuses
    non-finite features): every probe group on it fails."""
    import zarr

    n = 60
    rng = np.random.default_rng(0)
    feats = {"good": np.eye(3, 4)[np.arange(n) % 3] * 3 + rng.normal(0, 0.3, (n, 4)), "broken": rng.normal(0, 1, (n, 4))}
    store = write_store(str(root), feats, {"shape": [f"s{i % 3}" for i in range(n)]}, shard_rows=n,
                        ids=[f"im{i:02d}" for i in range(n)], dtype="float16")
    zarr.open_group(f"{store.uri}/features.zarr", mode="r+")["broken"][:n] = np.nan
    return store.uri


def test_missing_store_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nowhere")
    assert_fails(strata("inspect", missing), NOT_FOUND, "no strata feature set at", "nowhere")
    assert_fails(strata("probe", "--store", missing, "tasks=[shape]", "--no-ray"), NOT_FOUND, "no strata feature set")
    verbose = strata("inspect", missing, "-v")  # -v after the positional argument
    assert verbose.returncode == NOT_FOUND
    assert "Traceback (most recent call last)" in verbose.stderr
    assert last_line(verbose.stderr).startswith("strata inspect: error: no strata feature set")


def test_missing_version_is_one_line(tmp_path):
    uri = _store_with_a_broken_layer(tmp_path)
    assert_fails(strata("inspect", uri, "--version", "7"), 3, "version 7 not found; committed versions: [1]")


def test_failing_probe_groups_exit_non_zero(tmp_path):
    uri = _store_with_a_broken_layer(tmp_path)
    proc = strata("probe", "tasks=[shape]", "--store", uri, "epochs=3", "--no-ray", "heads=[prototype]")
    line = assert_fails(proc, JOB_FAILED, "1 probe group(s) failed", "layer=broken", "NaN/inf features")
    assert "1 task result(s) kept" in line
    assert "good" in proc.stdout and "results:" in proc.stdout  # the groups that worked are still reported


def test_a_probe_run_without_tasks_names_the_store_labels(tmp_path):
    store = write_store(str(tmp_path), {"l": np.zeros((4, 2))}, {"kind": list("abab"), "size": [1, 2, 1, 2]})
    assert_fails(strata("probe", "--store", store.uri, "--no-ray"), 2, "'tasks' is required",
                 "has label columns ['kind', 'size']: e.g. tasks=[kind,size]")


def test_error_budget_is_one_line(tmp_path):
    images = write_shapes(tmp_path / "shapes", n=12, size=32, seed=0) / "images"
    bad = images / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"broken{i}.png").write_bytes(b"not an image")
    proc = strata("-q", "extract", "source.kind=folder", f"source.uri={images}", f"store.root={tmp_path / 'stores'}",
                  "run.max_error_fraction=0.1", *TINY, "-q")
    assert_fails(proc, JOB_FAILED, "3 of 15 images failed", "run.max_error_fraction=0.1", "errors/*.parquet")
    assert " INFO " not in proc.stderr  # -q, wherever it stands


def test_a_bad_layer_is_refused_before_ray_starts(tmp_path):
    images = write_shapes(tmp_path / "shapes", n=12, size=32, seed=0) / "images"
    proc = strata("extract", "source.kind=folder", f"source.uri={images}", f"store.root={tmp_path / 'stores'}",
                  *TINY, "encoder.layers=[layer9]", "run.local_max_images=0")
    assert_fails(proc, 2, "layer9", "layer1")
    assert "Ray instance" not in proc.stderr and not (tmp_path / "stores").exists()
    missing = strata("extract", "source.kind=folder", f"source.uri={images}", f"store.root={tmp_path / 'stores'}",
                     *TINY, f"encoder.weights={tmp_path / 'no.pth'}")
    assert_fails(missing, NOT_FOUND, f"encoder.weights: {tmp_path / 'no.pth'} not found")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_s3_is_one_line(tmp_path):
    port = _closed_port()
    env = {"STRATA_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "strata-test",
           "AWS_SECRET_ACCESS_KEY": "strata-test-secret"}  # the default retry policy, not a test one
    proc = strata("inspect", "s3://features/fs", env=env, timeout=120)  # one policy: no stacked retries
    assert_fails(proc, STORAGE, "storage unreachable", f"127.0.0.1:{port}")
    assert "strata-test-secret" not in proc.stderr


@pytest.mark.s3
def test_a_refused_signature_names_the_uris_the_command_works_on(s3_bucket, s3_server, tmp_path):
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    proc = strata("versions", s3_bucket.url("fs"), env=env, timeout=120)
    line = assert_fails(proc, STORAGE, "signature", f"[store {s3_bucket.url('fs')}]")
    assert "not-the-secret" not in proc.stderr
    proc = strata("extract", "source.kind=folder", f"source.uri={s3_bucket.url('images')}",
                  f"store.root={tmp_path / 'stores'}", *TINY, env=env, timeout=120)
    assert_fails(proc, STORAGE, f"[source {s3_bucket.url('images')}, store root {tmp_path / 'stores'}]")
    assert line.count("[store") == 1


def test_a_url_password_stays_out_of_the_verbose_traceback(tmp_path):
    proc = strata("-v", "extract", "source.kind=manifest",
                  f"source.uri=http://user:hunter2pass@127.0.0.1:{_closed_port()}/m.csv",
                  f"store.root={tmp_path / 'stores'}", *TINY, timeout=120)
    assert proc.returncode == STORAGE and "Traceback (most recent call last)" in proc.stderr  # refused: exit 4
    assert "hunter2pass" not in proc.stderr + proc.stdout and "http://***@127.0.0.1" in proc.stderr
    assert "storage unreachable" in last_line(proc.stderr)


def test_version_names_strata_and_its_stack_without_importing_torch():
    proc = strata("--version")
    assert proc.returncode == 0, proc.stderr
    from importlib.metadata import version

    for dist in ("strata", "torch", "ray", "zarr"):
        assert f"{dist} {version(dist)}" in proc.stdout
    probe = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'imported'\n"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, timeout=60)


def test_overrides_on_both_sides_of_an_option():
    from pipeline.cli import build_parser

    with pytest.raises(SystemExit) as e:  # argparse alone stops at --config
        build_parser().parse_args(["config", "show", "run.num_encoders=2", "--config", "c.yaml", "run.num_encoders=3"])
    assert e.value.code == 2
    proc = strata("config", "show", "run.num_encoders=2", "--config", "configs/digits.yaml", "run.num_encoders=3")
    assert proc.returncode == 0, proc.stderr
    assert "num_encoders: 3" in proc.stdout  # later overrides win, as on one side


def test_verbosity_flags_anywhere():
    from pipeline.cli import split_verbosity

    assert split_verbosity(["extract", "--config", "c.yaml", "-v", "store.root=x"]) == (
        1, ["extract", "--config", "c.yaml", "store.root=x"])
    assert split_verbosity(["-q", "inspect", "uri"]) == (-1, ["inspect", "uri"])
    assert split_verbosity(["probe", "--", "-v"]) == (0, ["probe", "--", "-v"])


@pytest.mark.parametrize("argv", [["inspect"], ["extract", "--bogus"], ["layers", "resnet18", "--pooling", "foo"]])
def test_bad_command_line_exits_2(argv):
    proc = strata(*argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert last_line(proc.stderr).startswith("strata") and ": error: " in last_line(proc.stderr)
