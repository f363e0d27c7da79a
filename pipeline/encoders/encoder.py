"""A frozen encoder: weights, preprocessing, layer taps and pooling behind one `encode` call."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import pooling as P
from .preprocess import Preprocessing
from .registry import BuiltModel, build_model, resolve_entry
from .catalog import COMPUTE_DTYPE_NAMES
from .fusion import fold_batchnorm
from .taps import LayerTaps, execution_order, normalize_layers, tappable_layers

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {name: getattr(torch, attr) for name, attr in COMPUTE_DTYPE_NAMES.items()}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, ...]  # one image's activation shape
    kind: str
    pooling: str
    dim: int


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; valid: 'cpu', 'auto'")
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise ValueError(f"unknown device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    return torch.device(device)


def autocast_context(device: torch.device, compute_dtype: str):
    """Autocast for bf16/fp16 where the device supports it; fp32 runs as is."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {compute_dtype!r}; valid: {list(COMPUTE_DTYPES)}")
    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"compute dtype {compute_dtype} needs autocast, which {device.type} does not support; use fp32")
    return torch.autocast(device.type, dtype=COMPUTE_DTYPES[compute_dtype])


class FrozenEncoder:
    """Encodes uint8 image batches into a dict of layer name -> (N, D) float32 pooled features."""

    def __init__(
        self,
        built: BuiltModel,
        *,
        name: str,
        layers: Sequence[str | int] = (),
        pooling: str | Mapping[str, str] = "avg",
        multiscale_grid: Sequence[int] = (1, 2),
        compute_dtype: str = "fp32",
        device: str = "cpu",
        max_spatial_dim: int = 65536,
        channels_last: bool | None = None,
        fold_bn: bool = True,
    ) -> None:
        self.name = name
        self.preprocessing: Preprocessing = built.preprocessing
        self.weights = built.weights
        self.class_names = built.class_names
        self.prefix_tokens = built.prefix_tokens
        self.device = resolve_device(device)
        self.compute_dtype = compute_dtype
        self._autocast = lambda: autocast_context(self.device, compute_dtype)
        self._autocast()  # validates the dtype before any work
        self.grid = tuple(int(g) for g in multiscale_grid)
        self.model: nn.Module = built.model
        self.layers = normalize_layers(layers or resolve_entry(name).default_layers or [-1], self.model)
        per_layer = pooling if isinstance(pooling, Mapping) else {}
        unknown = sorted(set(per_layer) - set(self.layers) - {"default"})
        if unknown:
            raise ValueError(f"pooling given for layers not requested: {unknown}; requested: {self.layers}")
        default = pooling if isinstance(pooling, str) else per_layer.get("default", "avg")
        self.pooling = {layer: per_layer.get(layer, default) for layer in self.layers}

        crop = self.preprocessing.crop_size
        order = execution_order(self.model, self.layers, torch.zeros(1, 3, crop, crop))
        self.layers = [name for name, _ in order]  # execution order: the last one stops the forward
        self.kinds = {n: P.describe(t, prefix_tokens=self.prefix_tokens) for n, t in order}
        for n in self.layers:
            P.check(self.pooling[n], self.kinds[n], layer=n, grid=self.grid, max_spatial_dim=max_spatial_dim)
        self.layer_dims = {n: P.pooled_dim(self.pooling[n], self.kinds[n], grid=self.grid) for n in self.layers}
        self.layer_shapes = {n: tuple(t.shape[1:]) for n, t in order}

        probe = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
        # numerically the same network, so not part of the provenance (stores stay comparable)
        self.folded_bn = fold_batchnorm(self.model, self.layers, probe) if fold_bn else 0
        if self.folded_bn:
            log.debug("%s: folded %d BatchNorm layers into their convolutions", name, self.folded_bn)

        if channels_last is None:
            channels_last = all(k.kind != "tokens" for k in self.kinds.values())
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)

    def encode(self, pixels) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) uint8 (tensor or array) -> {layer: (N, D) float32 on CPU}, all layers from one forward."""
        out: dict[str, torch.Tensor] = {}
        pixels = torch.as_tensor(pixels)

        def sink(name: str, act: torch.Tensor) -> None:
            pooled = P.pool(act, self.pooling[name], prefix_tokens=self.prefix_tokens, grid=self.grid)
            out[name] = pooled.clone() if pooled.data_ptr() == act.data_ptr() else pooled

        x = self.preprocessing.normalize(pixels.to(self.device, non_blocking=True))
        x = x.contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), self._autocast(), LayerTaps(self.model, self.layers, sink,
                                                                 stop_after=self.layers[-1]) as taps:
            taps.run(x)
        return {n: out[n].cpu() for n in self.layers}

    def layer_infos(self) -> list[LayerInfo]:
        return [
            LayerInfo(n, self.layer_shapes[n], self.kinds[n].kind, self.pooling[n], self.layer_dims[n])
            for n in self.layers
        ]

    def provenance(self) -> dict:
        """What a feature store records about the encoder that produced it."""
        return {
            "encoder": self.name,
            "weights_source": self.weights.source,
            "weights_sha256": self.weights.sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "layers": list(self.layers),
            "pooling": dict(self.pooling),
            "multiscale_grid": list(self.grid),
            "layer_dims": dict(self.layer_dims),
            "compute_dtype": self.compute_dtype,
        }


def describe_layers(name: str, *, weights: str = "random", pooling: str = "avg",
                    multiscale_grid: Sequence[int] = (1, 2)) -> list[LayerInfo]:
    """Every tappable layer of an encoder with its activation shape and pooled dimension."""
    built = build_model(resolve_entry(name), weights)
    layers = tappable_layers(built.model)
    crop = built.preprocessing.crop_size
    infos = []
    for layer, act in execution_order(built.model, layers, torch.zeros(1, 3, crop, crop)):
        kind = P.describe(act, prefix_tokens=built.prefix_tokens)
        pool = pooling
        if kind.kind == "vector" or (pool == "cls" and kind.kind != "tokens"):
            pool = "avg"
        infos.append(LayerInfo(layer, tuple(act.shape[1:]), kind.kind, pool,
                               P.pooled_dim(pool, kind, grid=tuple(multiscale_grid))))
    return infos
