"""`strata` subcommands that run a job or describe one: layers, encoders, extract, refresh, probe, report,
demo-data, config show. Each checks its config before any work, then makes one call into the library."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from .failures import JobFailed


def cmd_layers(args: argparse.Namespace) -> int:
    from .encoders import describe_layers

    infos = describe_layers(args.encoder, weights=args.weights, pooling=args.pooling)
    width = max(len(i.name) for i in infos)
    print(f"{'layer':<{width}}  {'kind':<7} {'layout':<6} {'output shape':<18} {'pooled dim (' + args.pooling + ')':<18} "
          "layout read from")
    for i in infos:
        dim = "refused" if not i.layout or not i.dim else str(i.dim) if i.pooling == args.pooling else \
            f"{i.dim} ({i.pooling})"
        print(f"{i.name:<{width}}  {i.kind:<7} {i.layout or '?':<6} {str(i.shape):<18} {dim:<18} {i.note}")
    return 0


def cmd_encoders(_args: argparse.Namespace) -> int:
    from .encoders import ENCODERS

    for e in ENCODERS.values():
        print(f"{e.name:<20} weights={e.default_weights:<14} layers={','.join(e.default_layers)}  {e.description}")
    print("timm:<model>         any timm model by name, weights 'pretrained' from the local cache or a checkpoint URI")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    return _run_job(args, "extract")


def _run_job(args: argparse.Namespace, operation: str) -> int:
    """extract or refresh: the config checked before Ray is imported, then the plan (--dry-run) or the job."""
    from .config import ExtractConfig, load_config, validate_extract

    cfg = load_config(ExtractConfig, args.config, args.overrides)
    validate_extract(cfg)
    args.storage_uris = [f"source {cfg.source.uri}", f"store root {cfg.store.root}"]
    if args.dry_run:
        from .extract.sync import dry_run

        print(dry_run(cfg))
        return 0
    if operation == "refresh":
        from .extract.refresh import run_refresh as run
    else:
        from .extract import run_extract as run
    print(run(cfg))
    return 0


def probe_config(path: str | None, overrides: Sequence[str]):
    from .config import apply_overrides, load_data
    from .probes.config import ProbeConfig

    data = load_data(path) if path else {}
    data = data.get("probes", data)
    if not isinstance(data, dict):
        from .config import ConfigError

        raise ConfigError(f"{path}: expected a mapping of probe settings under 'probes:'")
    # `probes.tasks=[x]` names the key as the file's `probes:` section and the error messages do
    overrides = [item.removeprefix("probes.") for item in overrides]
    return ProbeConfig.from_dict(apply_overrides(data, overrides))


def _store_labels(store_uri: str, version: int | None) -> str:
    """The valid tasks, in words, for a probe run that named none."""
    from .stores import FeatureStore

    try:
        labels = FeatureStore(store_uri, version=version).label_columns
    except Exception as exc:  # noqa: BLE001 - the hint must not hide the config error
        return f"the store's label columns could not be read ({type(exc).__name__})"
    if not labels:
        return f"{store_uri} has no label columns to probe"
    return f"{store_uri} has label columns {labels}: e.g. tasks=[{','.join(labels)}]"


def cmd_probe(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .probes.config import MissingTasks
    from .probes.job import run_probes

    overrides = list(args.overrides)
    if args.splits:  # reuse the splits of an earlier run (its splits.parquet)
        overrides += [f"split.file={args.splits}", "split.column=null"]
    try:
        config = probe_config(args.config, overrides)
    except MissingTasks as missing:
        raise ConfigError(f"{missing}; {_store_labels(args.store, args.version)}") from None
    run = run_probes(args.store, config, version=args.version, out_uri=args.out, use_ray=not args.no_ray)
    board = run.results.leaderboard()
    print(board.to_string(index=False) if len(board) else "no successful probe group")
    failed = run.results.failures
    if len(failed):
        print(f"{len(failed)} probe group(s) failed:")
        for _, row in failed.iterrows():
            print(f"  task={row['task']} layer={row['layer']}: {row['error']}")
    print(f"results: {run.out_uri}/results.parquet")
    if len(failed):
        first = failed.iloc[0]
        raise JobFailed(f"{len(failed)} probe group(s) failed, {len(board)} task result(s) kept; first: "
                        f"task={first['task']} layer={first['layer']}: {first['error']}")
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    return _run_job(args, "refresh")


def cmd_report(args: argparse.Namespace) -> int:
    from .report import build_report

    page = build_report(args.store, args.out, map_sample=args.map_sample, results=args.results)
    page = str(page)
    print(f"report: {page} (numbers: {page.rsplit('/', 1)[0]}/report.json)")
    return 0


def map_sample(text: str) -> int:
    """--map-sample: an integer >= 3 (a 2-D map needs three points), checked before any work."""
    from .report.build import MIN_MAP_SAMPLE

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {MIN_MAP_SAMPLE}, got {text!r}") from None
    if n < MIN_MAP_SAMPLE:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_MAP_SAMPLE} (images per map), got {n}")
    return n


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .sources.demo import write_demo

    out = write_demo(args.name, args.out, **({"seed": args.seed} if args.name == "shapes" else {}))
    print(f"wrote the {args.name} demo dataset to {out} (manifest: {out}/manifest.csv)")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from .config import ExtractConfig, apply_overrides, from_dict, load_data, validate_extract
    from .storage import redact

    data = load_data(args.config) if args.config else {}
    if args.probes or "probes" in data:
        plain = probe_config(args.config, args.overrides).to_dict()
    else:
        cfg = from_dict(ExtractConfig, apply_overrides(data, args.overrides))
        validate_extract(cfg)
        plain = cfg.to_dict()
    print(yaml.safe_dump(redact(plain), sort_keys=False, default_flow_style=False).rstrip())
    return 0
