"""One layer of a feature store as an xarray DataArray, with image ids and labels as coordinates."""
from __future__ import annotations

import numpy as np

from .. import storage


def to_xarray(store, layer: str, *, dtype=np.float32):
    """DataArray (image_id, feature) of `layer`, rows in the store's order; coordinates: image_id, row,
    split and every label column along image_id (a ClassLabel's names in its ``class_names`` attribute).
    Needs xarray (`pip install strata[xarray]`)."""
    try:
        import xarray as xr
    except ImportError:
        raise ImportError("FeatureStore.to_xarray needs xarray: pip install 'strata[xarray]'") from None
    index = store.index_table()
    features = store.layer(layer, dtype=dtype)
    coords = {"image_id": ("image_id", np.asarray(index.column("image_id").to_pylist(), dtype=object)),
              "row": ("image_id", index.column("row").to_numpy())}
    names = store.class_names
    for column in ("split", *store.label_columns):
        if column in index.column_names and column not in coords:
            attrs = {"class_names": names[column]} if column in names else {}
            coords[column] = ("image_id", index.column(column).to_numpy(zero_copy_only=False), attrs)
    attrs = {"store": storage.redact_uri(store.uri), "version": store.version, "layer": layer}
    return xr.DataArray(features, dims=("image_id", "feature"), coords=coords, name=layer, attrs=attrs)
