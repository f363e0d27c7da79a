"""Typed job configuration, loaded from YAML with command-line overrides, validated before any work."""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .encoders.preprocess import Preprocessing

STORE_DTYPES = ("float16", "float32")


class ConfigError(ValueError):
    """A configuration that would fail: refused before any image is read."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str = "efficientnet_lite0"
    weights: str | None = None  # None: the encoder's default weights
    layers: tuple[str, ...] = ()  # (): the encoder's default layers; "-1" style indices allowed
    pooling: str = "avg"
    layer_pooling: Mapping[str, str] = field(default_factory=dict)  # per-layer overrides
    multiscale_grid: tuple[int, ...] = (1, 2)
    compute_dtype: str = "fp32"
    device: str = "auto"
    batch_size: int = 64
    max_spatial_dim: int = 65536
    fold_batchnorm: bool = True  # fold frozen BN into the preceding conv: same features, fewer passes
    compile: bool = False  # torch.compile the tapped forward: same features, faster on GPUs after a warm-up
    # Only for checkpoints whose training preprocessing differs from the architecture's default;
    # recorded in the store, never implied.
    preprocessing: Preprocessing | None = None


@dataclass(frozen=True)
class SourceSpec:
    kind: str = "folder"  # folder | manifest | glob | parquet
    uri: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)  # passed to the source class
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoreSpec:
    root: str = "stores"
    featureset: str | None = None  # None: derived from dataset + encoder + layers + pooling
    dtype: str = "float16"
    shard_rows: int = 1024
    chunk_rows: int = 256
    formats: tuple[str, ...] = ("zarr", "parquet")
    storage_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSpec:
    num_encoders: int = 1  # actor pool size
    gpus_per_encoder: float | None = None  # None: 1 when the cluster has GPUs, else 0; 0.5: two actors per GPU
    decode_concurrency: int | None = None
    torch_threads: int | None = None  # per CPU encoder actor; None: the node's cores / num_encoders
    # encoder actors keep freed activation memory in the heap (glibc mallopt) instead of mmap/munmap per batch
    keep_freed_memory: bool = True
    # At most this many images to encode: do it in the driver with its encoder and skip Ray's start-up
    # (small refreshes, retries). 0 always uses Ray.
    local_max_images: int = 64
    # CPU encoders: decode threads run this much nicer (Linux), so they use what the encoders leave of shared
    # cores instead of slowing them; 0 = the same priority
    decode_niceness: int = 10
    # "exact": PIL decode and resize, as the weights' reference transforms; "fast": torch's resize, large JPEGs
    # DCT-downscaled, JPEGs decoded on the GPU where the encoders run there (features within cos 0.995 of exact,
    # recorded in the feature set's provenance)
    decode: str = "exact"
    max_error_fraction: float = 0.05
    max_image_pixels: int = 89_478_485
    ray_address: str | None = None


@dataclass(frozen=True)
class ExtractConfig:
    source: SourceSpec = field(default_factory=SourceSpec)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    store: StoreSpec = field(default_factory=StoreSpec)
    run: RunSpec = field(default_factory=RunSpec)

    def to_dict(self) -> dict:
        return to_plain(self)


def to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def from_dict(cls: type, data: Mapping[str, Any] | None, *, where: str = "") -> Any:
    """Build a (nested) frozen dataclass, refusing unknown keys with the valid ones listed."""
    data = dict(data or {})
    if cls is Preprocessing:
        try:
            return Preprocessing.from_dict(data)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where or 'preprocessing'}: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; valid: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, where=f"{where}{'.' if where else ''}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where=where)
    if dataclasses.is_dataclass(tp) or tp is Preprocessing:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin is tuple:
        items = [value] if isinstance(value, (str, int)) else list(value)
        return tuple(_coerce(args[0], v, where=where) for v in items)
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is str:
        return str(value)
    if tp in (int, float):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    return value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """`encoder.layers=[blocks.2,bn2]` style overrides, values parsed as YAML."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        path, raw = item.split("=", 1)
        node = data
        keys = path.split(".")
        for k in keys[:-1]:
            node[k] = dict(node.get(k) or {})
            node = node[k]
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Any:
    data: dict = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    return from_dict(cls, apply_overrides(data, overrides))


def validate_extract(cfg: ExtractConfig) -> None:
    """Everything that can be checked without reading images; raises ConfigError."""
    from .encoders.catalog import COMPUTE_DTYPE_NAMES, DECODES, resolve_entry

    try:
        resolve_entry(cfg.encoder.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.encoder.compute_dtype not in COMPUTE_DTYPE_NAMES:
        raise ConfigError(f"unknown compute_dtype {cfg.encoder.compute_dtype!r}; valid: {list(COMPUTE_DTYPE_NAMES)}")
    if cfg.store.dtype not in STORE_DTYPES:
        raise ConfigError(f"unknown store dtype {cfg.store.dtype!r}; valid: {list(STORE_DTYPES)}")
    if cfg.store.shard_rows % cfg.store.chunk_rows:
        raise ConfigError(
            f"store.shard_rows ({cfg.store.shard_rows}) must be a multiple of store.chunk_rows "
            f"({cfg.store.chunk_rows}) so that each shard owns whole chunks"
        )
    bad_formats = sorted(set(cfg.store.formats) - {"zarr", "parquet"})
    if bad_formats or not cfg.store.formats:
        raise ConfigError(f"unknown store format(s) {bad_formats}; valid: ['zarr', 'parquet']")
    if not 0.0 <= cfg.run.max_error_fraction <= 1.0:
        raise ConfigError(f"run.max_error_fraction must be within [0, 1], got {cfg.run.max_error_fraction}")
    if not 0 <= cfg.run.decode_niceness <= 19:
        raise ConfigError(f"run.decode_niceness must be within [0, 19] (a nice increment), got "
                          f"{cfg.run.decode_niceness}")
    if cfg.run.decode not in DECODES:
        raise ConfigError(f"unknown run.decode {cfg.run.decode!r}; valid: {list(DECODES)}")
    gpus = cfg.run.gpus_per_encoder
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise ConfigError(f"run.gpus_per_encoder must be 0, a fraction of one GPU (0.25: four actors share it) or a "
                          f"whole number of GPUs, got {gpus}")
    if cfg.encoder.batch_size < 1 or cfg.run.num_encoders < 1:
        raise ConfigError("encoder.batch_size and run.num_encoders must be >= 1")
