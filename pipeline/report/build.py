"""The transferability report: numbers per feature set (probes, scores, CKA, geometry, LEEP, maps, advice) -> HTML + JSON.

Validation selects, test reports: the best layer of a task, the head shown for a (task, layer) and
the encoder comparison are all chosen on validation scores; test figures are those of the chosen
heads.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import analysis, storage
from ..analysis.score_table import SCORE_LABELS, rank_agreement
from ..labels import missing_labels
from ..probes.config import SplitSpec
from ..stores import FeatureStore
from ..stores.writer import _library_version
from . import html, sections, svg
from .html import Section
from .per_class import per_class_rows
from .probe_results import ProbeSource, check_given, default_probe_config, find_probe_results, read_probe_results
from .sections import LOGIT_LAYERS, feature_layers  # noqa: F401 - re-exported for callers of the old names
from .thumbs import store_source, thumbnails

log = logging.getLogger(__name__)

THUMBNAILS = 600


def _split_spec(config: dict) -> SplitSpec:
    split = dict(config.get("split") or {})
    split.pop("file", None)
    try:
        return SplitSpec(**{k: v for k, v in split.items() if k in SplitSpec.__dataclass_fields__})
    except TypeError:
        return SplitSpec()


def analyse_store(store: FeatureStore, *, results: pd.DataFrame, splits_table: pd.DataFrame | None = None,
                  probe_config: dict | None = None, map_sample: int = 1000, geometry_sample: int = 1000
                  ) -> tuple[dict, Section]:
    layers = sections.feature_layers(store)
    probed = [layer for layer in sections.layer_order(store) if layer in set(results["layer"])]
    chosen = sections.chosen_heads(results, probed)
    tasks = sorted(set(chosen["task"]))
    best = sections.best_layers(chosen)
    sec = Section()
    cka = analysis.cka_matrix(store, layers)
    sections.section_figures(sec, chosen, tasks, probed, cka)

    classification = [t for t in tasks if (chosen.loc[chosen["task"] == t, "metric"] == "accuracy").all()]
    geometry, clusters = [], []
    for layer in layers:
        g = analysis.layer_geometry(store, layer, tasks=classification, sample=geometry_sample,
                                    cluster_sample=geometry_sample)
        geometry.append({"layer": layer, "dim": store.layer_dims[layer], "intrinsic_dim_twonn": g.dimension.twonn,
                         "intrinsic_dim_mle": g.dimension.mle, "pca_components_90": g.pca.n_components.get(0.9),
                         "pca_components_99": g.pca.n_components.get(0.99)})
        for task, q in g.clusters.items():
            if best.get(task) == layer:
                clusters.append({"task": task, "layer": layer, "silhouette": q.silhouette,
                                 "davies_bouldin": q.davies_bouldin, "adjusted_rand_kmeans": q.adjusted_rand})
    leep_rows, leep_by_task = [], {}
    logit_layer = next((layer for layer in sections.layer_order(store) if layer in LOGIT_LAYERS), None)
    if logit_layer:
        for task in classification:
            leep_by_task[task] = analysis.store_leep(store, task, layer=logit_layer)
            labels = store.index()[task].to_numpy(dtype=object)
            labels = labels[~missing_labels(labels)]
            mine = chosen[(chosen["task"] == task) & (chosen["layer"] == best[task])].iloc[0]
            leep_rows.append({"task": task, "leep": leep_by_task[task],
                              "leep_minus_chance": leep_by_task[task] - analysis.leep_chance(labels),
                              "best_layer": best[task], "val_accuracy": mine["val_accuracy"],
                              "test_accuracy": mine["test_accuracy"]})
    splits = sections.task_splits(store, classification, splits_table, _split_spec(probe_config or {}))
    scores, agreement = sections.scores_section(store, splits, [x for x in probed if x in layers], chosen,
                                                leep_by_task)
    recs = analysis.recommend_from_results(results, probed, leep=leep_by_task or None, scores=scores,
                                           logit_layers=LOGIT_LAYERS)
    few_rows, sec.few_shot, sec.few_shot_notes = sections.few_shot_figures(results, probed, best)
    sec.maps = sections.map_figures(store, tasks, best, sample=map_sample,
                                    numeric=[t for t in tasks if t not in classification])
    data = {
        "summary": store.summary(),
        "matrix": {"tasks": tasks, "layers": probed,
                   "val_accuracy": _pivot(chosen, tasks, probed, "val_accuracy"),
                   "test_accuracy": _pivot(chosen, tasks, probed, "test_accuracy"),
                   "val_score": _pivot(chosen, tasks, probed, "val_score")},
        "matrix_rows": sections.records(chosen.drop(columns=["hparams"])),
        "best_layer": best,
        "selection_metric": sections.selection_metrics(chosen),
        "few_shot_notes": list(sec.few_shot_notes),
        "cka": {"layers": cka.layers, "matrix": cka.matrix.tolist()},
        "geometry": geometry,
        "clusters": clusters,
        "leep": leep_rows,
        "scores": sections.records(scores),
        "score_agreement": sections.records(agreement),
        "few_shot": few_rows,
        "per_class": per_class_rows(results, chosen, best, store.class_names),
        "maps": [{"task": m.data["task"], "layer": m.data["layer"], "points": len(m.data["ids"]),
                  "caption": m.caption, "legend": [{"label": lab, "count": n} for lab, _, n in m.legend]}
                 for m in sec.maps],
        "recommendations": [{"task": r.task, "action": r.action, "best_layer": r.best_layer,
                             "score_used": SCORE_LABELS.get(r.score_used or "", r.score_used),
                             "reasons": list(r.reasons)} for r in recs],
    }
    log.info("analysed %s: %d tasks, %d layers", store.meta["featureset"], len(tasks), len(layers))
    return data, sec


def _pivot(chosen: pd.DataFrame, tasks: list[str], layers: list[str], column: str) -> list[list[float]]:
    return chosen.pivot(index="task", columns="layer", values=column).reindex(index=tasks, columns=layers
                                                                              ).to_numpy(float).tolist()


MIN_MAP_SAMPLE = 3  # a 2-D map (t-SNE / UMAP) needs at least 3 points


def check_map_sample(map_sample: int) -> None:
    if isinstance(map_sample, bool) or not isinstance(map_sample, (int, np.integer)) or map_sample < MIN_MAP_SAMPLE:
        raise ValueError(f"--map-sample must be an integer >= {MIN_MAP_SAMPLE} (images per map), got {map_sample!r}")


def check_out(out_dir: str | Path, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(filesystem, folder) of the report's output folder, any fsspec URI; a file there (or, on local disk, a
    file where one of its parent folders should be) is refused with a ValueError."""
    uri = str(out_dir)
    fs, path = storage.resolve(uri, storage_options)
    path = path.rstrip("/") or path
    shown = storage.redact_uri(uri)
    if fs.isfile(path):
        raise ValueError(f"--out {shown} is a file: name a folder for index.html and report.json")
    if storage.is_local(fs):
        for parent in Path(path).parents:
            if parent.is_file():
                raise ValueError(f"--out {shown}: {parent} is a file, not a folder")
    return fs, path


