"""Writes a plan's blocks: decode tasks -> encoder actors -> feature store sink on Ray Data (or in the driver
for a handful of images), then checks every file of every block."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import storage
from ..config import ConfigError, ExtractConfig
from ..encoders.card import EncoderCard
from ..failures import not_found_as
from ..stores import FeatureStoreWriter, Segment
from .id_check import refuse_repeats_across_units
from .plan import build_source
from .monitor import JobMonitor, JobStalled
from .sink import ErrorBudgetExceeded, FeatureStoreDatasink, JobProgress, write_row
from .stages import EncodeShard, check_encoder_matches, encode_row
from .unit_stage import expand_unit, unit_item

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSummary:
    store_uri: str
    version: int | None
    images: int
    encoded: int
    errors: int
    skipped_shards: int
    seconds: float
    bytes_written: int
    deleted: int = 0  # images the source no longer lists, dropped from the new version
    unchanged: int = 0  # images of the version kept as they were
    copied: int = 0  # images stored already under another row (moved): vectors copied, not encoded

    def __str__(self) -> str:
        if not self.images and not self.deleted:
            return (f"store {storage.redact_uri(self.store_uri)} version {self.version}: nothing to encode, "
                    f"{self.unchanged} images unchanged ({self.seconds:.1f} s)")
        rate = self.encoded / self.seconds if self.seconds else 0.0
        gone = f", {self.deleted} images gone from the source dropped" if self.deleted else ""
        copied = f", {self.copied} moved images' vectors copied, not encoded" if self.copied else ""
        return (f"store {storage.redact_uri(self.store_uri)} version {self.version}: {self.images} images, "
                f"{self.errors} errors, {self.encoded} encoded at {rate:.1f} images/s{copied}, "
                f"{self.skipped_shards} shards already written, {self.bytes_written / 1e6:.1f} MB written{gone}")


def _ensure_ray(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True, ignore_reinit_error=True,
                 logging_level=ray_logging_level())


def ray_logging_level() -> int:
    """Ray's own log level follows the CLI's (-q: warnings only); ray.init would reset it to INFO."""
    return max(logging.INFO, logging.getLogger().getEffectiveLevel())


def prepare_encoder(cfg: ExtractConfig):
    """The driver's view of the encoder (layers, dims, preprocessing, provenance): its cached card where the
    same spec was built before from the same weights files (no torch import), else the encoder built on
    the CPU, which also validates layers and pooling, with its card cached for the next run."""
    from ..encoders.card import load_card, save_card

    options = dict(cfg.store.storage_options) or None
    card = load_card(cfg.encoder, options, decode=cfg.run.decode)
    if card is not None:
        log.info("encoder %s: layers and provenance from its cached card", card.name)
        return card
    encoder = build_driver_encoder(cfg)
    save_card(cfg.encoder, encoder, options)
    return encoder


def build_driver_encoder(cfg: ExtractConfig):
    from ..encoders import build_encoder

    try:
        return build_encoder(cfg.encoder, device="cpu", storage_options=dict(cfg.store.storage_options) or None,
                             decode=cfg.run.decode)
    except FileNotFoundError as e:
        raise not_found_as("encoder.weights", e, cfg.encoder.weights) from e
    except ValueError as e:
        raise ConfigError(str(e)) from e


@dataclass
class ExecuteResult:
    plans: list  # UnitPlan per unit that was worked on
    records: dict[int, dict]  # block -> its shard record
    rows: int
    encoded: int
    errors: int
    skipped_shards: int
    seconds: float
    bytes_written: int


def execute(cfg: ExtractConfig, work: list, writer: FeatureStoreWriter, encoder, *, job_id: str,
            kept_rows: int = 0) -> ExecuteResult:
    """Run every unit's task: expand, diff with its old blocks, encode and write its new blocks (blocks an
    earlier run wrote are skipped). Then check that every file of every block is in the store, resumed ones
    included, and run the units whose blocks lost files again.

    Counts are over the blocks this job writes. The error budget is over the dataset the job leaves: its
    rows plus the rows it keeps (``kept_rows`` of untouched units, and the unchanged and relabelled images
    of the units it worked on), so one bad image added by a nightly refresh does not fail it.
    """
    t0 = time.perf_counter()
    plans: dict[str, Any] = {}
    records: dict[int, dict] = {}
    encoded = skipped = written = 0
    todo, verified = list(work), set()
    for attempt in range(3):  # an object store that loses acknowledged writes gets two more chances
        if not todo:
            break
        known = sum(w.unit.n_images or 0 for w in todo)
        planned = _plan_in_driver(cfg, todo, writer, job_id) if _driver_may_plan(cfg, todo) else None
        if planned is not None:
            outputs = _run_local(cfg, planned, writer, encoder)
        else:
            _ensure_ray(cfg.run.ray_address)
            outputs = _run_pipeline(cfg, todo, writer.target, layers=list(encoder.layers),
                                    preprocessing=encoder.preprocessing, provenance=encoder.provenance(),
                                    job_id=job_id, total=known, dataset=known + kept_rows).outputs
        fresh = _collect(outputs, plans, records)
        encoded += sum(r["n_ok"] for r in fresh)
        if attempt == 0:  # later passes find this job's own good blocks again
            skipped += sum(1 for o in outputs if o.get("resumed") and not (o.get("record") or {}).get("copied"))
        blocks = [t.block for w in todo for t in plans[w.unit.unit_id].blocks if t.block not in verified]
        lost, nbytes = _verify(writer, blocks, records)
        verified.update(set(blocks) - lost)
        written += nbytes
        todo = [w for w in todo if {t.block for t in plans[w.unit.unit_id].blocks} & lost]
    if todo:
        raise RuntimeError(f"units {[w.unit.unit_id for w in todo][:5]} lost files after being written three "
                           f"times; check the object store behind {storage.redact_uri(writer.target.uri)}")
    refuse_repeats_across_units(list(plans.values()), writer, records)
    blocks = [t.block for p in plans.values() for t in p.blocks]
    n_rows = sum(records[b]["n_rows"] for b in blocks)
    n_errors = sum(records[b]["n_errors"] for b in blocks)
    dataset = n_rows + kept_rows + sum(p.counts.get("unchanged", 0) + p.counts.get("relabelled", 0)
                                       for p in plans.values())
    if n_rows and n_errors > cfg.run.max_error_fraction * dataset:
        of = f"{n_errors} of {n_rows} images failed" + (f" ({n_errors / dataset:.1%} of the {dataset} images "
                                                         f"the job leaves)" if dataset > n_rows else
                                                         f" ({n_errors / n_rows:.1%})")
        raise ErrorBudgetExceeded(
            f"{of}, above run.max_error_fraction={cfg.run.max_error_fraction}; see "
            f"{storage.redact_uri(writer.target.uri)}/errors/*.parquet; nothing was published")
    return ExecuteResult(list(plans.values()), records, n_rows, encoded, n_errors, skipped,
                         time.perf_counter() - t0, written)


def _collect(outputs: list[dict], plans: dict, records: dict) -> list[dict]:
    """Unit plans and block records from the writers' outputs; returns the records written now."""
    from ..stores.units import UnitPlan

    fresh = []
    for out in outputs:
        if out.get("plan"):
            plan = UnitPlan.from_json(json.loads(out["plan"]))
            plans[plan.unit.unit_id] = plan
        if out.get("record"):
            record = out["record"]
            records[int(record["shard_id"])] = record
            if not out.get("resumed"):
                fresh.append(record)
    return fresh


