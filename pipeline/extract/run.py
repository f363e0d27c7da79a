"""Writes a plan's blocks: decode tasks -> encoder actors -> feature store sink on Ray Data (or in the driver
for a handful of images), then checks every file of every block."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray

from .. import storage
from ..config import ConfigError, ExtractConfig
from ..encoders.card import EncoderCard
from ..stores import FeatureStoreWriter, Segment
from .plan import ExtractPlan, build_source
from .sink import ErrorBudget, ErrorBudgetExceeded, FeatureStoreDatasink
from .stages import EncodeShard, check_encoder_matches, decode_shard, encode_row, row_to_shard

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

    def __str__(self) -> str:
        rate = self.encoded / self.seconds if self.seconds else 0.0
        return (f"store {storage.redact_uri(self.store_uri)} version {self.version}: {self.images} images, "
                f"{self.errors} errors, {self.encoded} encoded at {rate:.1f} images/s, "
                f"{self.skipped_shards} shards already written, {self.bytes_written / 1e6:.1f} MB written")


def _ensure_ray(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)


def prepare_encoder(cfg: ExtractConfig):
    """The driver's view of the encoder (layers, dims, preprocessing, provenance): its cached card where the
    same spec was built before from the same weights files (no torch import), else the encoder built on
    the CPU, which also validates layers and pooling, with its card cached for the next run."""
    from ..encoders.card import load_card, save_card

    options = dict(cfg.store.storage_options) or None
    card = load_card(cfg.encoder, options)
    if card is not None:
        log.info("encoder %s: layers and provenance from its cached card", card.name)
        return card
    encoder = build_driver_encoder(cfg)
    save_card(cfg.encoder, encoder, options)
    return encoder


def build_driver_encoder(cfg: ExtractConfig):
    from ..encoders import build_encoder

    try:
        return build_encoder(cfg.encoder, device="cpu", storage_options=dict(cfg.store.storage_options) or None)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def execute(cfg: ExtractConfig, plan: ExtractPlan, writer: FeatureStoreWriter, encoder) -> ExecuteResult:
    """Write every block of the plan that is not written yet (a resumed job skips the rest), then check that
    every file of every block is in the store, resumed ones included, writing lost blocks again.

    Counts and the error budget are over the plan's rows.
    """
    t0 = time.perf_counter()
    done = writer.written_records([s.shard_id for s in plan.shards])
    todo = [s for s in plan.shards if done.get(s.shard_id, {}).get("plan_hash") != s.plan_hash]
    skipped = len(plan.shards) - len(todo)
    if skipped:
        log.info("resuming: %d of %d shards already written", skipped, len(plan.shards))
    pending = {s.shard_id for s in todo}
    records = {s.shard_id: done[s.shard_id] for s in plan.shards if s.shard_id not in pending}
    encoded = written = 0
    check = list(plan.shards)
    for _ in range(3):  # an object store that loses acknowledged writes gets two more chances
        if todo:
            if sum(len(s.records) for s in todo) <= cfg.run.local_max_images:
                fresh = _run_local(cfg, todo, writer, encoder)
            else:
                _ensure_ray(cfg.run.ray_address)
                fresh = _run_pipeline(cfg, todo, plan, layers=list(encoder.layers),
                                      preprocessing=encoder.preprocessing, provenance=encoder.provenance()).records
            encoded += sum(r["n_ok"] for r in fresh)
            records.update({int(r["shard_id"]): r for r in fresh})
        todo, nbytes = _verify(writer, check, records)
        written += nbytes
        check = todo
        if not todo:
            break
    if todo:
        raise RuntimeError(f"shards {[s.shard_id for s in todo]} lost files after being written three times; "
                           f"check the object store behind {storage.redact_uri(plan.target.uri)}")
    n_rows = sum(records[s.shard_id]["n_rows"] for s in plan.shards)
    n_errors = sum(records[s.shard_id]["n_errors"] for s in plan.shards)
    if n_rows and n_errors > cfg.run.max_error_fraction * n_rows:
        raise ErrorBudgetExceeded(
            f"{n_errors} of {n_rows} images failed ({n_errors / n_rows:.1%}), above run.max_error_fraction="
            f"{cfg.run.max_error_fraction}; see {storage.redact_uri(plan.target.uri)}/errors/*.parquet; nothing "
            f"was published")
    return ExecuteResult(records, n_rows, encoded, n_errors, skipped, time.perf_counter() - t0, written)


@dataclass(frozen=True)
class ExecuteResult:
    records: dict[int, dict]  # block -> its shard record
    rows: int
    encoded: int
    errors: int
    skipped_shards: int
    seconds: float
    bytes_written: int


def _run_local(cfg: ExtractConfig, todo, writer: FeatureStoreWriter, encoder) -> list[dict]:
    """The same stages in this process, with the driver's encoder: no Ray start-up for a handful of images."""
    log.info("encoding %d images in the driver (run.local_max_images=%d)", sum(len(s.records) for s in todo),
             cfg.run.local_max_images)
    if isinstance(encoder, EncoderCard):
        built = build_driver_encoder(cfg)
        check_encoder_matches(encoder.provenance(), built.provenance())
        encoder = built
    source = build_source(cfg.source)
    records = []
    for shard in todo:
        row = decode_shard(shard.to_item(), source=source, preprocessing=encoder.preprocessing,
                           max_pixels=cfg.run.max_image_pixels)
        row = encode_row(encoder, row, batch_size=cfg.encoder.batch_size, store_dtype=cfg.store.dtype)
        records.append(writer.write_shard(row_to_shard(row, encoder.layers)))
    return records


def _verify(writer: FeatureStoreWriter, shards, records: dict[int, dict]) -> tuple[list, int]:
    """(shards to write again, bytes of the good ones): every file of every shard must be in the store, its
    record included (an object store can lose acknowledged writes)."""
    lost, nbytes = [], 0
    for shard in shards:
        record = records.get(shard.shard_id)
        missing, size = writer.check_segment(Segment.from_record(record)) if record else (["record"], 0)
        if missing:
            log.warning("shard %d is missing %s after it was written; writing it again", shard.shard_id,
                        [storage.redact_uri(m) for m in missing[:3]])
            writer.forget_block(shard.shard_id)
            records.pop(shard.shard_id, None)
            lost.append(shard)
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


def _run_pipeline(cfg: ExtractConfig, todo, plan: ExtractPlan, *, layers, preprocessing,
                  provenance: dict) -> FeatureStoreDatasink:
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
    ds = ray.data.from_items([s.to_item() for s in todo], override_num_blocks=len(todo))
    ds = ds.map(decode_shard, fn_kwargs={"source": source, "preprocessing": preprocessing,
                                         "max_pixels": cfg.run.max_image_pixels,
                                         "niceness": 0 if gpus else cfg.run.decode_niceness},
                num_cpus=0.5, concurrency=cfg.run.decode_concurrency)  # != encoder's: keeps decode in tasks
    ds = ds.map(EncodeShard, fn_constructor_kwargs={"encoder_spec": cfg.encoder, "device": device,
                                                    "store_dtype": cfg.store.dtype,
                                                    "storage_options": dict(cfg.store.storage_options) or None,
                                                    "torch_threads": threads, "expected_provenance": provenance},
                compute=ray.data.ActorPoolStrategy(size=cfg.run.num_encoders), num_gpus=gpus,
                num_cpus=0 if gpus else actor_cpus, **_encoder_runtime_env(cfg))
    budget = ErrorBudget.remote(cfg.run.max_error_fraction, plan.n_rows)
    sink = FeatureStoreDatasink(plan.target, layers, budget=budget)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.5})
    return sink
