"""The page: tables escape every value, JSON in the page cannot end its script element, NaN never breaks JSON."""
import json
import math
import re

from pipeline.report import html


def test_table_escapes_and_spells_out_non_finite_numbers():
    out = html.table([{"label": "<script>x</script>", "v": math.nan, "w": math.inf, "u": -math.inf, "z": 0.25}])
    assert "<script>" not in out and "&lt;script&gt;x&lt;/script&gt;" in out
    cells = re.findall(r"<td>(.*?)</td>", out)
    assert cells[1:] == ["NaN", "inf", "-inf", "0.250"]


def test_json_script_round_trips_hostile_strings_and_nulls_non_finite_floats():
    data = {"labels": ["</script><script>alert(1)</script>", "$x$", "é \u2028", "a&b"], "v": [math.nan, 1.0]}
    tag = html.json_script("m", data)
    body = tag[tag.index(">") + 1:tag.rindex("</script>")]
    assert "</" not in body and "<" not in body
    back = json.loads(body)
    assert back["labels"] == data["labels"] and back["v"] == [None, 1.0]