#: A job of at most this many units is planned in the driver first, to see whether it is small enough to encode
#: there (run.local_max_images) rather than start Ray: a nightly refresh that touched a few images, say. Only
#: units whose listing gave their size (not tars, which must be read whole).
DRIVER_PLANNED_UNITS = 16
#: Units whose listing gave no content fingerprint (a manifest without one) are diffed by asking the storage for
#: every image's metadata, concurrently: up to this many images that costs less than starting Ray, so a
#: refresh that changed nothing in a small manifest starts no cluster.
DRIVER_STAT_IMAGES = 4096


def _driver_may_plan(cfg: ExtractConfig, todo: list) -> bool:
    """Few units of known size, the images of new units alone not already over run.local_max_images (less the
    rows of their donors, which they may copy), and those of unknown content few enough to stat here:
    otherwise the tasks would expand every unit again."""
    if len(todo) > DRIVER_PLANNED_UNITS or any(w.unit.n_images is None for w in todo):
        return False
    fresh = [w for w in todo if not w.old]
    storable = sum({s.block: s.live_rows for w in fresh for s in w.donors}.values())  # rows they may copy
    if sum(w.unit.n_images for w in fresh) - storable > cfg.run.local_max_images:
        return False
    return sum(w.unit.n_images for w in todo if not w.unit.fingerprint) <= max(DRIVER_STAT_IMAGES,
                                                                                cfg.run.local_max_images)


