"""pipeline.schema: strict coercion, refusals that name the key and the valid choices, key listings."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.schema import ConfigError, build, coerce, keys, render_keys, section, setting, to_plain


@dataclass(frozen=True)
class Inner:
    mode: str = setting("a", "the mode", choices=("a", "b"))
    sizes: tuple[int, ...] = setting((1, 2), "sizes")


@dataclass(frozen=True)
class Outer:
    flag: bool = setting(True, "a switch")
    count: int = setting(3, "how many")
    rate: float | None = setting(None, "how fast; null: unlimited")
    name: str = setting("x", "a name")
    extra: Mapping[str, Any] = setting(factory=dict, help="free-form options")
    inner: Inner = section(Inner, "a section")


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), ("true", True), ("Off", False), ("yes", True), ("0", False),
])
def test_bool_accepts_yaml_and_command_line_words(value, expected):
    assert coerce(bool, value, where="k") is expected


@pytest.mark.parametrize("tp, value, needle", [
    (bool, "ture", "k: expected true or false, got 'ture'"),
    (bool, 1, "expected true or false"),
    (int, 3.7, "k: expected an integer, got 3.7"),
    (int, True, "expected an integer"),
    (int, "3.5", "expected an integer"),
    (float, "fast", "k: expected a number, got 'fast'"),
    (float, False, "expected a number"),
    (str, ["a"], "k: expected a string"),
    (str, None, "expected a string"),
    (tuple[int, ...], [1, "x"], "k[1]: expected an integer"),
    (tuple[float, float, float], [1, 2], "expected a list of 3 values"),
    (Mapping[str, Any], [1], "k: expected a mapping"),
])
def test_misfit_values_are_refused_with_the_key(tp, value, needle):
    with pytest.raises(ConfigError) as e:
        coerce(tp, value, where="k")
    assert needle in str(e.value)


def test_lossless_conversions_only():
    assert coerce(int, 4.0, where="k") == 4 and coerce(int, "1_024", where="k") == 1024
    assert coerce(float, "1e-3", where="k") == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert coerce(float, 2, where="k") == 2.0 and isinstance(coerce(float, 2, where="k"), float)
    assert coerce(str, -1, where="k") == "-1"  # `layers: [-1]`
    assert coerce(tuple[str, ...], "bn2", where="k") == ("bn2",)  # a scalar is a one-item list
    assert coerce(int | None, None, where="k") is None


def test_build_nested_with_choices_and_unknown_keys():
    cfg = build(Outer, {"flag": "off", "count": "7", "rate": 0.5, "inner": {"mode": "b", "sizes": [4]}})
    assert cfg == Outer(flag=False, count=7, rate=0.5, inner=Inner(mode="b", sizes=(4,)))
    with pytest.raises(ConfigError, match=r"inner.mode: 'c' is not a valid choice; valid: \['a', 'b'\]"):
        build(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['cuont'\] in Outer; valid keys: .*did you mean 'count'"):
        build(Outer, {"cuont": 1})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['size'\] in inner"):
        build(Outer, {"inner": {"size": 1}})
    with pytest.raises(ConfigError, match="inner: expected a mapping of keys, got 3"):
        build(Outer, {"inner": 3})


def test_keys_and_help_table_come_from_the_declarations():
    docs = {d.key: d for d in keys(Outer)}
    assert list(docs) == ["flag", "count", "rate", "name", "extra", "inner.mode", "inner.sizes"]
    assert (docs["rate"].type, docs["rate"].default, docs["rate"].help) == ("float | null", None,
                                                                            "how fast; null: unlimited")
    assert docs["inner.sizes"].type == "list[int]" and docs["inner.mode"].choices == ("a", "b")
    table = render_keys("keys:", list(docs.values())).splitlines()
    assert table[0] == "keys:"
    row = next(r for r in table if r.split()[0] == "inner.mode")
    assert row.split()[1:3] == ["str", "a"] and row.endswith("the mode; one of: a, b")
    assert to_plain(build(Outer, {})) == {"flag": True, "count": 3, "rate": None, "name": "x", "extra": {},
                                          "inner": {"mode": "a", "sizes": [1, 2]}}
