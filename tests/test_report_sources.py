"""The report's inputs and output: which probe results it reports (and says so), where it writes, what it refuses.

Real stores on disk (storekit), real probe runs; no storage is mocked.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.probes.config import ProbeConfig
from pipeline.probes.job import run_probes
from pipeline.report import build_report
from pipeline.report.sections import best_layers, chosen_heads
from storekit import write_store

N = 150


def _features(seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape, colour = rng.integers(0, 3, N), rng.integers(0, 2, N)
    feats = {"early": np.c_[colour[:, None] * 2.0 + rng.normal(0, 1, (N, 4)), rng.normal(0, 1, (N, 4))],
             "late": np.c_[np.eye(3)[shape] * 3.0 + rng.normal(0, 1, (N, 3)), rng.normal(0, 1, (N, 5))]}
    return feats, shape, colour


def _store(root: Path, *, relabel: bool = False) -> str:
    """A two-layer store; relabel=True commits it again with one label changed (a relabel-only refresh)."""
    feats, shape, colour = _features()
    shapes = [f"s{s}" for s in shape]
    if relabel:
        shapes[0] = "s9" if shapes[0] != "s9" else "s8"
    store = write_store(str(root), feats, {"shape": shapes, "colour": [f"c{c}" for c in colour]}, featureset="fs",
                        shard_rows=64, ids=[f"img-{i:03d}" for i in range(N)],
                        provenance={"encoder": "toy", "layers": list(feats)})
    return store.uri


LINEAR = {"heads": [{"kind": "linear"}]}


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _probe_folders(uri: str) -> list[str]:
    return sorted(p.name for p in (Path(uri) / "probes").glob("v*"))


# -- 1: which probe results ------------------------------------------------------------------------------------

def test_after_a_refresh_the_report_uses_the_earlier_versions_results_and_says_so(tmp_path, caplog):
    uri = _store(tmp_path / "s")
    run = run_probes(uri, ProbeConfig.from_dict({"tasks": ["shape"], **LINEAR}), use_ray=False)
    assert run.store_version == 1
    assert _store(tmp_path / "s", relabel=True) == uri  # version 2, no probes of its own
    with caplog.at_level(logging.WARNING, logger="pipeline.report"):
        page = build_report([uri], tmp_path / "out", map_sample=50, thumbnail_limit=0)
    used = _report(tmp_path / "out")["featuresets"][0]["probe_results"]
    assert used["source"] == "store" and used["store_version"] == 1 and used["report_store_version"] == 2
    assert used["predates_refresh"] is True and used["uri"] == run.out_uri
    assert _probe_folders(uri) == [run.out_uri.rsplit("/", 1)[-1]]  # no default grid was run
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "version 1" in warning and "predate the refresh" in warning
    text = page.read_text()
    assert "Probe results used" in text and run.out_uri in text and "computed on store version 1" in text
    assert "predate the refresh" in text


def test_the_latest_versions_results_win_over_older_ones(tmp_path):
    uri = _store(tmp_path / "s")
    run_probes(uri, ProbeConfig.from_dict({"tasks": ["shape", "colour"], **LINEAR}), use_ray=False)
    _store(tmp_path / "s", relabel=True)
    new = run_probes(uri, ProbeConfig.from_dict({"tasks": ["shape"], **LINEAR}), use_ray=False)
    build_report([uri], tmp_path / "out", map_sample=50, thumbnail_limit=0)
    fs = _report(tmp_path / "out")["featuresets"][0]
    assert fs["probe_results"]["uri"] == new.out_uri and fs["probe_results"]["store_version"] == 2
    assert fs["probe_results"]["predates_refresh"] is False and fs["matrix"]["tasks"] == ["shape"]


def test_results_flag_chooses_the_folder_and_default_probes_are_named(tmp_path, capsys):
    uri = _store(tmp_path / "s")
    mine = str(tmp_path / "my-probes")
    run_probes(uri, ProbeConfig.from_dict({"tasks": ["colour"], **LINEAR}), out_uri=mine, use_ray=False)
    out = tmp_path / "given"
    assert main(["report", "--store", uri, "--results", mine, "--out", str(out), "--map-sample", "50"]) == 0
    fs = _report(out)["featuresets"][0]
    assert fs["probe_results"]["source"] == "given" and fs["probe_results"]["uri"] == mine
    assert fs["probe_results"]["store_version"] == 1 and fs["matrix"]["tasks"] == ["colour"]
    assert mine in (out / "index.html").read_text()
    assert not (Path(uri) / "probes").exists()  # the given results were used: nothing was probed

    assert main(["report", "--store", uri, "--results", mine, "--results", mine, "--out", str(out)]) == 2
    assert "one results folder per store" in capsys.readouterr().err
    assert main(["report", "--store", uri, "--results", str(tmp_path / "nothing"), "--out", str(out)]) == 3
    assert "no probe results at" in capsys.readouterr().err

    build_report([uri], tmp_path / "default", map_sample=50, thumbnail_limit=0)  # no results: the report runs them
    used = _report(tmp_path / "default")["featuresets"][0]["probe_results"]
    assert used["source"] == "default probes run by the report" and used["store_version"] == 1
    assert "default probes run by the report" in (tmp_path / "default" / "index.html").read_text()


# -- 2, 3: refused before any work; written through fsspec ---------------------------------------------------------

def test_out_naming_a_file_and_a_bad_map_sample_are_refused_before_any_work(tmp_path, capsys):
    uri = _store(tmp_path / "s")
    afile = tmp_path / "report.html"
    afile.write_text("x")
    assert main(["report", "--store", uri, "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "--store", uri, "--out", str(afile / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse refuses it, as any malformed option
        main(["report", "--store", uri, "--out", str(tmp_path / "r"), "--map-sample", "-5"])
    assert exited.value.code == 2
    assert "--map-sample" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--map-sample"):
        build_report([uri], tmp_path / "r", map_sample=0)
    assert not (Path(uri) / "probes").exists() and not (tmp_path / "r").exists()  # no probe grid, no output


def test_report_goes_through_fsspec_to_a_non_local_out(tmp_path, monkeypatch):
    """memory:// stands for any fsspec filesystem: nothing lands in a local folder named after the URI."""
    uri = _store(tmp_path / "s")
    run_probes(uri, ProbeConfig.from_dict({"tasks": ["shape"], **LINEAR}), use_ray=False)
    monkeypatch.chdir(tmp_path)
    page = build_report([uri], "memory://reports/r1", map_sample=50, thumbnail_limit=0)
    assert page == "memory://reports/r1/index.html"
    mem = fsspec.filesystem("memory")
    assert mem.cat_file("/reports/r1/index.html").startswith(b"<!doctype html>")
    assert json.loads(mem.cat_file("/reports/r1/report.json"))["featuresets"][0]["matrix"]["tasks"] == ["shape"]
    assert not (tmp_path / "memory:").exists()


