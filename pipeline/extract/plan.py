"""The extraction plan's inputs: the source (its work units), the target feature set and its name.

Plain Python: no Ray, no torch models.
"""
from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Mapping

from ..config import ConfigError, ExtractConfig, SourceSpec
from ..failures import not_found_as
from .. import storage
from ..sources import make_source
from ..stores import StoreTarget, featureset_name
from ..stores.layout import stable_hash

log = logging.getLogger(__name__)


def build_source(spec: SourceSpec):
    options = dict(spec.options)
    if spec.storage_options:
        options["storage_options"] = dict(spec.storage_options)
    return make_source(spec.kind, spec.uri, **options)


def dataset_fingerprint(units, contents: Mapping[str, str] | None = None) -> str:
    """What a version was computed from: every unit's fingerprint, or for a unit listed without one (an Arrow
    file, a manifest page without fingerprints) the digest of its images that its task computed (``contents``)."""
    contents = contents or {}
    return stable_hash([(u.unit_id, u.fingerprint or contents.get(u.unit_id, ""), u.meta) for u in units])


def dataset_name(spec: SourceSpec) -> str:
    path = spec.uri.rstrip("/").split("://", 1)[-1].split("?", 1)[0]
    head = re.split(r"[*\[{]", path, maxsplit=1)[0]
    if head != path and not head.endswith("/"):  # a pattern inside a name (shard-{00000..00099}.tar): its folder
        head = posixpath.dirname(head)
    head = head.rstrip("/")
    stem = posixpath.splitext(posixpath.basename(head))[0]
    if spec.kind == "manifest" or stem in ("", "images"):
        stem = posixpath.basename(posixpath.dirname(head)) or stem  # data/digits/manifest.csv -> digits
    return stem or "dataset"


def check_source(cfg: ExtractConfig, target: StoreTarget, parent) -> None:
    """Refuse to update a feature set from another source than the one it was built from.

    Names derive from the source's folder, so two manifests side by side (train.csv, test.csv) name the same
    feature set; the second job would drop every image only the first lists.
    """
    before = (parent.config or {}).get("source") if parent is not None else None
    if cfg.store.allow_source_change or not isinstance(before, dict) or not before.get("uri"):
        return
    old, new = (str(before.get("kind", "")), str(before["uri"])), (cfg.source.kind, cfg.source.uri)
    if _source_key(*old) == _source_key(*new):
        return
    raise ConfigError(
        f"feature set {target.featureset} was built from source "
        f"{old[0]}:{old[1]} (version {parent.version}, {parent.n_rows} images); this job's source is "
        f"{new[0]}:{storage.redact_uri(new[1])}, and updating from it would drop every image it does not list. "
        f"Give this source its own feature set (store.featureset=<name>), or, if the data moved, set "
        f"store.allow_source_change=true")


def _source_key(kind: str, uri: str) -> tuple[str, str]:
    return kind, storage.absolute_uri(storage.redact_uri(uri)).rstrip("/")


def list_units(spec: SourceSpec) -> list:
    """The source's work units (the driver holds units, never one record per image)."""
    if not spec.uri.strip():  # an empty folder URI would list the working directory
        raise ConfigError(f"source.uri is required: the {spec.kind} to list (any fsspec URI)")
    try:
        units = list(build_source(spec).list_units())
    except FileNotFoundError as e:
        raise not_found_as("source.uri", e, spec.uri) from e
    if not units:
        raise ValueError(f"source {spec.kind}:{storage.redact_uri(spec.uri)} listed no images")
    return units


def build_target(cfg: ExtractConfig, provenance: dict) -> StoreTarget:
    name = cfg.store.featureset or featureset_name(dataset_name(cfg.source), provenance, cfg.store.dtype)
    return StoreTarget(root=cfg.store.root, featureset=name, storage_options=dict(cfg.store.storage_options),
                       dtype=cfg.store.dtype, shard_rows=cfg.store.shard_rows, chunk_rows=cfg.store.chunk_rows,
                       formats=tuple(cfg.store.formats))
