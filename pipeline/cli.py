"""`strata` command line: one subcommand per job, each a thin call into the library.

An expected failure (bad config, missing store, error budget, failed probe groups, unreachable storage) ends
in one line on stderr and its exit code (pipeline.failures); `-v` shows the traceback as well.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from . import cli_jobs, cli_store
from .failures import STORAGE, classify, stop_ray, tracebacks_hidden
from .storage.redaction import scrub

log = logging.getLogger("strata")
VERBOSE_FLAGS, QUIET_FLAGS = ("-v", "--verbose"), ("-q", "--quiet")


class _Parser(argparse.ArgumentParser):
    """A parser whose epilog (the config keys) is built only when its help is shown: listing probe keys
    imports the probe package, and with it torch."""

    def __init__(self, *args, keys_help: Callable[[], str] | None = None, **kwargs):
        self._keys_help = keys_help
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        if self._keys_help is not None:
            self.epilog = self._keys_help()
        return super().format_help()


def _extract_keys_help() -> str:
    from .config import help_text

    return help_text()


def _probe_keys_help() -> str:
    from .probes.config import help_text

    return help_text()


def _config_args(s: argparse.ArgumentParser) -> None:
    """The extraction config: a YAML file plus section.key=value overrides (extract and refresh share it)."""
    s.add_argument("--config", required=False, help="YAML config, a path or any fsspec URI (see configs/)")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. store.root=s3://bucket/features")
    s.add_argument("--dry-run", action="store_true",
                   help="print the plan (units, images, shards, rows, bytes per layer) and exit: nothing is encoded "
                        "or written")


def _verbosity_args(p: argparse.ArgumentParser) -> None:
    # main() takes these out of the command line wherever they are; here they are for --help
    p.add_argument(*VERBOSE_FLAGS, action="store_true", default=argparse.SUPPRESS,
                   help="debug logging, and the traceback of a failure")
    p.add_argument(*QUIET_FLAGS, action="store_true", default=argparse.SUPPRESS, help="warnings and errors only")


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print strata's version and those of torch, ray and zarr, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def version_line() -> str:
    """strata's version and its main dependencies', from package metadata (nothing is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{d} {v(d)}" for d in ("torch", "torchvision", "timm", "ray", "zarr"))
    return f"strata {v('strata')} ({deps}; python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="strata", description=__doc__, formatter_class=fmt,
                epilog="exit codes: 0 ok, 1 job failed, 2 bad command line or config, 3 not found, "
                       "4 storage unreachable, 70 internal error, 130 interrupted")
    p.add_argument("--version", action=_VersionAction)
    _verbosity_args(p)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str, func, keys_help=None) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help, formatter_class=fmt, keys_help=keys_help)
        _verbosity_args(s)
        s.set_defaults(func=func)
        return s

    s = command("layers", "list every tappable layer of an encoder with shapes and pooled dims", cli_jobs.cmd_layers)
    s.add_argument("encoder")
    s.add_argument("--weights", default="random", help="weights to load for the trace (default: random)")
    from .config import POOLINGS

    s.add_argument("--pooling", default="avg", choices=POOLINGS)

    s = command("extract", "encode a dataset into a feature store (Ray Data)", cli_jobs.cmd_extract, _extract_keys_help)
    _config_args(s)

    s = command("probe", "train the probe grid (heads x layers x tasks) on a feature store", cli_jobs.cmd_probe,
                _probe_keys_help)
    s.add_argument("--store", required=True, help="feature set URI")
    s.add_argument("--config", help="YAML with probe settings (top level or under 'probes:'); any fsspec URI")
    s.add_argument("--version", type=int, default=None, help="pin a store version (default: latest)")
    s.add_argument("--out", default=None, help="where results go (default: <store>/probes/v<version>-<hash>)")
    s.add_argument("--no-ray", action="store_true", help="train in this process instead of Ray tasks")
    s.add_argument("--splits", default=None, help="splits.parquet of an earlier run: train and test on those splits")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tasks=[digit] few_shot=[5,null] "
                   "(a probes. prefix is optional)")

    s = command("refresh", "encode only new or changed images and commit a new version", cli_jobs.cmd_refresh,
                _extract_keys_help)
    _config_args(s)

    s = command("config", "show the effective config (defaults, file, overrides) with secrets redacted",
                lambda args: args.config_parser.error("name a config command: show"))
    s.set_defaults(config_parser=s)
    config_sub = s.add_subparsers(dest="config_command", parser_class=_Parser)
    s = config_sub.add_parser("show", help="print the effective config as YAML, secrets redacted",
                              description="print the effective config as YAML, secrets redacted; extraction "
                                          "config unless the file has a probes: section or --probes is given",
                              formatter_class=fmt, keys_help=_extract_keys_help)
    _verbosity_args(s)
    _config_args(s)
    s.add_argument("--probes", action="store_true", help="a probe grid config")
    s.set_defaults(func=cli_jobs.cmd_config_show)

    s = command("inspect", "print a feature set's provenance, layers, rows and errors", cli_store.cmd_inspect)
    s.add_argument("uri")
    s.add_argument("--version", type=int, default=None)
    s.add_argument("--json", action="store_true")

    s = command("versions", "list a feature set's committed versions", cli_store.cmd_versions)
    s.add_argument("uri")

    s = command("retain", "compact, keep the newest N versions, delete what no kept version uses", cli_store.cmd_retain)
    s.add_argument("uri")
    s.add_argument("--keep", type=int, required=True)
    s.add_argument("--dry-run", action="store_true")
    s.add_argument("--no-compact", action="store_true", help="do not rewrite mostly-deleted segments first")
    s.add_argument("--min-deleted", type=float, default=0.5,
                   help="compact segments with at least this fraction of rows deleted (default 0.5)")
    s.add_argument("--grace-hours", type=float, default=24.0,
                   help="files no version references are deleted only when older than this (default 24): "
                        "a running job may still commit them")

    s = command("export", "write one layer for other tools: embedding-reader (npy + Parquet) or a FAISS index",
                cli_store.cmd_export)
    s.add_argument("--store", required=True, help="feature set URI")
    s.add_argument("--layer", required=True)
    s.add_argument("--format", required=True, choices=["embedding-reader", "faiss"])
    s.add_argument("--out", required=True, help="output folder (any fsspec URI)")
    s.add_argument("--version", type=int, default=None, help="pin a store version (default: latest)")
    s.add_argument("--metric", choices=["ip", "l2", "cosine"], default=None,
                   help="faiss: inner product, L2, or cosine (inner product of L2-normalised rows; default)")
    s.add_argument("--index-factory", default=None,
                   help="faiss: index_factory string, e.g. Flat, HNSW32, IVF256,PQ16")

    s = command("report", "write the transferability report (static HTML + JSON)", cli_jobs.cmd_report)
    s.add_argument("--store", action="append", required=True, help="feature set URI (repeat to compare encoders)")
    s.add_argument("--out", required=True,
                   help="output folder for index.html and report.json (any fsspec URI: local, s3://...)")
    s.add_argument("--map-sample", type=cli_jobs.map_sample, default=1000,
                   help="images per map, at least 3 (a seeded sample; the page says how many)")
    s.add_argument("--results", action="append", default=None, metavar="URI",
                   help="probe results folder to report (strata probe output), one per --store in the same order; "
                        "default: the store's newest results (of its latest version, else of an earlier one), "
                        "else a default probe grid run by the report")

    s = command("neighbors", "nearest images by cosine similarity in one layer", cli_store.cmd_neighbors)
    s.add_argument("--store", required=True)
    s.add_argument("--layer", required=True)
    s.add_argument("image_ids", nargs="+")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--version", type=int, default=None)

    s = command("demo-data", "generate a demo dataset locally (digits, shapes); no download", cli_jobs.cmd_demo_data)
    s.add_argument("name")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)

    command("encoders", "list registered encoders", cli_jobs.cmd_encoders)
    return p


