"""The report: self-contained HTML + JSON, and a real browser renders it with its plots."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.probes.config import ProbeConfig
from pipeline.probes.job import run_probes
from pipeline.report import build_report
from storekit import write_store

N, SHARD = 240, 80


def _store(tmp_path, name="fs", seed=0):
    """Layers whose class signal grows from early to late, like a real encoder's, plus logits."""
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, 3, N)
    colour = rng.integers(0, 2, N)
    records = [{"image_id": f"img-{i:03d}", "uri": f"file:///x/{i}.png", "fingerprint": str(i), "split": None,
                "labels": {"shape": f"s{shape[i]}", "colour": f"c{colour[i]}"}} for i in range(N)]
    layers = {"early": 16, "late": 32, "classifier": 10}
    feats = {
        "early": np.c_[colour[:, None] * 2.0 + rng.normal(0, 1, (N, 8)), rng.normal(0, 1, (N, 8))],
        "late": np.c_[np.eye(3)[shape] * 3.0 + rng.normal(0, 1, (N, 3)), rng.normal(0, 1, (N, 29))],
        "classifier": np.c_[np.eye(3)[shape] * 4.0, rng.normal(0, 1, (N, 7))],
    }
    store = write_store(str(tmp_path), feats, {"shape": [f"s{v}" for v in shape], "colour": [f"c{v}" for v in colour]},
                        featureset=name, shard_rows=SHARD, ids=[r["image_id"] for r in records], dtype="float16",
                        provenance={"encoder": f"toy{seed}", "layers": list(layers)})
    run_probes(store.uri, ProbeConfig.from_dict({"tasks": ["shape", "colour"], "heads": [{"kind": "linear"}],
                                                  "epochs": 30}), use_ray=False)
    return store.uri


def test_report_numbers_and_page(tmp_path):
    uri = _store(tmp_path / "a")
    page = build_report([uri, _store(tmp_path / "b", name="fs2", seed=1)], tmp_path / "out", map_sample=200)
    import json

    report = json.loads((page.parent / "report.json").read_text())
    fs = report["featuresets"][0]
    assert fs["best_layer"]["shape"] in ("late", "classifier") and fs["best_layer"]["colour"] == "early"
    assert {r["task"] for r in fs["recommendations"]} == {"shape", "colour"}
    assert fs["leep"] and all(np.isfinite(r["leep"]) for r in fs["leep"])
    cka = np.array(fs["cka"]["matrix"])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
    assert report["comparison"] and "cross_cka" in report
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 6  # matrix, curves, CKA, two maps, encoder CKA
    assert "transferability matrix" in text and "http://" not in text and "https://" not in text


def test_report_cli(tmp_path, capsys):
    uri = _store(tmp_path / "a")
    assert main(["report", "--store", uri, "--out", str(tmp_path / "r"), "--map-sample", "150"]) == 0
    assert "index.html" in capsys.readouterr().out
    assert main(["neighbors", "--store", uri, "--layer", "late", "img-000", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "img-000:" and len(lines) == 4


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (make test installs Debian's chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    page = build_report([_store(tmp_path / "a")], tmp_path / "out", map_sample=200)
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1280,2400",
                    f"--screenshot={shot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[0] >= 2000 and img.std() > 10  # not a blank page
    # the heatmap's viridis colours are on the page: saturated pixels that text alone never has
    saturation = img.max(axis=2) - img.min(axis=2)
    assert (saturation > 80).mean() > 0.01
