"""The demo: generate the digits dataset, encode it with the bundled pretrained encoder, probe every layer."""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import yaml

from .config import ExtractConfig, load_config
from .extract import run_extract
from .probes.config import ProbeConfig
from .probes.job import run_probes
from .report import build_report
from .sources.demo import write_demo
from .stores import FeatureStore

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]


def run_demo(*, data_dir: str | Path = "data", store_root: str | Path = "stores") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir, store_root = Path(data_dir), Path(store_root)
    digits = data_dir / "digits"
    if not (digits / "manifest.csv").exists():
        write_demo("digits", digits)
    cfg = load_config(ExtractConfig, REPO / "configs" / "digits.yaml")
    cfg = replace(cfg, source=replace(cfg.source, uri=str((digits / "manifest.csv").resolve())),
                  store=replace(cfg.store, root=str(store_root.resolve())))
    summary = run_extract(cfg)
    store = FeatureStore(summary.store_uri)
    info = store.summary()
    print()
    print(summary)
    print(f"feature set {info['featureset']} (version {info['version']}), encoder {info['encoder']} "
          f"sha256 {info['weights_sha256'][:12]}, {info['rows']} rows, labels {info['labels']}")
    for layer, dim in info["layers"].items():
        print(f"  {layer:<10} dim {dim:<5} -> {store.layer(layer).shape}")
    print(f"inspect it: .venv/bin/strata inspect {summary.store_uri}")

    probe_cfg = yaml.safe_load((REPO / "configs" / "probes-digits.yaml").read_text())["probes"]
    run = run_probes(summary.store_uri, ProbeConfig.from_dict(probe_cfg))
    print()
    print("best layer and head per task (validation-selected, test reported once):")
    print(run.results.leaderboard().to_string(index=False))
    print(f"probe results: {run.out_uri}/results.parquet")

    page = build_report([summary.store_uri], REPO / "out" / "report")
    print(f"\nreport: open {page} in a browser (numbers in {page.parent / 'report.json'})")
    return 0
