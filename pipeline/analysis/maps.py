"""2-D maps of a layer (t-SNE, or UMAP when installed) on a seeded subsample, and a PNG of one coloured by a task."""
from __future__ import annotations

import importlib.util
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits

from .geometry import labels_for, sample_rows, task_columns

log = logging.getLogger(__name__)

MAP_SAMPLE = 2_000
_MISSING = "(missing)"
PCA_BEFORE_EMBED = 50  # the usual denoising and speed-up step before t-SNE on wide features
TSNE_EXACT_MAX = 500  # small maps: exact t-SNE is as fast as Barnes-Hut and needs no OpenMP threads


@dataclass(frozen=True, eq=False)
class LayerMap:
    layer: str
    method: str                     # "tsne" or "umap"
    coords: np.ndarray              # (m, 2)
    image_ids: np.ndarray           # (m,)
    labels: dict[str, np.ndarray]   # task -> (m,) labels, None where missing


def map_method(method: str = "auto") -> str:
    """'umap' when asked for (or 'auto') and importable, else 'tsne'."""
    if method not in ("auto", "tsne", "umap"):
        raise ValueError(f"unknown map method {method!r}; choose 'auto', 'tsne' or 'umap'")
    has_umap = importlib.util.find_spec("umap") is not None
    if method == "umap" and not has_umap:
        log.info("umap is not installed; drawing the map with t-SNE")
    return "umap" if method in ("auto", "umap") and has_umap else "tsne"


def embed_2d(X: np.ndarray, *, method: str = "auto", seed: int = 0, perplexity: float = 30.0,
             threads: int | None = None) -> tuple[np.ndarray, str]:
    """(m, 2) coordinates of X and the method used; wide inputs are reduced to 50 PCA components first.

    `threads` caps BLAS/OpenMP threads for the call: Barnes-Hut t-SNE slows down several-fold when
    its OpenMP threads compete with other work for the same cores.
    """
    if threads is not None:
        with threadpool_limits(threads):
            return embed_2d(X, method=method, seed=seed, perplexity=perplexity)
    X = np.asarray(X, dtype=np.float32)
    if len(X) < 3:
        raise ValueError(f"need at least 3 rows for a 2-D map; got {len(X)}")
    if X.shape[1] > PCA_BEFORE_EMBED and len(X) > PCA_BEFORE_EMBED:
        X = PCA(n_components=PCA_BEFORE_EMBED, random_state=seed).fit_transform(X)
    used = map_method(method)
    if used == "umap":
        import umap

        coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(X)
    else:
        perp = min(perplexity, max((len(X) - 1) / 3.0, 1.0))  # t-SNE needs perplexity < n
        algo = "exact" if len(X) <= TSNE_EXACT_MAX else "barnes_hut"
        coords = TSNE(n_components=2, perplexity=perp, init="pca", method=algo,
                      random_state=seed).fit_transform(X)
    return np.asarray(coords, dtype=np.float32), used


def layer_map(source: Any, layer: str, *, tasks: Sequence[str] | None = None, sample: int = MAP_SAMPLE,
              seed: int = 0, method: str = "auto", threads: int | None = None) -> LayerMap:
    """A 2-D map of `sample` seeded rows of a layer, with their labels for every task."""
    ids, X = sample_rows(source, layer, sample, seed=seed)
    coords, used = embed_2d(X, method=method, seed=seed, threads=threads)
    labels = {t: labels_for(source, ids, t) for t in task_columns(source, tasks)}
    return LayerMap(layer=layer, method=used, coords=coords, image_ids=ids, labels=labels)


def draw_map(m: LayerMap, task: str, *, title: str | None = None, max_legend: int = 12) -> bytes:
    """PNG bytes of the map coloured by `task`; missing labels in light grey.

    Uses a bare `Figure` (Agg canvas), so it touches neither pyplot's global state nor the backend.
    Labels are drawn literally: mathtext is off, so a label such as `$x$` is not parsed.
    """
    with matplotlib.rc_context({"text.parse_math": False}):
        return _draw_map(m, task, title=title, max_legend=max_legend)


def _draw_map(m: LayerMap, task: str, *, title: str | None, max_legend: int) -> bytes:
    if task not in m.labels:
        raise ValueError(f"task {task!r} not in this map; tasks: {list(m.labels)}")
    labels = np.array([_MISSING if v is None or v != v else str(v) for v in m.labels[task]], dtype=object)
    classes = sorted(set(labels) - {_MISSING})
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot()
    sel = labels == _MISSING
    if sel.any():
        ax.scatter(m.coords[sel, 0], m.coords[sel, 1], s=5, color="0.85", label=_MISSING)
    for k, cls in enumerate(classes):
        sel = labels == cls
        ax.scatter(m.coords[sel, 0], m.coords[sel, 1], s=5, color=cmap(k % cmap.N), label=cls)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{m.layer} ({m.method}) by {task}", fontsize=10)
    if len(classes) <= max_legend:
        ax.legend(fontsize=7, markerscale=2, frameon=False, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
