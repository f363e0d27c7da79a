"""`strata` command line: one subcommand per job, each a thin call into the library."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError

log = logging.getLogger("strata")


def _cmd_layers(args: argparse.Namespace) -> int:
    from .encoders import describe_layers

    infos = describe_layers(args.encoder, weights=args.weights, pooling=args.pooling)
    width = max(len(i.name) for i in infos)
    print(f"{'layer':<{width}}  {'kind':<7} {'output shape':<18} pooled dim ({args.pooling})")
    for i in infos:
        print(f"{i.name:<{width}}  {i.kind:<7} {str(i.shape):<18} {i.dim}")
    return 0


def _cmd_encoders(_args: argparse.Namespace) -> int:
    from .encoders import ENCODERS

    for e in ENCODERS.values():
        print(f"{e.name:<20} weights={e.default_weights:<14} layers={','.join(e.default_layers)}  {e.description}")
    print("timm:<model>         any timm model by name, weights 'pretrained' from the local cache or a checkpoint URI")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .config import ExtractConfig, load_config
    from .extract import run_extract

    cfg = load_config(ExtractConfig, args.config, args.overrides)
    summary = run_extract(cfg)
    print(summary)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from .config import apply_overrides
    from .probes.config import ProbeConfig
    from .probes.job import run_probes

    data = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    data = data.get("probes", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: expected a mapping of probe settings")
    data = apply_overrides(data, args.overrides)
    if args.splits:  # reuse the splits of an earlier run (its splits.parquet)
        data = {**data, "split": {**(data.get("split") or {}), "file": args.splits, "column": None}}
    config = ProbeConfig.from_dict(data)
    run = run_probes(args.store, config, version=args.version, out_uri=args.out, use_ray=not args.no_ray)
    board = run.results.leaderboard()
    print(board.to_string(index=False) if len(board) else "no successful probe group")
    failed = run.results.failures
    if len(failed):
        print(f"{len(failed)} probe group(s) failed:")
        for _, row in failed.iterrows():
            print(f"  task={row['task']} layer={row['layer']}: {row['error']}")
    print(f"results: {run.out_uri}/results.parquet")
    return 0


def _cmd_refresh(args: argparse.Namespace) -> int:
    from .config import ExtractConfig, load_config
    from .extract.refresh import run_refresh

    print(run_refresh(load_config(ExtractConfig, args.config, args.overrides)))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from .stores import FeatureStore

    store = FeatureStore.open(args.uri, version=args.version)
    info = store.summary()
    errors = store.errors()
    if args.json:
        print(json.dumps(info | {"error_rows": errors.to_pylist()}, indent=2, default=str))
        return 0
    for key in ("uri", "featureset", "version", "versions", "encoder", "weights", "weights_sha256", "dtype",
                "rows", "errors", "labels", "dataset_fingerprint", "created_at", "library"):
        print(f"{key:<20} {info[key]}")
    print(f"{'preprocessing':<20} {info['preprocessing']}")
    print("layers:")
    for layer, dim in info["layers"].items():
        print(f"  {layer:<32} dim {dim:<6} pooling {info['pooling'].get(layer)}")
    if errors.num_rows:
        print(f"errors (first {min(10, errors.num_rows)} of {errors.num_rows}):")
        for row in errors.slice(0, 10).to_pylist():
            print(f"  {row['image_id']:<32} {row['stage']:<10} {row['reason']}")
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    from .stores import FeatureStore

    latest = FeatureStore.open(args.uri)
    for v in latest.versions():
        m = FeatureStore.open(args.uri, version=v).manifest
        print(f"v{v:<5} {m['created_at']}  shards {len(m['shards']):<5} rows {m['n_rows']:<8} "
              f"tombstoned {len(m.get('tombstone_rows', [])):<6} dataset {m['dataset_fingerprint'][:12]}")
    return 0


def _cmd_retain(args: argparse.Namespace) -> int:
    from .stores.retention import retain

    r = retain(args.uri, keep=args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"kept versions {r.kept_versions}; {verb} versions {r.removed_versions} and shards {r.removed_shards}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    page = build_report(args.store, args.out, map_sample=args.map_sample)
    print(f"report: {page} (numbers: {page.parent / 'report.json'})")
    return 0


def _cmd_neighbors(args: argparse.Namespace) -> int:
    from .analysis import nearest_neighbors
    from .stores import FeatureStore

    store = FeatureStore.open(args.store, version=args.version)
    for result in nearest_neighbors(store, args.layer, args.image_ids, k=args.k):
        print(f"{result.query_id}:")
        for image_id, score in result.neighbors:
            print(f"  {score:.4f}  {image_id}")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from .sources.demo import write_demo

    out = write_demo(args.name, args.out, **({"seed": args.seed} if args.name == "shapes" else {}))
    print(f"wrote the {args.name} demo dataset to {out} (manifest: {out}/manifest.csv)")
    return 0


def _config_args(s: argparse.ArgumentParser) -> None:
    """The extraction config: a YAML file plus section.key=value overrides (extract and refresh share it)."""
    s.add_argument("--config", required=False, help="YAML config (see configs/)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. store.root=s3://bucket/features")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strata", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("layers", help="list every tappable layer of an encoder with shapes and pooled dims")
    s.add_argument("encoder")
    s.add_argument("--weights", default="random", help="weights to load for the trace (default: random)")
    s.add_argument("--pooling", default="avg")
    s.set_defaults(func=_cmd_layers)

    s = sub.add_parser("extract", help="encode a dataset into a feature store (Ray Data)")
    _config_args(s)
    s.set_defaults(func=_cmd_extract)

    s = sub.add_parser("probe", help="train the probe grid (heads x layers x tasks) on a feature store")
    s.add_argument("--store", required=True, help="feature set URI")
    s.add_argument("--config", help="YAML with probe settings (top level or under 'probes:')")
    s.add_argument("--version", type=int, default=None, help="pin a store version (default: latest)")
    s.add_argument("--out", default=None, help="where results go (default: <store>/probes/v<version>-<hash>)")
    s.add_argument("--no-ray", action="store_true", help="train in this process instead of Ray tasks")
    s.add_argument("--splits", default=None, help="splits.parquet of an earlier run: train and test on those splits")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tasks=[digit] few_shot=[5,null]")
    s.set_defaults(func=_cmd_probe)

    s = sub.add_parser("refresh", help="encode only new or changed images and commit a new version")
    _config_args(s)
    s.set_defaults(func=_cmd_refresh)

    s = sub.add_parser("inspect", help="print a feature set's provenance, layers, rows and errors")
    s.add_argument("uri")
    s.add_argument("--version", type=int, default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_cmd_inspect)

    s = sub.add_parser("versions", help="list a feature set's committed versions")
    s.add_argument("uri")
    s.set_defaults(func=_cmd_versions)

    s = sub.add_parser("retain", help="keep the newest N versions, delete older ones and their unused shards")
    s.add_argument("uri")
    s.add_argument("--keep", type=int, required=True)
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(func=_cmd_retain)

    s = sub.add_parser("report", help="write the transferability report (static HTML + JSON)")
    s.add_argument("--store", action="append", required=True, help="feature set URI (repeat to compare encoders)")
    s.add_argument("--out", required=True, help="output folder for index.html and report.json")
    s.add_argument("--map-sample", type=int, default=1000, help="images per map (a seeded sample; the page says how many)")
    s.set_defaults(func=_cmd_report)

    s = sub.add_parser("neighbors", help="nearest images by cosine similarity in one layer")
    s.add_argument("--store", required=True)
    s.add_argument("--layer", required=True)
    s.add_argument("image_ids", nargs="+")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--version", type=int, default=None)
    s.set_defaults(func=_cmd_neighbors)

    s = sub.add_parser("demo-data", help="generate a demo dataset locally (digits, shapes); no download")
    s.add_argument("name")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_demo_data)

    s = sub.add_parser("encoders", help="list registered encoders")
    s.set_defaults(func=_cmd_encoders)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"strata {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