def build_report(store_uris: Sequence[str], out_dir: str | Path, *, storage_options: Mapping[str, Any] | None = None,
                 map_sample: int = 1000, thumbnail_limit: int = THUMBNAILS,
                 results: Sequence[str] | None = None) -> Path | str:
    """Write `index.html` (self-contained) and `report.json` to out_dir, any fsspec URI (local folder, s3://...);
    returns the page: a Path on local disk, else its URI (credentials redacted).

    `results`: probe results folders, one per store in the same order (`strata probe` output); without, each
    store's newest results for its latest version, else for an earlier version (a warning names it), else a
    default probe grid run here. The page and report.json say which results were used.
    """
    from ..probes.job import run_probes

    check_map_sample(map_sample)
    store_uris = list(store_uris)
    given = list(results or [])
    if given and len(given) != len(store_uris):
        raise ValueError(f"--results given {len(given)} time(s) for {len(store_uris)} --store: give one results "
                         "folder per store, in the same order")
    out_fs, out_path = check_out(out_dir, storage_options)
    sources: list[ProbeSource | None] = [read_probe_results(u, storage_options) for u in given]
    sources = sources or [None] * len(store_uris)
    featuresets, secs = [], {}
    stores = [FeatureStore(u, storage_options=storage_options) for u in store_uris]
    for store, found in zip(stores, sources):
        if found is not None:
            check_given(found, store)
        else:
            found = find_probe_results(store)
        if found is None:
            log.info("no probe results for %s yet: running the default probes", storage.redact_uri(store.uri))
            run = run_probes(store.uri, default_probe_config(store), storage_options=storage_options)
            found = ProbeSource(run.results.table, run.results.splits, run.results.config or {},
                                storage.redact_uri(run.out_uri), run.store_version, "default")
        data, sec = analyse_store(store, results=found.results, splits_table=found.splits, probe_config=found.config,
                                  map_sample=map_sample)
        data["probe_results"] = found.describe(store.version)
        featuresets.append(data)
        secs[data["summary"]["featureset"]] = sec
    thumbs = _thumbs(stores, secs, thumbnail_limit, storage_options)
    report = {"generated_at": dt.datetime.now(dt.timezone.utc).isoformat(), "library": _library_version(),
              "featuresets": featuresets, "comparison": compare(featuresets, shared_images(stores)),
              "thumbnails": len(thumbs)}
    if len(stores) > 1:
        a, b = stores[0], stores[1]
        cross = analysis.cross_cka(a, b, sections.feature_layers(a), sections.feature_layers(b))
        report["cross_cka"] = {"a": a.meta["featureset"], "b": b.meta["featureset"], "layers_a": cross.layers_a,
                               "layers_b": cross.layers_b, "matrix": cross.matrix.tolist()}
        secs["_comparison"] = Section(figures=[("Linear CKA between the layers of two encoders on the same images.",
                                                svg.heatmap(cross.matrix, cross.layers_a, cross.layers_b,
                                                            title=f"CKA: {a.provenance['encoder']} (rows) vs "
                                                                  f"{b.provenance['encoder']} (columns)",
                                                            vmin=0, vmax=1))])
    files = {"report.json": json.dumps(html.finite(report), indent=2, default=_json_default).encode(),
             "index.html": html.render(report, secs, thumbs).encode("utf-8")}
    out_fs.makedirs(out_path, exist_ok=True)
    for name, data in files.items():  # the page last: a reader who sees it finds its numbers too
        storage.atomic_write_bytes(out_fs, f"{out_path}/{name}", data)
    if storage.is_local(out_fs):
        return Path(out_path) / "index.html"
    log.info("report written to %s", storage.redact_uri(str(out_dir)))
    return f"{storage.redact_uri(str(out_dir).rstrip('/'))}/index.html"


