"""A probe run on a feature store: read the store's committed version, train the grid, write results next to it."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..stores import FeatureStore
from ..stores.layout import stable_hash
from .config import ProbeConfig
from .fanout import run_probe_grid
from .results import ProbeResults
from .split_table import read_splits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeRun:
    results: ProbeResults
    out_uri: str
    store_version: int


def run_probes(store_uri: str, config: ProbeConfig, *, version: int | None = None, out_uri: str | None = None,
               storage_options: Mapping[str, Any] | None = None, use_ray: bool = True) -> ProbeRun:
    """Results go to `<featureset>/probes/v<version>-<config hash>/` unless `out_uri` is given.

    The splits used are written there too (splits.parquet); config.split.file reuses such a file.
    """
    store = FeatureStore(store_uri, version=version, storage_options=storage_options)
    given = read_splits(config.split.file, storage_options) if config.split.file else None
    results = run_probe_grid(store, config, use_ray=use_ray, given_splits=given)
    out = out_uri or f"{store.uri}/probes/v{store.version}-{stable_hash(config.to_dict())[:10]}"
    results.config = {**(results.config or {}), "store": store.summary()}
    results.write(out, storage_options=storage_options)
    return ProbeRun(results, out, store.version)
