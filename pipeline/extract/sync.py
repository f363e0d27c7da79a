"""One extraction job: list the source's units, build (or read the card of) the encoder, update the feature set.

`strata extract` and `strata refresh` are both this: an extract into an existing feature set whose listing
changed does what a refresh does (new and changed images encoded into fresh blocks, deleted ones dropped,
label edits taken as data), and never renumbers or rewrites rows a published version holds. The driver holds
units (tars, row groups, pages of a listing), never one record per image: tasks expand them.
"""
from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import storage
from ..config import ExtractConfig, validate_extract
from ..stores import FeatureStoreWriter
from ..stores.job import counts, finish_job, plan_job
from ..stores.label_types import stored_class_names
from ..stores.manifest import latest_version
from .plan import build_source, build_target, check_source, dataset_fingerprint, list_units
from .run import ExecuteResult, ExtractSummary, _ensure_ray, execute, prepare_encoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    store_uri: str
    version: int | None
    published: bool
    counts: dict  # added, changed, deleted, relabelled, unchanged images
    extract: ExtractSummary | None
    seconds: float
    renamed: tuple[str, ...] = ()  # label columns whose class names changed since the parent version


def sync_store(cfg: ExtractConfig, *, operation: str, start_ray_early: bool = False) -> SyncResult:
    """Bring the feature set of ``cfg`` in line with its source; see the module docstring."""
    t0 = time.perf_counter()
    validate_extract(cfg)
    storage.register_secrets(cfg.to_dict())
    # The driver's encoder build (mostly importing torch and timm; its cached card where the spec was built
    # before) overlaps the listing. Ray starts once the encoder is known good: a bad layer or pooling is
    # refused before any cluster starts. Ray must start on this thread: its processes die with the thread
    # that spawned them.
    with ThreadPoolExecutor(1, thread_name_prefix="strata-encoder") as pool:
        building = pool.submit(prepare_encoder, cfg)
        try:
            units = list_units(cfg.source)
        except Exception:
            building.result()  # a bad encoder config is reported before a bad source
            raise
        encoder = building.result()
    target = build_target(cfg, encoder.provenance())
    writer = FeatureStoreWriter(target)
    check_source(cfg, target, latest_version(writer.fs, writer.base))
    if start_ray_early and _images(units) > cfg.run.local_max_images:
        _ensure_ray(cfg.run.ray_address)
    labels = build_source(cfg.source).label_schema(units)
    writer.prepare(n_rows=0, layer_dims=encoder.layer_dims, provenance=encoder.provenance(), labels=labels)
    job_id = uuid.uuid4().hex
    plan = plan_job(writer, units, job_id=job_id)
    log.info("%s of %s: %d units listed, %d to work on, %d gone, %d unchanged", operation, target.featureset,
             plan.listed, len(plan.work), len(plan.removed), plan.unchanged)
    result: ExecuteResult | None = None
    if plan.work:
        result = execute(cfg, plan.work, writer, encoder, job_id=job_id, kept_rows=plan.unchanged_images)
    unit_plans = result.plans if result else []
    tally = counts(unit_plans, plan)
    version, published = plan.parent.version if plan.parent else None, False
    classes = stored_class_names(labels, writer.label_schema)
    renamed = _changed_classes(classes, plan.parent.class_names if plan.parent else {})
    if plan.empty and not renamed:
        log.info("nothing changed in %d units since version %s; no new version committed", plan.unchanged, version)
    else:
        contents = {p.unit.unit_id: p.content for p in unit_plans}
        outcome = finish_job(writer, plan, unit_plans, result.records if result else {}, operation=operation,
                             dataset_fingerprint=dataset_fingerprint(units, contents), config=_recorded_config(cfg),
                             stats=_stats(result) | {"copied": tally.get("copied", 0)}, class_names=classes)
        version, published = outcome.version, outcome.published
    summary = None
    if result is not None and result.rows:
        summary = ExtractSummary(target.uri, version, result.rows, result.encoded, result.errors,
                                 result.skipped_shards, time.perf_counter() - t0, result.bytes_written,
                                 copied=tally.get("copied", 0))
        log.info("%s", summary)
    return SyncResult(target.uri, version, published, tally, summary, time.perf_counter() - t0, renamed)


