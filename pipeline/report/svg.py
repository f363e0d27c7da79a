"""Figures of the report as inline SVG: heatmaps, line charts and 2-D maps, with every label drawn as literal text.

Hand-written SVG rather than matplotlib PNGs: labels are escaped text (no mathtext, so `$x$` is
just those three characters), values can be hovered (`<title>`) and selected, NaN and inf are
drawn as such, and the page stays self-contained without a plotting library in the browser.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import to_hex

FONT = "font-family:system-ui,sans-serif;font-size:11px"
MISSING_COLOUR = "#d0d0d0"


def esc(text: object) -> str:
    """Any value as literal SVG/HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape(str(text), quote=True)


def fmt(v: object, digits: int = 3) -> str:
    """Numbers with `digits` decimals; NaN / inf / -inf spelled out; anything else as str."""
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}f}"
    return "" if v is None else str(v)


def palette(n: int) -> list[str]:
    """n distinct colours: tab10, tab20, then evenly spaced hues of a cyclic map."""
    if n <= 10:
        return [to_hex(colormaps["tab10"](i)) for i in range(n)]
    if n <= 20:
        return [to_hex(colormaps["tab20"](i)) for i in range(n)]
    return [to_hex(colormaps["hsv"](i / n)) for i in range(n)]


def ramp(n: int) -> list[str]:
    """n colours along viridis, low to high: bins of a numeric label."""
    return [to_hex(colormaps["viridis"](i / max(n - 1, 1))) for i in range(n)]


def _text(x: float, y: float, s: object, *, anchor: str = "start", rotate: float | None = None,
          size: int | None = None, weight: str | None = None) -> str:
    tr = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
    style = (f' font-size="{size}"' if size else "") + (f' font-weight="{weight}"' if weight else "")
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{style}{tr}>{esc(s)}</text>'


def _svg(width: float, height: float, body: list[str], *, cls: str = "fig", extra: str = "") -> str:
    return (f'<svg class="{cls}" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" style="{FONT}"{extra}>' + "".join(body) + "</svg>")


