"""The transferability report: numbers per feature set (probes, CKA, geometry, LEEP, maps, advice) -> HTML + JSON."""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import analysis
from ..probes.config import ProbeConfig
from ..stores import FeatureStore
from ..stores.writer import _library_version
from . import html, plots

log = logging.getLogger(__name__)

LOGIT_LAYERS = ("classifier", "fc", "heads", "head")  # source-classifier logits: LEEP, not a feature layer


def latest_probe_results(store: FeatureStore) -> pd.DataFrame | None:
    """The newest probe results written for this store version, if any."""
    pattern = f"{store.base}/probes/v{store.version}-*/results.parquet"
    paths = sorted(store.fs.glob(pattern), key=lambda p: store.fs.info(p).get("mtime", 0) or 0)
    if not paths:
        return None
    return pd.read_parquet(io.BytesIO(store.fs.cat_file(paths[-1])))


def default_probe_config(store: FeatureStore) -> ProbeConfig:
    index = store.index()
    tasks = [c for c in store.label_columns if c in index and index[c].nunique() >= 2]
    if not tasks:
        raise ValueError(f"{store.uri} has no label column with two or more classes to probe; "
                         f"label columns: {store.label_columns}")
    return ProbeConfig.from_dict({"tasks": tasks, "heads": [{"kind": "linear"}]})


def _feature_layers(store: FeatureStore) -> list[str]:
    return [layer for layer in store.layers if layer not in LOGIT_LAYERS]


def _matrix(results: pd.DataFrame, layers: Sequence[str]) -> pd.DataFrame:
    """task x layer: test accuracy of the head selected on validation, over all head kinds."""
    ok = results[(results.status == "ok") & results.selected.astype(bool) & results.few_shot.isna()]
    best = ok.loc[ok.groupby(["task", "layer"])["val_score"].idxmax()]
    m = best.pivot(index="task", columns="layer", values="test_accuracy")
    return m[[c for c in layers if c in m.columns]]


def analyse_store(store: FeatureStore, *, results: pd.DataFrame, map_sample: int = 1000,
                  geometry_sample: int = 1000) -> tuple[dict, list[tuple[str, bytes]]]:
    layers = _feature_layers(store)
    name = store.meta["featureset"]
    matrix = _matrix(results, store.layers)
    tasks = list(matrix.index)
    figures: list[tuple[str, bytes]] = []
    figures.append(("transferability matrix", plots.heatmap(
        matrix.to_numpy(float), tasks, list(matrix.columns), title="probe test accuracy (task x layer)",
        vmin=0.0, vmax=1.0)))
    figures.append(("transferability curves", plots.curves(
        list(matrix.columns), {t: matrix.loc[t].to_numpy(float) for t in tasks},
        title="probe accuracy per layer", ylabel="test accuracy")))

    cka = analysis.cka_matrix(store, layers)
    figures.append(("CKA between layers", plots.heatmap(cka.matrix, cka.layers, cka.layers,
                                                         title="linear CKA between layers", vmin=0, vmax=1)))
    geometry, clusters = [], []
    best_layer = {t: matrix.loc[t].astype(float).idxmax() for t in tasks}
    for layer in layers:
        g = analysis.layer_geometry(store, layer, tasks=tasks, sample=geometry_sample, cluster_sample=geometry_sample)
        geometry.append({"layer": layer, "dim": store.layer_dims[layer], "intrinsic_dim_twonn": g.dimension.twonn,
                         "intrinsic_dim_mle": g.dimension.mle,
                         "pca_components_90": g.pca.n_components.get(0.9),
                         "pca_components_99": g.pca.n_components.get(0.99)})
        for task, q in g.clusters.items():
            if best_layer.get(task) == layer:
                clusters.append({"task": task, "layer": layer, "silhouette": q.silhouette,
                                 "davies_bouldin": q.davies_bouldin, "adjusted_rand_kmeans": q.adjusted_rand})
    leep_rows, leep_by_task, rel_by_task = [], {}, {}
    logit_layer = next((layer for layer in store.layers if layer in LOGIT_LAYERS), None)
    if logit_layer:
        for task in tasks:
            leep_by_task[task] = analysis.store_leep(store, task, layer=logit_layer)
            labels = store.index()[task].dropna().to_numpy(dtype=object)
            rel_by_task[task] = leep_by_task[task] - analysis.leep_chance(labels)
            leep_rows.append({"task": task, "leep": leep_by_task[task], "leep_minus_chance": rel_by_task[task],
                              "best_probe_accuracy": float(matrix.loc[task].max())})
    recs = analysis.recommend_from_results(results, store.layers, leep=leep_by_task or None)
    for task in tasks[:3]:
        m = analysis.layer_map(store, best_layer[task], tasks=[task], sample=map_sample, threads=1)
        figures.append((f"2-D map of {best_layer[task]} by {task}",
                        analysis.draw_map(m, task, title=f"{m.method} of {best_layer[task]}, coloured by {task}")))
    data = {
        "summary": store.summary(),
        "matrix": {"tasks": tasks, "layers": list(matrix.columns), "test_accuracy": matrix.to_numpy(float).tolist()},
        "matrix_rows": [{"task": t, **{c: float(v) for c, v in matrix.loc[t].items()}} for t in tasks],
        "best_layer": best_layer,
        "cka": {"layers": cka.layers, "matrix": cka.matrix.tolist()},
        "geometry": geometry,
        "clusters": clusters,
        "leep": leep_rows,
        "recommendations": [{"task": r.task, "action": r.action, "reasons": list(r.reasons)} for r in recs],
    }
    log.info("analysed %s: %d tasks, %d layers", name, len(tasks), len(layers))
    return data, figures


