"""Renders report data into one self-contained static HTML page (plots embedded as data URIs)."""
from __future__ import annotations

import base64
import html
from typing import Any


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, tuple)):
        return "; ".join(_fmt(x) for x in v)
    return "" if v is None else str(v)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:1200px;color:#222}
h1{margin-bottom:0} h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.85rem}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3} img{max-width:100%;margin:.5rem 1rem .5rem 0;border:1px solid #eee}
.figs{display:flex;flex-wrap:wrap;align-items:flex-start} .muted{color:#666;font-size:.85rem}
"""


def render(report: dict, figures: dict[str, list[tuple[str, bytes]]]) -> str:
    """`figures` maps a featureset name to its (caption, png) pairs, in display order."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>strata transferability report</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>strata transferability report</h1>",
             f"<p class='muted'>generated {html.escape(report['generated_at'])} by {html.escape(report['library'])}</p>"]
    if report.get("comparison"):
        parts.append("<h2>Encoders compared</h2>" + _table(report["comparison"]))
        parts += [_img(png, cap) for cap, png in figures.get("_comparison", [])]
    for fs in report["featuresets"]:
        name = fs["summary"]["featureset"]
        parts.append(f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>")
        parts.append("<h3>Recommendation per task</h3>" + _table(fs["recommendations"], ["task", "action", "reasons"]))
        parts.append("<div class='figs'>" + "".join(_img(png, cap) for cap, png in figures.get(name, [])) + "</div>")
        parts.append("<h3>Probe accuracy (test, validation-selected head) per task and layer</h3>"
                     + _table(fs["matrix_rows"]))
        parts.append("<h3>Geometry per layer</h3>" + _table(fs["geometry"]))
        parts.append("<h3>Cluster quality per task (best layer)</h3>" + _table(fs["clusters"]))
        if fs.get("leep"):
            parts.append("<h3>LEEP from the source classifier vs probe accuracy</h3>" + _table(fs["leep"]))
        prov = [{"key": k, "value": v} for k, v in fs["summary"].items() if k not in ("layers",)]
        parts.append("<h3>Provenance</h3>" + _table(prov, ["key", "value"]))
    parts.append("</body></html>")
    return "\n".join(parts)
