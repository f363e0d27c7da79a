"""The report: validation-selected numbers, scores, maps for every task, and a real browser renders hostile labels."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.probes.config import ProbeConfig
from pipeline.probes.job import run_probes
from pipeline.report import build_report
from pipeline.report.sections import best_layers, chosen_heads
from pipeline.sources.base import fingerprint_bytes
from storekit import write_store

N, SHARD = 240, 80
HOSTILE = ["<script>alert(1)</script>", "$x$", "café ☕ 東京 \u202e", "a & b \"quoted\" 'single'"]


def _store(tmp_path, name="fs", seed=0, *, labels=None, images=None, probe=True):
    """Layers whose class signal grows from early to late, like a real encoder's, plus logits.

    `labels` replaces the class names of the "shape" task; `images` writes real PNGs behind the URIs.
    """
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, 3 if labels is None else len(labels), N)
    colour = rng.integers(0, 2, N)
    names = labels or ["s0", "s1", "s2"]
    uris = [f"file:///x/{i}.png" for i in range(N)]
    prints = None
    if images is not None:
        images.mkdir(parents=True, exist_ok=True)
        prints = []
        for i in range(N):
            Image.fromarray(np.full((24, 24, 3), (37 * shape[i]) % 255, np.uint8)).save(images / f"{i}.png")
            uris[i] = (images / f"{i}.png").as_uri()
            prints.append(fingerprint_bytes((images / f"{i}.png").read_bytes()))  # what a source would record
    records = [{"image_id": f"img-{i:03d}", "uri": uris[i], "fingerprint": str(i), "split": None,
                "labels": {"shape": names[shape[i]], "colour": f"c{colour[i]}"}} for i in range(N)]
    layers = {"early": 16, "late": 32, "classifier": 10}
    k = len(names)
    feats = {
        "early": np.c_[colour[:, None] * 2.0 + rng.normal(0, 1, (N, 8)), rng.normal(0, 1, (N, 8))],
        "late": np.c_[np.eye(k)[shape] * 3.0 + rng.normal(0, 1, (N, k)), rng.normal(0, 1, (N, 32 - k))],
        "classifier": np.c_[np.eye(k)[shape] * 4.0, rng.normal(0, 1, (N, 10 - k))],
    }
    store = write_store(str(tmp_path), feats, {"shape": [r["labels"]["shape"] for r in records],
                                               "colour": [r["labels"]["colour"] for r in records]},
                        featureset=name, shard_rows=SHARD, ids=[r["image_id"] for r in records], dtype="float16",
                        provenance={"encoder": f"toy{seed}", "layers": list(layers)}, uris=uris,
                        fingerprints=prints)
    if probe:
        run_probes(store.uri, ProbeConfig.from_dict({"tasks": ["shape", "colour"], "heads": [{"kind": "linear"}]}),
                   use_ray=False)
    return store.uri


def test_report_numbers_and_page(tmp_path):
    uri = _store(tmp_path / "a")
    page = build_report([uri, _store(tmp_path / "b", name="fs2", seed=1)], tmp_path / "out", map_sample=200)
    report = json.loads((page.parent / "report.json").read_text())
    fs = report["featuresets"][0]
    assert fs["best_layer"]["shape"] in ("late", "classifier") and fs["best_layer"]["colour"] == "early"
    assert fs["matrix"]["layers"] == ["early", "late", "classifier"]  # encoder order, logits last
    assert {r["task"] for r in fs["recommendations"]} == {"shape", "colour"}
    assert all(r["best_layer"] == fs["best_layer"][r["task"]] for r in fs["recommendations"])
    assert fs["leep"] and all(np.isfinite(r["leep"]) for r in fs["leep"])
    scores = pd.DataFrame(fs["scores"])
    assert set(scores["layer"]) == {"early", "late"} and {"logme", "nleep", "h_score", "knn_accuracy", "leep"} <= set(
        scores.columns)
    late = scores.set_index(["task", "layer"])
    assert late.loc[("shape", "late"), "knn_accuracy"] > late.loc[("shape", "early"), "knn_accuracy"]
    assert late.loc[("shape", "late"), "logme"] > late.loc[("shape", "early"), "logme"]
    assert {r["score"] for r in fs["score_agreement"]} >= {"LogME", "NLEEP", "H-score", "kNN accuracy"}
    assert sorted(m["task"] for m in fs["maps"]) == ["colour", "shape"]  # a map for every task
    assert all(m["points"] == 200 and "200 of 240 images" in m["caption"] for m in fs["maps"])
    cka = np.array(fs["cka"]["matrix"])
    np.testing.assert_allclose(np.diag(cka), 1.0, atol=1e-6)
    comparison = report["comparison"]
    assert {r["encoder"] for r in comparison["encoders"]} == {"toy0", "toy1"} and "cross_cka" in report
    assert comparison["shared_images"] == 1.0
    assert all(r["kendall_tau_val"] is None for r in comparison["agreement"])  # 2 encoders: no ranking
    per_class = pd.DataFrame(fs["per_class"])  # the chosen head's, at the best layer, worst class first
    assert set(per_class["task"]) == {"shape", "colour"}
    for task, g in per_class.groupby("task"):
        assert set(g["layer"]) == {fs["best_layer"][task]} and list(g["test_accuracy"]) == sorted(g["test_accuracy"])
        assert len(g) == len(set(g["class"])) >= 2 and g["name"].isna().all()  # toy labels name no classes
    text = page.read_text()
    assert text.count("<svg class=\"map\"") == 4 and "probe test accuracy (task x layer)" in text
    assert "Per-class test accuracy of the chosen head" in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text


def test_blank_labels_are_missing_and_a_numeric_task_is_not_a_set_of_classes(tmp_path):
    """A blank label is missing in the maps, the cluster scores and LEEP, as in the probes; a regression task's
    map is coloured by value bins and gets no cluster scores."""
    from pipeline import analysis
    from pipeline.stores import FeatureStore

    rng = np.random.default_rng(3)
    shape = rng.integers(0, 3, N)
    size = rng.normal(size=N) * 2.0
    label = np.array(["s0", "s1", "s2"], dtype=object)[shape]
    label[:40] = "  "
    feats = {"early": rng.normal(0, 1, (N, 8)),
             "late": np.c_[np.eye(3)[shape] * 3.0, size[:, None], rng.normal(0, 1, (N, 12))],
             "classifier": np.c_[np.eye(3)[shape] * 4.0, rng.normal(0, 1, (N, 7))]}
    store = write_store(str(tmp_path / "s"), feats, {"shape": list(label), "size": list(size)}, featureset="fs",
                        shard_rows=SHARD, dtype="float32", provenance={"encoder": "toy", "layers": list(feats)})
    run_probes(store.uri, ProbeConfig.from_dict({"tasks": ["shape", {"name": "size", "type": "regression"}],
                                                 "heads": [{"kind": "linear"}]}), use_ray=False)
    page = build_report([store.uri], tmp_path / "out", map_sample=N)
    fs = json.loads((page.parent / "report.json").read_text())["featuresets"][0]
    maps = {m["task"]: m["legend"] for m in fs["maps"]}
    assert sorted(maps) == ["shape", "size"]
    assert {e["label"]: e["count"] for e in maps["shape"]} == {"s0": int((label == "s0").sum()),
                                                               "s1": int((label == "s1").sum()),
                                                               "s2": int((label == "s2").sum()), None: 40}
    assert 2 <= len(maps["size"]) <= 7 and all(" to " in e["label"] for e in maps["size"])
    assert sum(e["count"] for e in maps["size"]) == N
    assert {c["task"] for c in fs["clusters"]} == {"shape"}
    logits = FeatureStore(store.uri).layer("classifier").astype(np.float64)
    keep = label != "  "
    (row,) = fs["leep"]
    np.testing.assert_allclose(row["leep"], analysis.leep(logits[keep], label[keep]), rtol=1e-6)


def test_best_layer_is_chosen_on_validation_not_test():
    rows = [{"task": "t", "task_type": "classification", "layer": layer, "few_shot": np.nan, "head": "linear",
             "hparams": "{}", "selected": True, "status": "ok", "val_accuracy": val, "test_accuracy": test}
            for layer, val, test in (("a", 0.80, 0.95), ("b", 0.90, 0.85))]
    chosen = chosen_heads(pd.DataFrame(rows), ["a", "b"])
    assert best_layers(chosen) == {"t": "b"}


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


_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

# Runs after the page's own script: hovers the first point of each map and records what the tooltip shows.
_DRIVER = """
<script>
(function () {
  var out = {alerts: window.__alerts, maps: []};
  document.querySelectorAll('svg.map').forEach(function (svg) {
    var c = svg.querySelector('circle[data-i]');
    c.dispatchEvent(new MouseEvent('mouseover', {bubbles: true, clientX: 20, clientY: 20}));
    var tip = document.getElementById('tip'), img = tip.querySelector('img');
    out.maps.push({text: tip.textContent, shown: tip.style.display, id: tip.getAttribute('data-image-id'),
                   img: img ? img.src.slice(0, 22) : null, points: svg.querySelectorAll('circle').length,
                   legend: svg.parentNode.querySelector('.legend').textContent});
  });
  var pre = document.createElement('pre');
  pre.id = 'driver-result';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


@pytest.mark.skipif(_chromium() is None, reason="Chromium not installed (make test installs Debian's chromium)")
def test_hostile_labels_render_escaped_and_the_hover_map_works_in_headless_chromium(tmp_path):
    uri = _store(tmp_path / "a", labels=HOSTILE, images=tmp_path / "img", probe=False)
    page = build_report([uri], tmp_path / "out", map_sample=200)
    html = page.read_text(encoding="utf-8")
    # our own scripts only: the map data, the thumbnails and the hover script; no label became markup
    assert len(re.findall(r"<script", html)) == 2 + 1 + 1
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    report = json.loads((page.parent / "report.json").read_text())
    assert report["featuresets"][0]["few_shot"] and report["thumbnails"] > 0  # default probes: few-shot curves

    probe = page.parent / "probe.html"
    probe.write_text(html.replace("<head>", "<head><script>window.__alerts=[];window.alert=function(m)"
                                            "{window.__alerts.push(String(m));};</script>", 1)
                     .replace("</body>", _DRIVER + "</body>"), encoding="utf-8")
    dom = subprocess.run([_chromium(), *_FLAGS, "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'p1'}",
                          "--dump-dom", probe.as_uri()], check=True, timeout=120, capture_output=True,
                         text=True).stdout
    found = re.search(r'<pre id="driver-result">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    result = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
                        .replace("&amp;", "&"))
    assert result["alerts"] == []  # no label ever ran as script
    assert len(result["maps"]) == 2
    for m in result["maps"]:
        assert m["shown"] == "block" and m["id"].startswith("img-") and m["points"] == 200
        assert f"image_id: {m['id']}" in m["text"] and "uri: file:///" in m["text"]
        assert m["img"] == "data:image/jpeg;base64"  # the thumbnail of the hovered image
    shape_map = next(m for m in result["maps"] if "$x$" in m["legend"])
    for label in HOSTILE:
        assert label in shape_map["legend"]  # every label literally, as text
    assert any(label in m["text"] for m in result["maps"] for label in HOSTILE)

    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *_FLAGS, f"--user-data-dir={tmp_path / 'p2'}", "--window-size=1280,6000",
                    f"--screenshot={shot}", page.as_uri()], check=True, timeout=120, capture_output=True)
    img = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert img.shape[0] >= 6000 and img.std() > 10  # not a blank page
    saturation = img.max(axis=2) - img.min(axis=2)  # the heatmap's viridis and the maps' colours are drawn
    assert (saturation > 80).sum() > 15_000


