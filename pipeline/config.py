"""Typed job configuration, loaded from YAML (any fsspec URI) with command-line overrides, validated before any work.

Each key is declared once, with its type, default and one line of meaning (`pipeline.schema.setting`):
that declaration is the schema that refuses bad input, the `--help` listing and `strata config show`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .encoders.catalog import COMPUTE_DTYPE_NAMES, DECODES as DECODE_MODES
from .encoders.preprocess import Preprocessing
from .schema import ConfigError, build, keys, render_keys, section, setting, to_plain

__all__ = [
    "ConfigError", "EncoderSpec", "ExtractConfig", "RunSpec", "SourceSpec", "StoreSpec", "apply_overrides",
    "from_dict", "load_config", "load_data", "to_plain", "validate_extract",
]

STORE_DTYPES = ("float16", "float32")
STORE_FORMATS = ("zarr", "parquet")
# pipeline.sources.SOURCE_KINDS and pipeline.encoders.pooling.POOLINGS, without importing them (a test
# keeps these equal): loading a config must not import torch or every source's dependencies.
SOURCE_KINDS = ("folder", "manifest", "glob", "parquet", "hf", "webdataset")
POOLINGS = ("avg", "max", "multiscale", "cls", "prefix_mean", "token_mean", "spatial")


def _preprocessing(value: Any) -> Preprocessing:
    return build(Preprocessing, value, where="encoder.preprocessing")


@dataclass(frozen=True)
class EncoderSpec:
    name: str = setting("efficientnet_lite0", "registered encoder (strata encoders) or timm:<model>")
    weights: str | None = setting(None, "weights name, random:<seed> or checkpoint URI; null: the encoder's default")
    layers: tuple[str, ...] = setting((), "layers to tap (strata layers <encoder>; -1 = last); []: the defaults")
    pooling: str = setting("avg", "pooling of every tapped layer", choices=POOLINGS)
    layer_pooling: Mapping[str, str] = setting(factory=dict, help="per-layer pooling overrides, {layer: pooling}")
    multiscale_grid: tuple[int, ...] = setting((1, 2), "grid sizes averaged and concatenated by multiscale pooling")
    compute_dtype: str = setting("fp32", "forward-pass precision (autocast)", choices=tuple(COMPUTE_DTYPE_NAMES))
    device: str = setting("auto", "torch device of the driver's encoder: auto, cpu, cuda[:N]")
    batch_size: int = setting(64, "images per forward pass")
    max_spatial_dim: int = setting(65536, "spatial pooling is refused above this many values per image")
    fold_batchnorm: bool = setting(True, "fold frozen BatchNorm into the conv before it: same features, fewer passes")
    compile: bool = setting(False, "torch.compile the tapped forward: same features, faster on GPUs after a warm-up")
    preprocessing: Preprocessing | None = setting(
        None, "override of the weights' own transform {resize_size, crop_size, interpolation, mean, std}; recorded",
        parse=_preprocessing)


@dataclass(frozen=True)
class SourceSpec:
    kind: str = setting("folder", "how images are listed", choices=SOURCE_KINDS)
    uri: str = setting("", "folder, manifest file, glob pattern, Parquet or HF dataset, tar shards (any fsspec URI)")
    options: Mapping[str, Any] = setting(factory=dict, help="options of the source class (e.g. uri_column, "
                                                            "json_fields; README: Sources)")
    storage_options: Mapping[str, Any] = setting(factory=dict, help="fsspec options for the source's URIs")


@dataclass(frozen=True)
class StoreSpec:
    root: str = setting("stores", "where feature sets go (any fsspec URI)")
    featureset: str | None = setting(None, "feature set name; null: derived from dataset, encoder, layers, pooling")
    dtype: str = setting("float16", "stored feature dtype", choices=STORE_DTYPES)
    shard_rows: int = setting(1024, "rows per shard (one writer task each); a multiple of chunk_rows")
    chunk_rows: int = setting(256, "rows per Zarr chunk")
    formats: tuple[str, ...] = setting(STORE_FORMATS, "formats written", choices=STORE_FORMATS)
    storage_options: Mapping[str, Any] = setting(factory=dict, help="fsspec options for the store (S3 endpoint...)")
    allow_source_change: bool = setting(False, "update a feature set built from another source (kind or URI), "
                                               "dropping the images it does not list (the data moved); false: "
                                               "refused before any work")


@dataclass(frozen=True)
class RunSpec:
    num_encoders: int = setting(1, "encoder actors (the actor pool size)")
    gpus_per_encoder: float | None = setting(None, "GPUs per encoder actor; null: 1 when the cluster has GPUs")
    decode_concurrency: int | None = setting(None, "concurrent decode tasks; null: Ray Data decides")
    torch_threads: int | None = setting(None, "torch threads per CPU encoder actor; null: node cores / num_encoders")
    keep_freed_memory: bool = setting(True, "encoder actors keep freed activation memory (glibc malloc settings)")
    local_max_images: int = setting(64, "at most this many images: encode in the driver without Ray; 0: always Ray")
    decode_niceness: int = setting(10, "CPU encoders: decode threads run this much nicer (0-19; 0 = same priority)")
    decode: str = setting("exact", "exact: PIL decode and resize as the weights' reference transform; fast: torch "
                          "resize, large JPEGs DCT-downscaled, nvJPEG where encoders run on GPUs (cos >= 0.995 of "
                          "exact; recorded in the provenance)", choices=DECODE_MODES)
    decode_in: str = setting("tasks", "tasks: decode tasks ship each block's pixels to the encoders; encoder: the "
                                      "encoder actor reads and decodes a block batch by batch (memory per block in "
                                      "flight: one batch of pixels, whatever store.shard_rows)",
                             choices=("tasks", "encoder"))
    stall_timeout_s: float = setting(1800.0, "no block written for this long: log what is in flight, where, and stop "
                                             "(a re-run resumes); 0: never")
    progress_interval_s: float = setting(30.0, "seconds between progress lines (images done, rate, ETA)")
    max_error_fraction: float = setting(0.05, "the job stops once more than this fraction of images failed")
    max_image_pixels: int = setting(89_478_485, "larger images are refused as decompression bombs")
    ray_address: str | None = setting(None, "Ray cluster address; null: a running cluster or a local one")


@dataclass(frozen=True)
class ExtractConfig:
    source: SourceSpec = section(SourceSpec, "where the images come from")
    encoder: EncoderSpec = section(EncoderSpec, "the frozen encoder, its layers and pooling")
    store: StoreSpec = section(StoreSpec, "where and how features are stored")
    run: RunSpec = section(RunSpec, "how the job runs on Ray")

    def to_dict(self) -> dict:
        return to_plain(self)


def from_dict(cls: type, data: Mapping[str, Any] | None, *, where: str = "") -> Any:
    """Build a (nested) frozen config dataclass, refusing unknown keys and misfit values."""
    return build(cls, data, where=where)


def help_text(cls: type = ExtractConfig) -> str:
    """Every key of `cls` with its type, default and meaning, for `--help`."""
    return render_keys("config keys (YAML sections, or section.key=value on the command line):", keys(cls))


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """`encoder.layers=[blocks.2,bn2]` style overrides, values parsed as YAML."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        node = data
        parts = path.split(".")
        for k in parts[:-1]:
            if node.get(k) is not None and not isinstance(node[k], Mapping):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node[k] = dict(node.get(k) or {})
            node = node[k]
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: not a YAML value ({_first_line(e)})") from None
    return data