@pytest.mark.s3
def test_report_cli_writes_to_s3(tmp_path, monkeypatch, s3_bucket, s3_env, capsys):
    uri = _store(tmp_path / "s")
    run_probes(uri, ProbeConfig.from_dict({"tasks": ["shape"], **LINEAR}), use_ray=False)
    monkeypatch.chdir(tmp_path)
    out = s3_bucket.url("reports/x")
    assert main(["report", "--store", uri, "--out", out, "--map-sample", "50"]) == 0
    assert f"{out}/index.html" in capsys.readouterr().out
    s3 = fsspec.filesystem("s3", **s3_bucket.storage_options)
    assert s3.cat_file(f"{s3_bucket.name}/reports/x/index.html").startswith(b"<!doctype html>")
    assert json.loads(s3.cat_file(f"{s3_bucket.name}/reports/x/report.json"))["featuresets"]
    assert not (tmp_path / "s3:").exists()
    s3.pipe_file(f"{s3_bucket.name}/reports/afile", b"x")
    assert main(["report", "--store", uri, "--out", s3_bucket.url("reports/afile")]) == 2
    assert "is a file" in capsys.readouterr().err


# -- 4: the probes' selection metric ranks ---------------------------------------------------------------------------

def test_best_layer_follows_the_selection_metric_not_accuracy():
    """Layer a has the better validation accuracy, layer b the better balanced accuracy, which selected."""
    rows = [{"task": "t", "task_type": "classification", "layer": layer, "few_shot": np.nan, "head": "linear",
             "hparams": "{}", "selected": True, "status": "ok", "selection_metric": "balanced_accuracy",
             "val_score": bal, "val_accuracy": acc, "test_accuracy": 0.5}
            for layer, acc, bal in (("a", 0.90, 0.55), ("b", 0.80, 0.78))]
    chosen = chosen_heads(pd.DataFrame(rows), ["a", "b"])
    assert best_layers(chosen) == {"t": "b"}
    assert list(chosen["val_accuracy"]) == [0.90, 0.80]  # accuracy shown as it is
    assert set(chosen["selection_metric"]) == {"balanced_accuracy"}


