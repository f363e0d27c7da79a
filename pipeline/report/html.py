"""Renders report data into one self-contained HTML page: inline SVG figures, escaped tables, hoverable maps.

Nothing is fetched: figures are inline SVG, map data and thumbnails are JSON in the page, and the
hover script is inline. Every string from the data (labels, ids, URIs, layer and task names) is
escaped on the way in, and the script writes it back with textContent only.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .per_class import WORST, worst_classes
from .svg import esc, fmt


@dataclass
class MapFigure:
    """One interactive map: its SVG (circles carrying data-i), its points as JSON, and its legend."""

    map_id: str
    caption: str
    svg: str
    data: dict[str, Any]                    # task, ids, labels (None = missing), uris
    legend: list[tuple[str | None, str, int]]  # (label, colour, count)


@dataclass
class Section:
    """The figures and maps of one feature set."""

    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, svg)
    few_shot: list[tuple[str, str]] = field(default_factory=list)
    few_shot_notes: list[str] = field(default_factory=list)  # tasks with nothing to draw, one line each
    maps: list[MapFigure] = field(default_factory=list)


STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;max-width:1300px;color:#222}
h1{margin-bottom:0} h2{border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.85rem}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3} svg.fig,svg.map{margin:.5rem 1rem .5rem 0;border:1px solid #eee;background:#fff}
figure{margin:0 1rem 1rem 0} figcaption{font-size:.8rem;color:#555;max-width:440px}
.figs{display:flex;flex-wrap:wrap;align-items:flex-start} .muted{color:#666;font-size:.85rem}
.legend{font-size:.75rem;list-style:none;padding:0;max-width:440px;columns:2}
.legend span{display:inline-block;width:.7rem;height:.7rem;margin-right:.3rem;vertical-align:middle}
#tip{position:fixed;display:none;pointer-events:none;background:#fff;border:1px solid #888;padding:.3rem .5rem;
font-size:.8rem;max-width:360px;box-shadow:0 2px 6px rgba(0,0,0,.2);z-index:10;word-break:break-all}
#tip img{display:block;margin-top:.3rem;max-width:96px;image-rendering:pixelated}
svg.map circle:hover{stroke:#000;stroke-width:1.5}
"""

MAP_SCRIPT = """
(function () {
  var tip = document.getElementById('tip');
  var thumbs = JSON.parse(document.getElementById('thumbs').textContent);
  function line(label, value) {
    var div = document.createElement('div');
    var b = document.createElement('b');
    b.textContent = label + ': ';
    div.appendChild(b);
    div.appendChild(document.createTextNode(value));
    tip.appendChild(div);
  }
  document.querySelectorAll('svg.map').forEach(function (svg) {
    var data = JSON.parse(document.getElementById(svg.getAttribute('data-src')).textContent);
    svg.addEventListener('mouseover', function (ev) {
      var i = ev.target.getAttribute('data-i');
      if (i === null) { return; }
      i = Number(i);
      var label = data.labels[i];
      tip.replaceChildren();
      line('image_id', data.ids[i]);
      line(data.task, label === null ? '(missing label)' : label);
      line('uri', data.uris[i]);
      var src = thumbs[data.ids[i]];
      if (typeof src === 'string' && src.indexOf('data:image/') === 0) {
        var img = document.createElement('img');
        img.alt = data.ids[i];
        img.src = src;
        tip.appendChild(img);
      }
      tip.setAttribute('data-image-id', data.ids[i]);
      tip.style.display = 'block';
      tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - 380) + 'px';
      tip.style.top = (ev.clientY + 14) + 'px';
    });
    svg.addEventListener('mouseout', function () { tip.style.display = 'none'; });
  });
})();
"""


