"""The FeatureTable contract and the in-memory table."""

import numpy as np
import pandas as pd
import pytest

from pipeline.probes.data import FeatureTable, InMemoryFeatureTable, resolve_layers


def _index(n=4):
    return pd.DataFrame({"image_id": [f"a{i}" for i in range(n)], "label": [0, 1] * (n // 2)})


def test_in_memory_table_satisfies_the_protocol():
    t = InMemoryFeatureTable({"x": np.zeros((4, 3), np.float16)}, _index())
    assert isinstance(t, FeatureTable) and t.layers == ["x"] and t.features("x").shape == (4, 3)
    assert resolve_layers(t, None) == ["x"]
    with pytest.raises(KeyError, match=r"layers: \['x'\]"):
        t.features("y")
    with pytest.raises(ValueError, match=r"valid layers: \['x'\]"):
        resolve_layers(t, ("y",))


@pytest.mark.parametrize("features, index, needle", [
    ({"x": np.zeros((3, 2), np.float16)}, _index(), r"expected \(4, dim\)"),
    ({"x": np.zeros((4, 2), np.float64)}, _index(), "use float16 or float32"),
    ({"x": np.zeros((4, 2), np.float32)}, _index().drop(columns="image_id"), "needs an 'image_id' column"),
    ({"x": np.zeros((4, 2), np.float32)}, _index().assign(image_id=["a", "a", "b", "c"]), "duplicate image_id"),
])
def test_in_memory_table_refuses_bad_input(features, index, needle):
    with pytest.raises(ValueError, match=needle):
        InMemoryFeatureTable(features, index)