def _plan_in_driver(cfg: ExtractConfig, work: list, writer: FeatureStoreWriter, job_id: str) -> list | None:
    """The units' plans when they encode at most run.local_max_images images in all, else None."""
    from .unit_stage import plan_item, unit_item

    source = build_source(cfg.source)
    planned = [(*plan_item(unit_item(w, job_id), source=source, target=writer.target), source) for w in work]
    n = sum(len(t.records) for plan, _, done, _ in planned for t in plan.blocks if t.block not in done)
    return planned if n <= cfg.run.local_max_images else None


def _run_local(cfg: ExtractConfig, planned: list, writer: FeatureStoreWriter, encoder) -> list[dict]:
    """The same stages in this process, with the driver's encoder: no Ray start-up for a handful of images."""
    from .unit_stage import block_rows

    n = sum(len(t.records) for plan, _, done, _ in planned for t in plan.blocks if t.block not in done)
    log.info("encoding %d images in the driver (run.local_max_images=%d)", n, cfg.run.local_max_images)
    if n and isinstance(encoder, EncoderCard):
        built = build_driver_encoder(cfg)
        check_encoder_matches(encoder.provenance(), built.provenance())
        encoder = built
    outputs = []
    for plan, by_id, done, source in planned:
        for row in block_rows(plan, by_id, done, source=source, preprocessing=encoder.preprocessing,
                              max_pixels=cfg.run.max_image_pixels, decode_kwargs={"decode": cfg.run.decode}):
            if row["shard_id"] >= 0 and not row["done"]:
                row = encode_row(encoder, row, batch_size=cfg.encoder.batch_size, store_dtype=cfg.store.dtype)
            outputs.append(write_row(writer, row, encoder.layers))
    return outputs


def _verify(writer: FeatureStoreWriter, blocks: list[int], records: dict[int, dict]) -> tuple[set[int], int]:
    """(blocks to write again, bytes of the good ones): every file of every block must be in the store, its
    record included (an object store can lose acknowledged writes)."""
    lost, nbytes = set(), 0
    for block in blocks:
        record = records.get(block)
        missing, size = writer.check_segment(Segment.from_record(record)) if record else (["record"], 0)
        if missing:
            log.warning("block %d is missing %s after it was written; writing it again", block,
                        [storage.redact_uri(m) for m in missing[:3]])
            writer.forget_block(block)
            records.pop(block, None)
            lost.add(block)
        else:
            nbytes += size
    return lost, nbytes


def _node_cpus() -> int:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return int(max((n["Resources"].get("CPU", 1) for n in nodes), default=1))


# Ray CPUs kept free of CPU encoder actors: decode tasks and write tasks take 0.5 each
TASK_CPUS = 1.0