def _thumbs(stores, secs: dict[str, Section], limit: int, storage_options) -> dict[str, str]:
    """Thumbnails of the images on the maps (shared by id), at most `limit`; none when limit is 0."""
    out: dict[str, str] = {}
    for store in stores:
        sec = secs.get(store.meta["featureset"])
        if sec is None or len(out) >= limit:
            continue
        ids = [i for m in sec.maps for i in m.data["ids"]]
        uris = [u for m in sec.maps for u in m.data["uris"]]
        fresh = [(i, u) for i, u in zip(ids, uris) if i not in out]
        if fresh:
            source = store_source(store) if any("#" in str(u) for _, u in fresh) else None
            index = store.index_table()
            prints = dict(zip(index.column("image_id").to_pylist(), index.column("fingerprint").to_pylist()))
            out.update(thumbnails([i for i, _ in fresh], [u for _, u in fresh], limit=limit - len(out),
                                  storage_options=storage_options, source=source, fingerprints=prints))
    return out


def shared_images(stores: Sequence[FeatureStore]) -> float:
    """The fraction of the first store's images that every other store has too."""
    ids = [set(s.index()["image_id"].astype(str)) for s in stores]
    return len(set.intersection(*ids)) / max(len(ids[0]), 1) if ids else 0.0


def compare(featuresets: list[dict], shared: float = 1.0) -> dict[str, Any]:
    """Per (task, encoder) when several feature sets are reported together: the layer chosen on validation,
    its val and test accuracy, the transferability scores of the encoder's last feature layer, and how
    well each score ranks the encoders (needs 3 or more encoders, and the same images: `shared` is the
    fraction they have in common; below one half no ranking is made)."""
    if len(featuresets) < 2:
        return {}
    rows = []
    for fs in featuresets:
        scores = pd.DataFrame(fs["scores"])
        for task, layer in fs["best_layer"].items():
            i, j = fs["matrix"]["tasks"].index(task), fs["matrix"]["layers"].index(layer)
            row = {"featureset": fs["summary"]["featureset"], "encoder": fs["summary"]["encoder"], "task": task,
                   "best_layer": layer, "val_accuracy": fs["matrix"]["val_accuracy"][i][j],
                   "test_accuracy": fs["matrix"]["test_accuracy"][i][j]}
            if fs["matrix"].get("val_score") is not None:
                row["selection_metric"] = (fs.get("selection_metric") or {}).get(task, "accuracy")
                row["val_score"] = fs["matrix"]["val_score"][i][j]
            mine = scores[scores["task"] == task] if len(scores) else scores
            if len(mine):
                last = mine.iloc[-1]  # layers are in early-to-late order
                row["scored_layer"] = last["layer"]
                row.update({k: last[k] for k in ("logme", "nleep", "h_score", "knn_accuracy", "leep") if k in last})
            rows.append(row)
    df = pd.DataFrame(rows)
    agreement: list[dict] = []
    if shared < 0.5:
        log.warning("report: the stores share %.0f%% of their images; encoders are listed, not ranked", 100 * shared)
        return {"encoders": sections.records(df), "agreement": agreement, "shared_images": shared}
    for task, g in df.groupby("task", sort=True):
        for name in ("logme", "nleep", "h_score", "knn_accuracy", "leep"):
            if name in g:
                a = rank_agreement(g[name], g["val_accuracy"])
                agreement.append({"task": task, "score": SCORE_LABELS[name], "encoders": len(g),
                                  "kendall_tau_val": a["kendall_tau"],
                                  "kendall_tau_test": rank_agreement(g[name], g["test_accuracy"])["kendall_tau"]})
    return {"encoders": sections.records(df), "agreement": agreement, "shared_images": shared}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