def _recorded_config(cfg: ExtractConfig) -> dict:
    """The config a version records, local paths absolute: a later job (another working directory, the
    nightly cron) compares its source with this one, and a reader sees where the data came from."""
    d = cfg.to_dict()
    d["source"]["uri"] = storage.absolute_uri(d["source"]["uri"])
    d["store"]["root"] = storage.absolute_uri(d["store"]["root"])
    return d


@dataclass(frozen=True)
class DryRun:
    """What a job would do, from listing metadata alone: nothing is encoded or written."""

    store_uri: str
    units: int
    work: int
    new: int
    removed: int
    unchanged: int
    images: int  # images in the units to work on, where their count is known
    unknown_units: int  # units to work on whose image count only their task will know (tars)
    blocks: int
    shard_rows: int
    layer_bytes: dict  # layer -> estimated bytes of its features (Zarr and Parquet) for the known images
    bytes_per_image: int  # of every layer: what each image of the units of unknown size adds
    diff: dict | None = None  # image counts, where the units to work on were cheap to list here
    renamed: tuple[str, ...] = ()  # label columns whose class names the source changed: a version of its own

    @property
    def nothing_changed(self) -> bool:
        """No unit to work on or gone and no class renamed: the job would commit no version. (Units to work on
        may still hold no change: those of unknown content are checked image by image every time.)"""
        return not (self.work or self.removed or self.renamed)

    @property
    def to_encode(self) -> int | None:
        """Images to encode, where the diff is known: new and changed ones not stored already elsewhere."""
        return None if self.diff is None else _to_encode(self.diff)

    def __str__(self) -> str:
        total = sum(self.layer_bytes.values())
        unknown = f" (+ {self.unknown_units} units of unknown size)" if self.unknown_units else ""
        lines = [f"dry run: {storage.redact_uri(self.store_uri)}",
                 f"  units      {self.units} listed: {self.work} to work on ({self.new} new), {self.removed} gone, "
                 f"{self.unchanged} unchanged",
                 f"  images     {self.images}{unknown} to list, diff and encode where new or changed" if self.diff
                 is None else f"  images     {self.diff['added']} new, {self.diff['changed']} changed, "
                 f"{self.diff['deleted']} deleted, {self.diff['relabelled']} relabelled, "
                 f"{self.diff['unchanged']} unchanged: {self.to_encode} to encode" + (
                     f", {self.diff['copied']} to copy (stored already under other rows)"
                     if self.diff.get("copied") else "") + (
                     f", {self.diff['moved']} moved to other files under their ids (to copy)"
                     if self.diff.get("moved") else ""),
                 f"  shards     {self.blocks} blocks of {self.shard_rows} rows reserved "
                 f"({self.blocks * self.shard_rows} rows)",
                 f"  bytes      {_human(total)} at most, estimated" + (
                     f" for the known images, plus {_human(self.bytes_per_image)} per image of the "
                     f"{self.unknown_units} units of unknown size:" if self.unknown_units else ":")]
        lines += [f"    {layer:<32} {_human(n)}" for layer, n in self.layer_bytes.items()]
        if self.renamed:
            lines.append(f"  classes    renamed by the source in {', '.join(self.renamed)}: a new version records "
                         f"the new names")
        if self.nothing_changed:
            lines.append("  nothing changed: no version would be committed")
        return "\n".join(lines)


def dry_run(cfg: ExtractConfig) -> DryRun:
    """The plan of ``cfg``'s job, printed instead of run: units listed and compared with the latest version."""
    validate_extract(cfg)
    storage.register_secrets(cfg.to_dict())
    encoder = prepare_encoder(cfg)
    units = list_units(cfg.source)
    target = build_target(cfg, encoder.provenance())
    writer = FeatureStoreWriter(target)
    check_source(cfg, target, latest_version(writer.fs, writer.base))
    plan = plan_job(writer, units, job_id="dry-run", dry_run=True)
    images = sum(w.unit.n_images or 0 for w in plan.work)
    diff = _image_diff(cfg, writer, plan)
    itemsize = 2 if cfg.store.dtype == "float16" else 4
    copies = len(cfg.store.formats)
    new = sum(1 for w in plan.work if not w.old)
    per_image = {layer: dim * itemsize * copies for layer, dim in encoder.layer_dims.items()}
    written = images if diff is None else _to_encode(diff) + diff.get("copied", 0) + diff.get("moved", 0)
    renamed = _renamed(cfg, units, writer, plan)
    return DryRun(target.uri, plan.listed, len(plan.work), new, len(plan.removed), plan.unchanged, images,
                  sum(1 for w in plan.work if w.unit.n_images is None), plan.reserved, target.shard_rows,
                  {layer: written * n for layer, n in per_image.items()}, sum(per_image.values()), diff,
                  renamed)