def encoder_cpus(cluster_cpus: float, num_encoders: int) -> float:
    """Ray CPUs per CPU encoder actor: 1, or less where a whole CPU each would leave no room for the
    decode and write tasks (a pipeline whose actors hold every CPU never gets an image decoded).

    Only Ray's scheduling; the actor's torch threads are set on their own (`run.torch_threads`).
    """
    return max(0.0, min(1.0, (cluster_cpus - TASK_CPUS) / num_encoders))


def _encoder_runtime_env(cfg: ExtractConfig) -> dict:
    """Encoder actors start with glibc malloc keeping freed activations (pipeline.encoders.malloc)."""
    if not cfg.run.keep_freed_memory:
        return {}
    from ..encoders.malloc import malloc_env

    return {"runtime_env": {"env_vars": malloc_env()}}


def _run_pipeline(cfg: ExtractConfig, work: list, target, *, layers, preprocessing, provenance: dict,
                  job_id: str, total: int, dataset: int = 0) -> FeatureStoreDatasink:
    # on the driver's node: a worker node lost mid-job must not take the job's counts (and its stall clock) along
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    progress = JobProgress.options(scheduling_strategy=here).remote(cfg.run.max_error_fraction, total, dataset)
    resources = ray.cluster_resources()
    has_gpu = resources.get("GPU", 0) > 0
    gpus = cfg.run.gpus_per_encoder if cfg.run.gpus_per_encoder is not None else (1 if has_gpu else 0)
    device = "cuda" if gpus else "cpu"
    threads = cfg.run.torch_threads or (None if gpus else max(1, _node_cpus() // cfg.run.num_encoders))
    actor_cpus = encoder_cpus(resources.get("CPU", 0), cfg.run.num_encoders)
    if not gpus and actor_cpus < 1:
        log.info("%d CPU encoder actors on %g cluster CPUs: %.2f Ray CPUs each, so decode and write tasks "
                 "still get %g", cfg.run.num_encoders, resources.get("CPU", 0), actor_cpus, TASK_CPUS)
    source = build_source(cfg.source)
    ds = ray.data.from_items([unit_item(w, job_id) for w in work], override_num_blocks=len(work))
    ds = ds.flat_map(expand_unit, fn_kwargs={"source": source, "target": target, "preprocessing": preprocessing,
                                             "max_pixels": cfg.run.max_image_pixels,
                                             "niceness": 0 if gpus else cfg.run.decode_niceness,
                                             "decode_kwargs": {"decode": cfg.run.decode,
                                                               "device_decode": bool(gpus) and cfg.run.decode == "fast"},
                                             "progress": progress, "defer": cfg.run.decode_in == "encoder"},
                     num_cpus=0.5, concurrency=cfg.run.decode_concurrency)  # != encoder's: keeps decode in tasks
    ds = ds.map(EncodeShard, fn_constructor_kwargs={"encoder_spec": cfg.encoder, "device": device,
                                                    "store_dtype": cfg.store.dtype,
                                                    "storage_options": dict(cfg.store.storage_options) or None,
                                                    "torch_threads": threads, "expected_provenance": provenance,
                                                    "decode": cfg.run.decode, "source": source,
                                                    "max_pixels": cfg.run.max_image_pixels},
                compute=ray.data.ActorPoolStrategy(size=cfg.run.num_encoders), num_gpus=gpus,
                num_cpus=(1 if cfg.run.decode_in == "encoder" else 0) if gpus else actor_cpus,
                **_encoder_runtime_env(cfg))
    sink = FeatureStoreDatasink(target, layers, budget=progress)
    unknown = sum(1 for w in work if w.unit.n_images is None)
    with JobMonitor(progress, total=total, unknown_units=unknown, interval=cfg.run.progress_interval_s,
                    stall_timeout=cfg.run.stall_timeout_s) as monitor:
        try:
            ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.5})
        except KeyboardInterrupt:
            if monitor.stalled:
                raise JobStalled(monitor.stalled) from None
            raise
    return sink
