"""`strata` subcommands that read or maintain an existing feature set: inspect, versions, retain, neighbors,
export. Each is a thin call into pipeline.stores or pipeline.analysis."""
from __future__ import annotations

import argparse


def cmd_inspect(args: argparse.Namespace) -> int:
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
    for label, names in info["class_names"].items():
        shown = ", ".join(f"{k}={n!r}" for k, n in enumerate(names[:12]))
        print(f"{'classes of ' + label:<20} {shown}" + (f" ... ({len(names)} classes)" if len(names) > 12 else ""))
    print(f"{'preprocessing':<20} {info['preprocessing']}")
    print("layers:")
    for layer, dim in info["layers"].items():
        print(f"  {layer:<32} dim {dim:<6} pooling {info['pooling'].get(layer)}")
    if errors.num_rows:
        print(f"errors (first {min(10, errors.num_rows)} of {errors.num_rows}):")
        for row in errors.slice(0, 10).to_pylist():
            print(f"  {row['image_id']:<32} {row['stage']:<10} {row['reason']}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from .stores import FeatureStore

    latest = FeatureStore.open(args.uri)
    for v in latest.versions():
        m = FeatureStore.open(args.uri, version=v).info
        print(f"v{v:<5} {m.created_at}  {m.operation or '-':<8} parent {str(m.parent):<5} "
              f"segments {len(m.segments):<5} rows {m.n_rows:<8} deleted {sum(len(s.deleted) for s in m.segments):<6} "
              f"dataset {m.dataset_fingerprint[:12]}")
    return 0


def cmd_retain(args: argparse.Namespace) -> int:
    from .stores.retention import retain

    r = retain(args.uri, keep=args.keep, dry_run=args.dry_run, compact_first=not args.no_compact,
               min_deleted=args.min_deleted, grace=args.grace_hours * 3600)
    verb = "would remove" if args.dry_run else "removed"
    if r.compaction is not None and r.compaction.segments_rewritten:
        c = r.compaction
        print(f"{'would compact' if args.dry_run else 'compacted'} {len(c.segments_rewritten)} segment(s) "
              f"({c.rows_moved} live rows) into version {r.kept_versions[-1] if args.dry_run else c.version}")
    print(f"kept versions {r.kept_versions}; {verb} versions {r.removed_versions}, {r.files_removed} files "
          f"({r.bytes_freed / 1e6:.2f} MB freed) of {len(r.removed_shards)} blocks")
    if r.kept_recent:
        print(f"{r.kept_recent} unreferenced file(s) younger than {args.grace_hours:g} h left alone "
              f"(a job may still be writing them)")
    return 0


def cmd_neighbors(args: argparse.Namespace) -> int:
    from .analysis import nearest_neighbors
    from .stores import FeatureStore

    store = FeatureStore.open(args.store, version=args.version)
    for result in nearest_neighbors(store, args.layer, args.image_ids, k=args.k):
        print(f"{result.query_id}:")
        for image_id, score in result.neighbors:
            print(f"  {score:.4f}  {image_id}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .stores import FeatureStore
    from .stores.export import EXPORTERS

    if args.format != "faiss" and (args.metric or args.index_factory):
        raise ValueError(f"--metric and --index-factory are faiss options; --format {args.format} writes the vectors "
                         f"as they are")
    store = FeatureStore.open(args.store, version=args.version)
    options = {"metric": args.metric or "cosine", "factory": args.index_factory or "Flat"} \
        if args.format == "faiss" else {}
    out = EXPORTERS[args.format](store, args.layer, args.out, **options)
    print(f"exported layer {args.layer} of version {store.version} ({len(store)} rows) as {args.format} to {out}")
    return 0