def test_the_page_names_the_selection_metric(tmp_path):
    uri = _store(tmp_path / "s")
    run_probes(uri, ProbeConfig.from_dict({"tasks": ["shape"], "selection_metric": "balanced_accuracy", **LINEAR}),
               use_ray=False)
    page = build_report([uri], tmp_path / "out", map_sample=50, thumbnail_limit=0)
    fs = _report(tmp_path / "out")["featuresets"][0]
    assert fs["selection_metric"] == {"shape": "balanced_accuracy"}
    rows = pd.DataFrame(fs["matrix_rows"])
    best = rows.loc[rows["val_score"].idxmax(), "layer"]
    assert fs["best_layer"]["shape"] == best
    assert "chosen on validation balanced_accuracy" in page.read_text()


# -- 5: no test split -------------------------------------------------------------------------------------------

def test_no_test_split_draws_validation_few_shot_curves_not_empty_charts(tmp_path):
    uri = _store(tmp_path / "s")
    run_probes(uri, ProbeConfig.from_dict({"tasks": ["shape"], "few_shot": [2, 5, None], **LINEAR,
                                           "split": {"train": 0.7, "val": 0.3, "test": 0.0}}), use_ray=False)
    page = build_report([uri], tmp_path / "out", map_sample=50, thumbnail_limit=0)
    fs = _report(tmp_path / "out")["featuresets"][0]
    values = [r.get("val_accuracy") for r in fs["few_shot"]]
    assert values and all(v is not None and 0 <= v <= 1 for v in values)
    assert not any("test_accuracy" in r for r in fs["few_shot"])
    text = page.read_text()
    few = text[text.index("<h3>Few-shot curves</h3>"):text.index("<h3>Transferability scores")]
    assert "Validation values: the probes had no test split" in few
    assert few.count("<polyline") >= 2  # lines drawn (one per layer), not an empty frame


def test_default_probes_leave_out_a_label_column_they_cannot_split(tmp_path, caplog):
    """A label column with a class per image (a file name kept as a label, say) has fewer validation rows than
    classes: the report's default probes leave it out with a warning naming it, and report the others."""
    feats, shape, colour = _features()
    uri = write_store(str(tmp_path / "s"), feats, {"shape": [f"s{s}" for s in shape], "name": [f"n{i}" for i in range(N)]},
                      featureset="fs", shard_rows=64, ids=[f"img-{i:03d}" for i in range(N)],
                      provenance={"encoder": "toy", "layers": list(feats)}).uri
    with caplog.at_level(logging.WARNING, logger="pipeline.report"):
        build_report([uri], tmp_path / "out", map_sample=50, thumbnail_limit=0)
    assert "default probes leave out label column 'name'" in caplog.text
    assert _report(tmp_path / "out")["featuresets"][0]["matrix"]["tasks"] == ["shape"]
    only = write_store(str(tmp_path / "t"), feats, {"name": [f"n{i}" for i in range(N)]}, featureset="fs",
                       shard_rows=64, ids=[f"img-{i:03d}" for i in range(N)],
                       provenance={"encoder": "toy", "layers": list(feats)}).uri
    with pytest.raises(ValueError, match=r"no label column .* the default probes can use.*'name'.*--results"):
        build_report([only], tmp_path / "out2", map_sample=50, thumbnail_limit=0)
