"""Which probe results a store's part of the report is drawn from: found under the store, given with
--results, or a default grid run by the report."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .. import storage
from ..probes.config import ProbeConfig, SplitSpec
from ..probes.split_table import check_splits
from ..stores import FeatureStore

log = logging.getLogger(__name__)

DEFAULT_FEW_SHOT = (1, 5, 10, 20, None)


@dataclass
class ProbeSource:
    """The probe results a feature set's part of the report is drawn from, and where they came from."""

    results: pd.DataFrame
    splits: pd.DataFrame | None
    config: dict
    uri: str | None             # the results folder (credentials redacted); None when the report ran them and
                                # they could not be located
    version: int | None         # the store version they were computed on (None: not recorded)
    origin: str                 # "store" (found under <store>/probes), "given" (--results) or "default" (run here)

    def describe(self, latest: int | None) -> dict[str, Any]:
        """What report.json and the page say about these results (latest: the store version reported)."""
        predates = self.version is not None and latest is not None and self.version < latest
        if self.origin == "default":
            text = f"default probes run by the report (linear, prototype and kNN heads) on store version {self.version}"
            if self.uri:
                text += f", saved to {self.uri}"
        else:
            on = f"store version {self.version}" if self.version is not None else "an unrecorded store version"
            how = "given with --results" if self.origin == "given" else "the newest under the store's probes/"
            text = f"probe results {self.uri} ({how}), computed on {on}"
            if predates:
                text += (f"; the store is now at version {latest}: these probes predate the refresh (re-run "
                         "`strata probe` to probe the current version)")
        return {"source": self.origin if self.origin != "default" else "default probes run by the report",
                "uri": self.uri, "store_version": self.version, "report_store_version": latest,
                "predates_refresh": predates, "text": text}


_VERSION_DIR = re.compile(r"^v(\d+)-")


def _folder_version(folder: str) -> int | None:
    m = _VERSION_DIR.match(folder.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def _read_results(fs, folder: str, uri: str, origin: str) -> ProbeSource:
    results = pd.read_parquet(io.BytesIO(fs.cat_file(f"{folder}/results.parquet")))
    splits = None
    if fs.exists(f"{folder}/splits.parquet"):
        splits = check_splits(pd.read_parquet(io.BytesIO(fs.cat_file(f"{folder}/splits.parquet"))))
    config = json.loads(fs.cat_file(f"{folder}/config.json")) if fs.exists(f"{folder}/config.json") else {}
    recorded = (config.get("store") or {}).get("version") if isinstance(config, dict) else None
    version = int(recorded) if isinstance(recorded, (int, np.integer)) else _folder_version(folder)
    return ProbeSource(results, splits, config, storage.redact_uri(uri), version, origin)


def find_probe_results(store: FeatureStore) -> ProbeSource | None:
    """The newest probe results of the store's version; else the newest of the latest earlier version that has
    some (a warning says they predate the refresh); None when the store has none."""
    paths = store.fs.glob(f"{store.base}/probes/v*-*/results.parquet")
    by_version: dict[int, list[str]] = {}
    for path in paths:
        v = _folder_version(path.rsplit("/", 1)[0])
        if v is not None and v <= store.version:
            by_version.setdefault(v, []).append(path)
    if not by_version:
        return None
    version = store.version if store.version in by_version else max(by_version)
    newest = max(by_version[version], key=lambda p: (storage.modified_time(store.fs.info(p)), p))
    folder = newest.rsplit("/", 1)[0]
    found = _read_results(store.fs, folder, f"{store.uri}/probes/{folder.rsplit('/', 1)[-1]}", "store")
    if version != store.version:
        log.warning("report: %s has no probe results for its latest version %d; using those of version %d (%s): "
                    "the probes predate the refresh", storage.redact_uri(store.uri), store.version, version,
                    found.uri)
    return found


def read_probe_results(uri: str, storage_options: Mapping[str, Any] | None = None) -> ProbeSource:
    """A probe results folder (`strata probe` output: results.parquet, splits.parquet, config.json) at any URI."""
    fs, folder = storage.resolve(uri, storage_options)
    folder = folder.rstrip("/")
    if not fs.exists(f"{folder}/results.parquet"):
        if fs.isfile(folder) and folder.endswith(".parquet"):
            raise ValueError(f"--results {storage.redact_uri(uri)} is a file: name the probe results folder "
                             "that holds results.parquet")
        raise FileNotFoundError(f"no probe results at {storage.redact_uri(uri)} (no results.parquet there)")
    return _read_results(fs, folder, uri.rstrip("/"), "given")


def default_probe_config(store: FeatureStore) -> ProbeConfig:
    """Linear (L-BFGS), prototype and kNN heads on every label column its split can probe (a column that
    cannot be, e.g. classes without training rows, is left out with a warning), with few-shot k for the curves."""
    from ..probes.splits import split_task

    index = store.index()
    tasks, refused = [], {}
    for c in (c for c in store.label_columns if c in index and index[c].nunique() >= 2):
        try:
            with _quiet("pipeline.probes.splits"):  # its warnings come once, from the probe run
                split_task(index, c, SplitSpec())
            tasks.append(c)
        except ValueError as e:
            refused[c] = str(e)
    for task, why in refused.items():
        log.warning("the report's default probes leave out label column %r: %s", task, why)
    if not tasks:
        raise ValueError(f"{store.uri} has no label column with two or more classes that the default probes can "
                         f"use; label columns: {store.label_columns}" + "".join(f"; {w}" for w in refused.values())
                         + " (run `strata probe` with a config of your own and pass --results)")
    return ProbeConfig.from_dict({"tasks": tasks, "heads": [{"kind": "linear"}, {"kind": "prototype"}, {"kind": "knn"}],
                                  "few_shot": list(DEFAULT_FEW_SHOT)})


@contextlib.contextmanager
def _quiet(logger: str):
    level = logging.getLogger(logger).level
    logging.getLogger(logger).setLevel(logging.ERROR)
    try:
        yield
    finally:
        logging.getLogger(logger).setLevel(level)


def check_given(found: ProbeSource, store: FeatureStore) -> None:
    """Results given with --results must be of this feature set and not of a later version than it has."""
    recorded = (found.config.get("store") or {}) if isinstance(found.config, dict) else {}
    name = recorded.get("featureset")
    if name and name != store.meta["featureset"]:
        raise ValueError(f"--results {found.uri} were computed on feature set {name!r}, not on "
                         f"{store.meta['featureset']!r} ({storage.redact_uri(store.uri)})")
    if found.version is not None and found.version > store.version:
        raise ValueError(f"--results {found.uri} were computed on version {found.version} of "
                         f"{store.meta['featureset']!r}, which has versions up to {store.version}")
    if found.version is not None and found.version < store.version:
        log.warning("report: the given results %s were computed on version %d of %s, now at version %d: the "
                    "probes predate the refresh", found.uri, found.version, storage.redact_uri(store.uri),
                    store.version)