def heatmap(matrix: np.ndarray, rows: Sequence[object], cols: Sequence[object], *, title: str,
            vmin: float | None = None, vmax: float | None = None, digits: int = 2) -> str:
    """Cells coloured by viridis; each cell prints its value (NaN/inf as text, on grey)."""
    m = np.asarray(matrix, dtype=float).reshape(len(rows), len(cols))
    finite = m[np.isfinite(m)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    cmap = colormaps["viridis"]
    cw, ch = 64, 26
    left = 12 + 7 * max([len(str(r)) for r in rows] + [4])
    top, bottom = 28, 12 + 6 * max([len(str(c)) for c in cols] + [4])
    body = [_text(left, 16, title, weight="bold", size=12)]
    for i, r in enumerate(rows):
        body.append(_text(left - 6, top + i * ch + ch / 2 + 4, r, anchor="end"))
        for j, c in enumerate(cols):
            v = m[i, j]
            x, y = left + j * cw, top + i * ch
            if np.isfinite(v):
                t = 0.5 if hi == lo else min(max((v - lo) / (hi - lo), 0.0), 1.0)
                fill, ink = to_hex(cmap(t)), "#fff" if t < 0.55 else "#000"
            else:
                fill, ink = MISSING_COLOUR, "#000"
            body.append(f'<rect x="{x}" y="{y}" width="{cw - 1}" height="{ch - 1}" fill="{fill}">'
                        f'<title>{esc(r)} / {esc(c)}: {esc(fmt(v, 4))}</title></rect>')
            body.append(f'<text x="{x + cw / 2:.1f}" y="{y + ch / 2 + 4:.1f}" text-anchor="middle" fill="{ink}" '
                        f'pointer-events="none">{esc(fmt(v, digits))}</text>')
    yb = top + len(rows) * ch + 6
    for j, c in enumerate(cols):
        body.append(_text(left + j * cw + cw / 2, yb, c, anchor="end", rotate=-35))
    return _svg(max(left + len(cols) * cw + 20, left + 8 * len(title) + 10), yb + bottom, body)


def line_chart(x_labels: Sequence[object], series: dict[str, Sequence[float]], *, title: str, ylabel: str,
               xlabel: str = "", ylim: tuple[float, float] | None = None) -> str:
    """One line per series over categorical x; non-finite points are left out (a gap) and listed in <title>."""
    n = len(x_labels)
    legend = {}
    for name, values in series.items():
        bad = [f"{x_labels[i]}: {'missing' if v is None else fmt(float(v))}" for i, v in enumerate(values)
               if v is None or not np.isfinite(v)]
        legend[name] = str(name) + (f" (not drawn: {', '.join(bad)})" if bad else "")
    right = 40 + 7 * max([len(x) for x in legend.values()] + [8])
    W, H, left, top = max(360, 70 * n + 60 + right, 70 + 8 * len(title)), 260, 56, 28
    bottom = 20 + 6 * max([len(str(x)) for x in x_labels] + [4])
    vals = [float(v) for s in series.values() for v in s if v is not None and np.isfinite(v)]
    lo, hi = ylim if ylim else ((min(vals), max(vals)) if vals else (0.0, 1.0))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    pw, ph = W - left - right, H - top - 14

    def px(i: int) -> float:
        return left + (pw * (i + 0.5) / max(n, 1))

    def py(v: float) -> float:
        return top + ph * (1 - (v - lo) / (hi - lo))

    body = [_text(left, 16, title, weight="bold", size=12),
            f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>']
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        body.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>')
        body.append(_text(left - 4, py(v) + 4, fmt(v, 2), anchor="end"))
    body.append(_text(14, top + ph / 2, ylabel, anchor="middle", rotate=-90))
    for i, x in enumerate(x_labels):
        body.append(_text(px(i), top + ph + 14, x, anchor="end", rotate=-35))
    if xlabel:
        body.append(_text(left + pw / 2, H + bottom - 6, xlabel, anchor="middle"))
    for (name, values), colour in zip(series.items(), palette(len(series))):
        pts = [(px(i), py(float(v)), v) for i, v in enumerate(values) if v is not None and np.isfinite(v)]
        if len(pts) > 1:
            body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                        + " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts) + '"/>')
        for (x, y, v), i in zip(pts, [i for i, v in enumerate(values) if v is not None and np.isfinite(v)]):
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"><title>{esc(name)}, '
                        f'{esc(x_labels[i])}: {esc(fmt(float(v), 4))}</title></circle>')
        ly = top + 14 * (list(series).index(name)) + 6
        body.append(f'<rect x="{W - right + 10}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>')
        body.append(_text(W - right + 24, ly + 1, legend[name]))
    return _svg(W, H + bottom, body)


def scatter_map(coords: np.ndarray, codes: np.ndarray, colours: Sequence[str], *, data_id: str,
                size: int = 420) -> str:
    """A 2-D map: one circle per point with data-i (its row in the map's JSON), coloured by class code (-1: missing).

    The page's script shows a point's image_id, label and URI on hover (see html.MAP_SCRIPT).
    """
    c = np.asarray(coords, dtype=float)
    ok = np.isfinite(c).all(1)
    lo, hi = (c[ok].min(0), c[ok].max(0)) if ok.any() else (np.zeros(2), np.ones(2))
    span = np.where(hi > lo, hi - lo, 1.0)
    pad = 8
    xy = pad + (c - lo) / span * (size - 2 * pad)
    body = [f'<rect width="{size}" height="{size}" fill="#fff" stroke="#ddd"/>']
    for i in np.argsort(np.asarray(codes) >= 0, kind="stable"):  # missing labels first, underneath
        if not ok[i]:
            continue
        fill = colours[codes[i]] if codes[i] >= 0 else MISSING_COLOUR
        body.append(f'<circle cx="{xy[i, 0]:.1f}" cy="{size - xy[i, 1]:.1f}" r="3" fill="{fill}" data-i="{i}"/>')
    return _svg(size, size, body, cls="map", extra=f' data-src="{esc(data_id)}"')