def test_per_class_rows_follow_the_chosen_head_and_name_the_classes():
    from pipeline.report.per_class import per_class_rows, worst_classes

    def row(layer, head, hp, per_class, selected=True):
        return {"task": "kind", "layer": layer, "head": head, "hparams": hp, "status": "ok", "selected": selected,
                "few_shot": None, "test_per_class_accuracy": json.dumps(per_class)}

    results = pd.DataFrame([row("a", "linear", '{"C": 1}', {"0.0": 0.9, "1": 0.5, "7": 0.7}),  # 0.0: nulls
                            row("a", "mlp", '{"h": 8}', {"0": 0.1, "1": 0.1, "7": 0.1}),  # not the chosen head
                            row("b", "linear", '{"C": 2}', {"0": 0.0, "1": 0.0, "7": 0.0})])  # not the best layer
    chosen = pd.DataFrame([{"task": "kind", "layer": "a", "head": "linear", "hparams": '{"C": 1}',
                            "metric": "accuracy"}])
    rows = per_class_rows(results, chosen, {"kind": "a"}, {"kind": ["cat", "dog"]})
    assert [(r["class"], r["name"], r["test_accuracy"]) for r in rows] == [("1", "dog", 0.5), ("7", None, 0.7),
                                                                          ("0.0", "cat", 0.9)]
    assert [(r["class"], r["of_classes"]) for r in worst_classes(rows, 2)] == [("1", 3), ("7", 3)]
