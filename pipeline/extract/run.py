"""Wires sources -> decode tasks -> encoder actors -> feature store sink on Ray Data, then commits."""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

from .. import storage
from ..config import ConfigError, ExtractConfig, validate_extract
from ..encoders.card import EncoderCard
from ..stores import FeatureStore, FeatureStoreWriter, label_schema
from ..stores.reader import list_versions
from .plan import ExtractPlan, build_plan, build_source, list_records
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
                f"{self.skipped_shards} shards already committed, {self.bytes_written / 1e6:.1f} MB written")


def _ensure_ray(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True, ignore_reinit_error=True)


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
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def run_extract(cfg: ExtractConfig) -> ExtractSummary:
    validate_extract(cfg)
    # The driver's encoder build (mostly importing torch and timm) overlaps the listing and Ray's start-up,
    # which mostly waits on new processes. Ray must start on this thread: its processes die with the
    # thread that spawned them.
    with ThreadPoolExecutor(1, thread_name_prefix="strata-encoder") as pool:
        building = pool.submit(prepare_encoder, cfg)
        try:
            records = list_records(cfg.source)
        except Exception:
            building.result()  # a bad encoder config is reported before a bad source
            raise
        failed = building.done() and building.exception() is not None
        if len(records) > cfg.run.local_max_images and not failed:
            _ensure_ray(cfg.run.ray_address)
        encoder = building.result()
    return extract_plan(cfg, encoder, build_plan(cfg, encoder.provenance(), records))


def extract_plan(cfg: ExtractConfig, encoder, plan: ExtractPlan) -> ExtractSummary:
    """A full extraction of `plan` into a fresh (or resumed) feature set."""
    writer = FeatureStoreWriter(plan.target)
    writer.prepare(n_rows=len(plan.records), layer_dims=encoder.layer_dims, provenance=encoder.provenance(),
                   labels=label_schema(plan.records))
    return execute(cfg, plan, writer, encoder)


def execute(cfg: ExtractConfig, plan: ExtractPlan, writer: FeatureStoreWriter, encoder, *,
            tombstone_rows=(), keep_shards=()) -> ExtractSummary:
    """Encode the plan's shards that are not committed yet, then commit a version of them plus `keep_shards`.

    Counts and the error budget are over the plan's shards (all of them for an extraction, the new
    ones for a refresh).
    """
    t0 = time.perf_counter()
    committed = writer.committed_shards()
    todo = [s for s in plan.shards if committed.get(s.shard_id, {}).get("plan_hash") != s.plan_hash]
    skipped = len(plan.shards) - len(todo)
    if skipped:
        log.info("resuming: %d of %d shards already committed", skipped, len(plan.shards))
    encoded = written = 0
    for _ in range(3):  # an object store that loses acknowledged writes gets two more chances
        if not todo:
            break
        if sum(len(s.records) for s in todo) <= cfg.run.local_max_images:
            fresh = _run_local(cfg, todo, writer, encoder)
        else:
            _ensure_ray(cfg.run.ray_address)
            fresh = _run_pipeline(cfg, todo, plan, layers=list(encoder.layers),
                                  preprocessing=encoder.preprocessing, provenance=encoder.provenance()).records
        encoded += sum(r["n_ok"] for r in fresh)
        todo, verified, nbytes = _verify(writer, todo, {int(r["shard_id"]): r for r in fresh})
        committed.update(verified)
        written += nbytes
    if todo:
        raise RuntimeError(f"shards {[s.shard_id for s in todo]} lost files after being written three times; "
                           f"check the object store behind {storage.redact_uri(plan.target.uri)}")
    all_shards = sorted({*keep_shards, *(s.shard_id for s in plan.shards)})
    n_rows = sum(committed[s.shard_id]["n_rows"] for s in plan.shards)
    n_errors = sum(committed[s.shard_id]["n_errors"] for s in plan.shards)
    if n_rows and n_errors > cfg.run.max_error_fraction * n_rows:
        raise ErrorBudgetExceeded(
            f"{n_errors} of {n_rows} images failed ({n_errors / n_rows:.1%}), above run.max_error_fraction="
            f"{cfg.run.max_error_fraction}; see {plan.target.uri}/errors/*.parquet; nothing was published")
    version = _commit_if_new(writer, plan, all_shards, cfg, tombstone_rows, committed)
    summary = ExtractSummary(plan.target.uri, version, n_rows, encoded, n_errors, skipped,
                             time.perf_counter() - t0, written)
    log.info("%s", summary)
    return summary


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
                           max_pixels=cfg.run.max_image_pixels, decode=cfg.run.decode)
        row = encode_row(encoder, row, batch_size=cfg.encoder.batch_size, store_dtype=cfg.store.dtype)
        records.append(writer.write_shard(row_to_shard(row, encoder.layers)))
    return records


def _verify(writer: FeatureStoreWriter, shards, records: dict[int, dict]) -> tuple[list, dict[int, dict], int]:
    """(shards to write again, records of the good ones, their bytes): every file of every shard just written
    must be in the store, its record included (an object store can lose acknowledged writes)."""
    lost, good, nbytes = [], {}, 0
    for shard in shards:
        record = records.get(shard.shard_id)
        missing, size = writer.check_shard(record) if record else (["record"], 0)
        if missing:
            log.warning("shard %d is missing %s after its commit; writing it again", shard.shard_id, missing[:3])
            writer.uncommit_shard(shard.shard_id)
            lost.append(shard)
        else:
            good[shard.shard_id], nbytes = record, nbytes + size
    return lost, good, nbytes


def _commit_if_new(writer, plan, shards, cfg, tombstone_rows, records) -> int:
    versions = list_versions(writer.fs, writer.base)
    if versions:
        latest = FeatureStore(plan.target.uri, storage_options=plan.target.storage_options).manifest
        if (latest["dataset_fingerprint"] == plan.dataset_fingerprint and latest["shards"] == shards
                and latest.get("tombstone_rows", []) == sorted(tombstone_rows)):
            log.info("nothing changed since version %d; no new version committed", latest["version"])
            return latest["version"]
    return writer.commit_version(shards, dataset_fingerprint=plan.dataset_fingerprint, config=cfg.to_dict(),
                                 tombstone_rows=tombstone_rows, records=records)


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
                                         "niceness": 0 if gpus else cfg.run.decode_niceness,
                                         "decode": cfg.run.decode,
                                         "device_decode": bool(gpus) and cfg.run.decode == "fast"},
                num_cpus=0.5, concurrency=cfg.run.decode_concurrency)  # != encoder's: keeps decode in tasks
    ds = ds.map(EncodeShard, fn_constructor_kwargs={"encoder_spec": cfg.encoder, "device": device,
                                                    "store_dtype": cfg.store.dtype,
                                                    "storage_options": dict(cfg.store.storage_options) or None,
                                                    "torch_threads": threads, "expected_provenance": provenance,
                                                    "decode": cfg.run.decode},
                compute=ray.data.ActorPoolStrategy(size=cfg.run.num_encoders), num_gpus=gpus,
                num_cpus=0 if gpus else actor_cpus, **_encoder_runtime_env(cfg))
    budget = ErrorBudget.remote(cfg.run.max_error_fraction, len(plan.records))
    sink = FeatureStoreDatasink(plan.target, layers, budget=budget)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": 0.5})
    return sink