def build_report(store_uris: Sequence[str], out_dir: str | Path, *, storage_options: Mapping[str, Any] | None = None,
                 map_sample: int = 1000) -> Path:
    """Write `index.html` (self-contained) and `report.json` to out_dir; returns the HTML path."""
    from ..probes.job import run_probes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    featuresets, figures = [], {}
    stores = [FeatureStore(u, storage_options=storage_options) for u in store_uris]
    for store in stores:
        results = latest_probe_results(store)
        if results is None:
            log.info("no probe results for %s yet: running the default linear probes", store.uri)
            results = run_probes(store.uri, default_probe_config(store), storage_options=storage_options).results.table
        data, figs = analyse_store(store, results=results, map_sample=map_sample)
        featuresets.append(data)
        figures[data["summary"]["featureset"]] = figs
    report = {"generated_at": dt.datetime.now(dt.timezone.utc).isoformat(), "library": _library_version(),
              "featuresets": featuresets, "comparison": _compare(featuresets)}
    if len(stores) > 1:
        a, b = stores[0], stores[1]
        cross = analysis.cross_cka(a, b, _feature_layers(a), _feature_layers(b))
        report["cross_cka"] = {"a": a.meta["featureset"], "b": b.meta["featureset"], "layers_a": cross.layers_a,
                               "layers_b": cross.layers_b, "matrix": cross.matrix.tolist()}
        figures["_comparison"] = [("CKA between encoders", plots.heatmap(
            cross.matrix, cross.layers_a, cross.layers_b, title=f"CKA: {a.provenance['encoder']} (rows) vs "
                                                                f"{b.provenance['encoder']} (columns)", vmin=0, vmax=1))]
    (out / "report.json").write_text(json.dumps(report, indent=2, default=_json_default))
    page = out / "index.html"
    page.write_text(html.render(report, figures))
    return page


def _compare(featuresets: list[dict]) -> list[dict]:
    """Best probe accuracy per task and encoder, when several feature sets are reported together."""
    if len(featuresets) < 2:
        return []
    rows = []
    for fs in featuresets:
        for task, layer in fs["best_layer"].items():
            i = fs["matrix"]["tasks"].index(task)
            acc = max(v for v in fs["matrix"]["test_accuracy"][i] if v == v)
            rows.append({"featureset": fs["summary"]["featureset"], "encoder": fs["summary"]["encoder"],
                         "task": task, "best_layer": layer, "test_accuracy": acc})
    return rows


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
