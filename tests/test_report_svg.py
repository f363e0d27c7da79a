"""SVG figures: labels as literal escaped text, NaN and inf drawn as such, maps carry their point indices."""
import math
import xml.etree.ElementTree as ET

import numpy as np

from pipeline.report import svg

NS = "{http://www.w3.org/2000/svg}"


def _texts(doc: str) -> list[str]:
    return ["".join(t.itertext()) for t in ET.fromstring(doc).iter(f"{NS}text")]


def test_heatmap_prints_nan_and_inf_and_literal_labels():
    doc = svg.heatmap(np.array([[0.5, math.nan], [math.inf, -math.inf]]), ["$x$", "<b>"], ["a & b", ""],
                      title="t $\\alpha$")
    texts = _texts(doc)  # parses as XML: every label was escaped
    assert {"0.50", "NaN", "inf", "-inf", "$x$", "<b>", "a & b", "t $\\alpha$"} <= set(texts)


def test_line_chart_leaves_gaps_for_non_finite_points_and_says_so():
    doc = svg.line_chart(["1", "5", "all"], {"l1": [0.5, math.nan, 0.9], "$y$": [None, 0.7, math.inf]},
                         title="few-shot", ylabel="acc")
    root = ET.fromstring(doc)
    assert len(list(root.iter(f"{NS}circle"))) == 2 + 1
    texts = _texts(doc)
    assert "l1 (not drawn: 5: NaN)" in texts and "$y$ (not drawn: 1: missing, all: inf)" in texts


def test_scatter_map_points_carry_their_row_and_missing_labels_are_grey():
    coords = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, np.nan], [0.2, 0.8]])
    doc = svg.scatter_map(coords, np.array([0, 1, 0, -1]), ["#111111", "#222222"], data_id='m"1')
    root = ET.fromstring(doc)
    assert root.get("data-src") == 'm"1'
    circles = {c.get("data-i"): c.get("fill") for c in root.iter(f"{NS}circle")}
    assert circles == {"0": "#111111", "1": "#222222", "3": svg.MISSING_COLOUR}  # the NaN point is not drawn