def _renamed(cfg: ExtractConfig, units, writer: FeatureStoreWriter, plan) -> tuple[str, ...]:
    """The label columns whose class names differ from the latest version's, as the job would find them."""
    if plan.parent is None:
        return ()
    return _changed_classes(stored_class_names(build_source(cfg.source).label_schema(units), writer.label_schema),
                            plan.parent.class_names)


def _changed_classes(now: dict, before: dict) -> tuple[str, ...]:
    return tuple(sorted(k for k in set(now) | set(before) if list(now.get(k) or []) != list(before.get(k) or [])))


def _to_encode(diff: dict) -> int:
    return diff["added"] + diff["changed"] - diff.get("copied", 0)


def _image_diff(cfg: ExtractConfig, writer: FeatureStoreWriter, plan) -> dict | None:
    """Image counts (added, changed, deleted, relabelled, unchanged) where listing the units to work on is as
    cheap as the real run's driver plan; None where only the units' tasks would know."""
    from ..sources.base import record_to_json
    from ..stores.copy import moved, moved_relabelled
    from ..stores.diff import diff_listing
    from ..stores.job import net_moved
    from ..stores.units import find_copies, unit_live_index
    from .run import DRIVER_PLANNED_UNITS, DRIVER_STAT_IMAGES

    work = plan.work
    if len(work) > DRIVER_PLANNED_UNITS or any(w.unit.n_images is None for w in work) or \
            sum(w.unit.n_images for w in work) > DRIVER_STAT_IMAGES:
        return None
    source = build_source(cfg.source)
    out = {"added": 0, "changed": 0, "deleted": 0, "relabelled": 0, "unchanged": plan.unchanged_images, "copied": 0}
    for p in plan.removed:
        out["deleted"] += p.counts.get("deleted", 0)
    for w in work:
        listed = [record_to_json(r) for r in source.expand(w.unit)]
        live, encode = None, listed
        if w.old:
            live = unit_live_index(writer, w.old)
            d = diff_listing(listed, live)
            for key, n in (("added", d.added), ("changed", d.changed), ("deleted", len(d.deletes)),
                           ("relabelled", len(d.relabels)), ("unchanged", d.unchanged)):
                out[key] += n
            encode = d.encode
        else:
            out["added"] += len(listed)
        found = find_copies(writer, live, encode, w.donors, unit=w.unit.unit_id)  # as the unit's task will
        out["copied"] += len(found)
        out["moved"] = out.get("moved", 0) + moved(found)
        out["moved_relabelled"] = out.get("moved_relabelled", 0) + moved_relabelled(found)
    return net_moved(out)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _images(units) -> int:
    """Images in the units where known; a unit of unknown size counts as many (it never runs in the driver)."""
    return sum(u.n_images if u.n_images is not None else 10**9 for u in units)


def _stats(result: ExecuteResult | None) -> dict:
    if result is None:
        return {"encoded": 0}
    return {"images": result.rows, "encoded": result.encoded, "errors": result.errors,
            "skipped_shards": result.skipped_shards, "seconds": round(result.seconds, 3),
            "bytes_written": result.bytes_written}


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    """Encode the source into its feature set (a new one, or the existing one brought up to date)."""
    t0 = time.perf_counter()
    outcome = sync_store(cfg, operation="extract", start_ray_early=True)
    c = outcome.counts
    if outcome.extract is not None:
        return dataclasses.replace(outcome.extract, deleted=c["deleted"], unchanged=c["unchanged"])
    # nothing to encode: the listing matched the store, or only deletions and label edits were committed
    return ExtractSummary(outcome.store_uri, outcome.version, 0, 0, 0, 0, time.perf_counter() - t0, 0,
                          c["deleted"], c["unchanged"])
