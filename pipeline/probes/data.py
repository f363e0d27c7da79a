"""The input contract of the probes: a table of per-layer feature matrices plus an index of labels."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd


@runtime_checkable
class FeatureTable(Protocol):
    """What the probes read; the feature-store reader implements it.

    - `layers`: names of the stored layers.
    - `features(layer)`: (n, d) float16 or float32 array, row i belongs to `index().iloc[i]`.
    - `index()`: DataFrame with an `image_id` column, label columns, and optionally a `split`
      column ("train" / "val" / "test").
    """

    layers: list[str]

    def features(self, layer: str) -> np.ndarray: ...

    def index(self) -> pd.DataFrame: ...


class InMemoryFeatureTable:
    """A FeatureTable over arrays already in memory (tests, notebooks, small datasets)."""

    def __init__(self, features: dict[str, np.ndarray], index: pd.DataFrame) -> None:
        if "image_id" not in index.columns:
            raise ValueError(f"index needs an 'image_id' column; it has {list(index.columns)}")
        if index["image_id"].duplicated().any():
            dup = index["image_id"][index["image_id"].duplicated()].iloc[:3].tolist()
            raise ValueError(f"index has duplicate image_id values, e.g. {dup}; make ids unique")
        n = len(index)
        for layer, x in features.items():
            if x.ndim != 2 or x.shape[0] != n:
                raise ValueError(f"layer {layer!r}: features of shape {x.shape}, expected ({n}, dim) like the index")
            if x.dtype not in (np.float16, np.float32):
                raise ValueError(f"layer {layer!r}: dtype {x.dtype}; use float16 or float32")
        self._features = dict(features)
        self._index = index.reset_index(drop=True)
        self.layers = list(features)

    def features(self, layer: str) -> np.ndarray:
        if layer not in self._features:
            raise KeyError(f"layer {layer!r} not in the table; layers: {self.layers}")
        return self._features[layer]

    def index(self) -> pd.DataFrame:
        return self._index


def resolve_layers(table: FeatureTable, layers: tuple[str, ...] | None) -> list[str]:
    """The requested layers (all of the table's when None); unknown names raise ValueError."""
    if layers is None:
        return list(table.layers)
    unknown = [name for name in layers if name not in table.layers]
    if unknown:
        raise ValueError(f"layer(s) {unknown} not in the feature table; valid layers: {list(table.layers)}")
    return list(layers)
