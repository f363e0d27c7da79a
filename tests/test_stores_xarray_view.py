"""FeatureStore.to_xarray: the layer with image_id and label coordinates, equal to FeatureStore.layer."""
from __future__ import annotations

import numpy as np
import pytest

from toystore import write_toy_store

xr = pytest.importorskip("xarray", reason="xarray is in the xarray and test extras")


def test_to_xarray_round_trips_with_coordinates(tmp_path):
    store = write_toy_store(tmp_path, formats=("parquet",))  # no Zarr: the view goes through the reader
    da = store.to_xarray("a")
    assert isinstance(da, xr.DataArray) and da.dims == ("image_id", "feature") and da.shape == (len(store), 6)
    np.testing.assert_array_equal(da.values, store.layer("a"))
    index = store.index_table()
    ids = index.column("image_id").to_pylist()
    assert list(da.image_id.values) == ids
    np.testing.assert_array_equal(da.sel(image_id=ids[17]).values, store.layer("a")[17])
    assert list(da.coords["shape"].values) == list(store.labels("shape"))
    np.testing.assert_array_equal(da.coords["row"].values, index.column("row").to_numpy())
    means = da.groupby("count").mean()
    counts = store.labels("count")
    np.testing.assert_allclose(means.sel(count=2).values, store.layer("a")[counts == 2].mean(axis=0), rtol=1e-6)
    assert (da.attrs["layer"], da.attrs["version"], da.name) == ("a", 1, "a")
    with pytest.raises(ValueError, match="layer 'zz' not in this feature set"):
        store.to_xarray("zz")


def test_plain_xarray_opens_every_layer_of_the_zarr_group(tmp_path):
    """Downstream readers without strata: xr.open_zarr on features.zarr, layers of different widths."""
    store = write_toy_store(tmp_path)
    ds = xr.open_zarr(f"{store.uri}/features.zarr", consolidated=False)
    rows = store.index_table().column("row").to_numpy()
    for layer in ("a", "b"):
        assert ds[layer].dims == ("row", f"feature_{layer}")
        np.testing.assert_array_equal(ds[layer].values[rows], store.layer(layer))
