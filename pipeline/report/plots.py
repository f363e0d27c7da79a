"""Figures of the report as PNG bytes (matplotlib, Agg): heatmaps, transfer curves, 2-D maps."""
from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmap(matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], *, title: str, cmap: str = "viridis",
            vmin: float | None = None, vmax: float | None = None, fmt: str = "{:.2f}") -> bytes:
    m = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(cols), 1.0 + 0.55 * len(rows)))
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=40, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if np.isfinite(m[i, j]):
                ax.text(j, i, fmt.format(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if im.norm(m[i, j]) < 0.5 else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def curves(layers: Sequence[str], series: dict[str, Sequence[float]], *, title: str, ylabel: str) -> bytes:
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(layers), 3.2))
    for name, values in series.items():
        ax.plot(range(len(layers)), values, marker="o", label=name)
    ax.set_xticks(range(len(layers)), layers, rotation=40, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_xlabel("layer (early -> late)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