def load_data(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> dict:
    """The YAML mapping at `path`: a local path or any fsspec URI (s3://, memory://...)."""
    from . import storage

    uri = str(path)
    try:
        fs, fpath = storage.resolve(uri, storage_options)
        text = fs.cat_file(fpath).decode()
    except FileNotFoundError:
        raise ConfigError(f"config {storage.redact_uri(uri)} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config {storage.redact_uri(uri)} is a directory, not a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{storage.redact_uri(uri)}: not valid YAML ({_first_line(e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{storage.redact_uri(uri)}: the top level must be a mapping")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    data = load_data(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def _first_line(e: Exception) -> str:
    return " ".join(str(e).split())


def validate_extract(cfg: ExtractConfig) -> None:
    """Everything that can be checked without reading images; raises ConfigError."""
    from .encoders.catalog import resolve_entry

    try:
        resolve_entry(cfg.encoder.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from .sources import SOURCE_KINDS, source_options

    if cfg.source.kind in SOURCE_KINDS:
        unknown = sorted(set(cfg.source.options) - set(source_options(cfg.source.kind)))
        if unknown:
            raise ConfigError(f"source.options: unknown option {unknown[0]!r} for source kind {cfg.source.kind!r}; "
                              f"valid: {source_options(cfg.source.kind)}")
    bad_pooling = sorted(set(cfg.encoder.layer_pooling.values()) - set(POOLINGS))
    if bad_pooling:
        raise ConfigError(f"encoder.layer_pooling: {bad_pooling[0]!r} is not a valid choice; valid: {list(POOLINGS)}")
    name = cfg.store.featureset
    if name is not None and (not re.fullmatch(r"[A-Za-z0-9_.=-]+", name) or not name.strip(".")):
        raise ConfigError(f"store.featureset {name!r} is not a folder name: use letters, digits and . _ - = "
                          f"(no '/', not '.' or '..'); it is a folder under store.root")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", cfg.encoder.device):
        raise ConfigError(f"encoder.device {cfg.encoder.device!r} unknown; valid: auto, cpu, cuda, cuda:<index>, mps")
    if any(g < 1 for g in cfg.encoder.multiscale_grid):
        raise ConfigError(f"encoder.multiscale_grid sizes must be >= 1, got {list(cfg.encoder.multiscale_grid)}")
    for key in ("shard_rows", "chunk_rows"):
        if getattr(cfg.store, key) < 1:
            raise ConfigError(f"store.{key} must be >= 1, got {getattr(cfg.store, key)}")
    if cfg.store.shard_rows % cfg.store.chunk_rows:
        raise ConfigError(
            f"store.shard_rows ({cfg.store.shard_rows}) must be a multiple of store.chunk_rows "
            f"({cfg.store.chunk_rows}) so that each shard owns whole chunks"
        )
    if not cfg.store.formats:
        raise ConfigError(f"store.formats is empty; valid: {list(STORE_FORMATS)}")
    if not 0.0 <= cfg.run.max_error_fraction <= 1.0:
        raise ConfigError(f"run.max_error_fraction must be within [0, 1], got {cfg.run.max_error_fraction}")
    if not 0 <= cfg.run.decode_niceness <= 19:
        raise ConfigError(f"run.decode_niceness must be within [0, 19] (a nice increment), got "
                          f"{cfg.run.decode_niceness}")
    gpus = cfg.run.gpus_per_encoder
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise ConfigError(f"run.gpus_per_encoder must be 0, a fraction of one GPU (0.25: four actors share it) or a "
                          f"whole number of GPUs, got {gpus}")
    if cfg.encoder.batch_size < 1 or cfg.run.num_encoders < 1:
        raise ConfigError("encoder.batch_size and run.num_encoders must be >= 1")