def json_script(element_id: str, obj: Any) -> str:
    """JSON in a <script type="application/json">, safe whatever the strings hold (no `</script>` can end it).

    Non-finite floats become null (JSON has no NaN); <, > and & are written as \\u escapes, which
    JSON.parse turns back into the same characters.
    """
    text = json.dumps(finite(obj), ensure_ascii=False, allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def finite(o: Any) -> Any:
    """Non-finite floats as None, recursively (JSON has no NaN)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def table(rows: list[dict], columns: list[str] | None = None, *, digits: int = 3) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(r.get(c), digits))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(v: Any, digits: int) -> str:
    if isinstance(v, (list, tuple)):
        return "; ".join(_cell(x, digits) for x in v)
    return fmt(v, digits)


def _figure(caption: str, svg: str) -> str:
    return f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"


def _map(m: MapFigure) -> str:
    legend = "".join(f'<li><span style="background:{c}"></span>{esc("(missing label)" if lab is None else lab)}'
                     f" ({n})</li>" for lab, c, n in m.legend)
    return (f"<figure>{m.svg}<figcaption>{esc(m.caption)}</figcaption><ul class='legend'>{legend}</ul></figure>"
            + json_script(m.map_id, m.data))


def render(report: dict, sections: dict[str, Section], thumbs: dict[str, str]) -> str:
    """`sections` maps a featureset name (and "_comparison") to its figures and maps."""
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>strata transferability report</title>"
             f"<style>{STYLE}</style></head><body><div id='tip'></div>",
             "<h1>strata transferability report</h1>",
             f"<p class='muted'>generated {esc(report['generated_at'])} by {esc(report['library'])}. Layers and "
             "heads are chosen on validation; test figures are those of the chosen head, reported once.</p>"]
    comp = report.get("comparison") or {}
    if comp.get("encoders"):
        parts.append("<h2>Encoders compared</h2><p class='muted'>Best layer per task chosen on validation; scores "
                     f"of each encoder's last feature layer; {100 * comp.get('shared_images', 1.0):.0f}% of the "
                     "images are in every store.</p>" + table(comp["encoders"]))
        if comp.get("agreement"):
            parts.append("<h3>How well each score ranks the encoders</h3>" + table(comp["agreement"]))
        parts.append("<div class='figs'>" + "".join(_figure(c, s) for c, s in sections.get(
            "_comparison", Section()).figures) + "</div>")
    for fs in report["featuresets"]:
        parts.append(_featureset(fs, sections.get(fs["summary"]["featureset"], Section())))
    parts.append(json_script("thumbs", thumbs))
    parts.append(f"<script>{MAP_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _selection_note(fs: dict) -> str:
    """Which validation metric chose the heads and layers (probes.selection_metric), when not plain accuracy."""
    by = fs.get("selection_metric") or {}
    other = {t: m for t, m in by.items() if m not in ("accuracy", "r2")}
    if not other:
        return ""
    names = sorted(set(other.values()))
    tasks = ", ".join(sorted(other))
    return (f"<p class='muted'>Heads and best layers are chosen on validation {esc(' / '.join(names))} (the probes' "
            f"selection_metric; tasks: {esc(tasks)}), the val_score column; accuracy figures are shown as "
            "measured.</p>")


def _featureset(fs: dict, sec: Section) -> str:
    name = fs["summary"]["featureset"]
    used = fs.get("probe_results") or {}
    p = [f"<h2 id='{esc(name)}'>{esc(name)}</h2>"]
    if used:
        p.append(f"<p class='probe-results'>Probe results used: {esc(used.get('text', ''))}</p>")
    p += ["<h3>Recommendation per task</h3>"
          + table(fs["recommendations"], ["task", "action", "best_layer", "score_used", "reasons"]),
          "<div class='figs'>" + "".join(_figure(c, s) for c, s in sec.figures) + "</div>",
          "<h3>Probe accuracy per task and layer (head selected on validation)</h3>" + _selection_note(fs)
          + table(fs["matrix_rows"])]
    if fs.get("per_class"):
        worst = worst_classes(fs["per_class"])
        p.append(f"<h3>Per-class test accuracy of the chosen head (the {WORST} worst classes per task; all in "
                 f"report.json)</h3>" + table(worst, ["task", "layer", "class", "name", "test_accuracy",
                                                      "of_classes"]))
    p.append("<h3>Few-shot curves</h3>")
    if sec.few_shot:
        p.append("<p class='muted'>Test accuracy (validation where a caption says so) of the validation-selected "
                 "head against training examples per class (k); 'all' is the full training split. Per layer, and "
                 "per head kind at the task's best layer: where prototypes, linear and MLP heads cross shows which "
                 "head suits how much data.</p>")
        p.append("<div class='figs'>" + "".join(_figure(c, s) for c, s in sec.few_shot) + "</div>")
    elif not sec.few_shot_notes:
        p.append("<p class='muted'>The probe results have no few-shot runs: set probes.few_shot (e.g. "
                 "[1, 5, 10, 20, null]) to see accuracy against data size.</p>")
    p += [f"<p class='muted few-shot-note'>{esc(note)}</p>" for note in sec.few_shot_notes]
    p.append("<h3>Transferability scores per task and layer</h3>"
             "<p class='muted'>Computed on each task's training rows (standardised), without training a probe. "
             "Below: each score's rank agreement with the probes' accuracy across layers (Kendall tau on "
             "validation, which the recommender uses to pick a score; and on test).</p>" + table(fs["scores"]))
    p.append(table(fs["score_agreement"]))
    if sec.maps:
        p.append("<h3>Maps (hover a point for its image)</h3>")
        p.append("<div class='figs'>" + "".join(_map(m) for m in sec.maps) + "</div>")
    p.append("<h3>Geometry per layer</h3>" + table(fs["geometry"]))
    p.append("<h3>Cluster quality per task (best layer)</h3>" + table(fs["clusters"]))
    if fs.get("leep"):
        p.append("<h3>LEEP from the source classifier vs probe accuracy</h3>" + table(fs["leep"]))
    prov = [{"key": k, "value": v} for k, v in fs["summary"].items() if k not in ("layers",)]
    p.append("<h3>Provenance</h3>" + table(prov, ["key", "value"]))
    return "\n".join(p)