def split_verbosity(argv: Sequence[str]) -> tuple[int, list[str]]:
    """(verbosity: -1 quiet, 0 normal, 1 verbose; the rest of the line): -v/-q count wherever they stand,
    up to a `--`."""
    level, rest = 0, []
    for i, arg in enumerate(argv):
        if arg == "--":
            rest += argv[i:]
            break
        if arg in VERBOSE_FLAGS:
            level = 1
        elif arg in QUIET_FLAGS:
            level = -1 if level < 1 else level
        else:
            rest.append(arg)
    return level, rest


def _configure_logging(level: int) -> None:
    logging.basicConfig(level=logging.WARNING if level < 0 else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import storage

    storage.install_log_redaction()
    if level > 0:
        logging.getLogger("pipeline").setLevel(logging.DEBUG)
    if level < 0:
        logging.getLogger("ray").setLevel(logging.WARNING)


def _storage_named(args: argparse.Namespace, message: str) -> str:
    """The URIs the command works on, where the storage's own words (a refused signature, a denied bucket)
    name none of them: with a source, a store and credentials for each, the user needs to know which."""
    from .storage import redact_uri

    uris = getattr(args, "storage_uris", None)
    if uris is None:
        stores = getattr(args, "store", None) or getattr(args, "uri", None)
        uris = [f"store {u}" for u in ([stores] if isinstance(stores, str) else stores or [])]
    uris = [redact_uri(u) for u in uris]
    if not uris or any(u.rsplit(" ", 1)[1] in message for u in uris):
        return ""
    return f" [{', '.join(uris)}]"


def main(argv: list[str] | None = None) -> int:
    level, argv = split_verbosity(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]  # `a=1 --config c.yaml b=2`: argparse stops at the option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(level)
    with tracebacks_hidden(level < 1):
        try:
            return int(args.func(args) or 0)
        except BrokenPipeError:  # `strata ... | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (Exception, KeyboardInterrupt) as e:
            failure = classify(e)
            if level > 0:  # scrubbed like every log line: a URL's password must not reach the terminal
                print(scrub("".join(traceback.format_exception(e))), end="", file=sys.stderr)
            stop_ray()
            hint = "" if failure.expected or level > 0 else " (-v shows the traceback)"
            if failure.code == STORAGE:
                hint += _storage_named(args, failure.message)
            print(f"strata {args.command}: error: {failure.message}{hint}", file=sys.stderr)
            return failure.code


if __name__ == "__main__":
    sys.exit(main())
