"""A frozen encoder: weights, preprocessing, layer taps and pooling behind one `encode` call."""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..failures import not_found_as
from . import pooling as P
from .preprocess import Preprocessing
from .registry import BuiltModel, build_model, resolve_entry
from .catalog import COMPUTE_DTYPE_NAMES, DECODES
from .fusion import fold_batchnorm
from .layouts import LayoutError, LayoutReader, read_layouts
from .taps import PooledTaps, normalize_layers, tappable_layers
from .transfer import HostToDevice

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {name: getattr(torch, attr) for name, attr in COMPUTE_DTYPE_NAMES.items()}
CUDA_SHAPE_MULTIPLE = 32  # on CUDA, batches run padded to a multiple of this (see FrozenEncoder._run_size)


@dataclass(frozen=True)
class LayerInfo:
    name: str
    shape: tuple[int, ...]  # one image's activation shape
    kind: str
    pooling: str
    dim: int
    layout: str = ""  # NCHW, NHWC, NLC, NCL, NC; "" where it cannot be read (see `note`)
    note: str = ""  # where the layout was read from, or why it cannot be


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
        compile: bool = False,
        decode: str = "exact",
    ) -> None:
        if decode not in DECODES:
            raise ValueError(f"unknown decode {decode!r}; valid: {list(DECODES)}")
        self.name = name
        self.decode = decode
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
        order = read_layouts(self.model, self.layers, torch.zeros(1, 3, crop, crop), prefix_tokens=self.prefix_tokens)
        self.layers = [name for name, _ in order]  # execution order: the last one stops the forward
        self.kinds = dict(order)
        for n in self.layers:
            P.check(self.pooling[n], self.kinds[n], layer=n, grid=self.grid, max_spatial_dim=max_spatial_dim)
        self.layer_dims = {n: P.pooled_dim(self.pooling[n], self.kinds[n], grid=self.grid) for n in self.layers}

        probe = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
        # numerically the same network, so not part of the provenance (stores stay comparable)
        self.folded_bn = fold_batchnorm(self.model, self.layers, probe) if fold_bn else 0
        if self.folded_bn:
            log.debug("%s: folded %d BatchNorm layers into their convolutions", name, self.folded_bn)

        if channels_last is None:
            channels_last = all(k.kind != "tokens" for k in self.kinds.values()) and _all_4d(self.model)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=self.memory_format)
        poolers = [functools.partial(P.pool, pooling=self.pooling[n], kind=self.kinds[n], grid=self.grid)
                   for n in self.layers]
        # like BN folding, compiling keeps the network's numbers (a parity test holds it to that): not provenance
        self.compiled = compile
        self.taps = PooledTaps(self.model, self.layers, poolers, stop_early=not compile)
        self._forward = torch.compile(self.taps, dynamic=False) if compile else self.taps
        self._compiled_batch = 0
        self.shape_multiple = CUDA_SHAPE_MULTIPLE if self.device.type == "cuda" else 1
        self._uploads = HostToDevice(self.device)

    def encode(self, pixels) -> dict[str, torch.Tensor]:
        """(N, 3, H, W) uint8 (tensor or array) -> {layer: (N, D) float32 on CPU}, all layers from one forward."""
        return next(self.encode_batches([pixels]))

    def encode_batches(self, batches: Iterable) -> Iterator[dict[str, torch.Tensor]]:
        """`encode` over a stream of batches; on CUDA the next batch is copied while the current one runs."""
        it = iter(batches)
        first = next(it, None)
        upcoming = self._uploads.upload(first) if first is not None else None
        while upcoming is not None:
            pooled = self._run(upcoming.wait())  # queued on the device; the host goes on
            following = next(it, None)
            upcoming = self._uploads.upload(following) if following is not None else None
            yield {n: t.cpu() for n, t in zip(self.layers, pooled)}

    def _run(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = pixels.shape[0]
        size = self._run_size(n)
        if size > n:  # zero images: each image's features depend on that image alone (eval mode)
            pixels = torch.cat([pixels, pixels.new_zeros((size - n, *pixels.shape[1:]))])
        x = self.preprocessing.normalize(pixels).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), self._autocast():
            return tuple(t[:n] for t in self._forward(x))

    def _run_size(self, n: int) -> int:
        """The batch size a batch of n images runs at.

        Blocks reach an encoder with sizes that vary (units' remainders). Compiled, every batch runs at the
        largest size seen: one graph, no recompilation. On CUDA, n is rounded up to a multiple of
        shape_multiple, so that a few shapes serve every block: cuDNN sets up each new input shape anew
        (suspected to be what held the H200's end-to-end rate far below the encoder's; gpu_check times both).
        """
        if self.compiled:
            self._compiled_batch = max(self._compiled_batch, n)
            return self._compiled_batch
        return -(-n // self.shape_multiple) * self.shape_multiple

    def layer_infos(self) -> list[LayerInfo]:
        return [
            LayerInfo(n, self.layer_shapes[n], self.kinds[n].kind, self.pooling[n], self.layer_dims[n],
                      self.kinds[n].layout, self.kinds[n].source)
            for n in self.layers
        ]

    @property
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """One image's activation shape per layer, in the layer's own layout."""
        return {n: _shape(k) for n, k in self.kinds.items()}

    def provenance(self) -> dict:
        """What a feature store records about the encoder that produced it."""
        preprocessing = self.preprocessing.to_dict()
        if self.decode != "exact":  # the exact default adds nothing, so existing feature set names stay
            preprocessing["decode"] = self.decode
        return {
            "encoder": self.name,
            "weights_source": self.weights.source,
            "weights_sha256": self.weights.sha256,
            "preprocessing": preprocessing,
            "layers": list(self.layers),
            "pooling": dict(self.pooling),
            "multiscale_grid": list(self.grid),
            "layer_dims": dict(self.layer_dims),
            "compute_dtype": self.compute_dtype,
        }


def _shape(kind: P.LayerKind) -> tuple[int, ...]:
    if kind.layout == "NC":
        return (kind.channels,)
    if kind.layout in ("NCHW", "NCL"):
        return (kind.channels, *kind.spatial)
    return (*kind.spatial, kind.channels)


def describe_layers(name: str, *, weights: str = "random", pooling: str = "avg",
                    multiscale_grid: Sequence[int] = (1, 2)) -> list[LayerInfo]:
    """Every tappable layer of an encoder with its layout, activation shape and pooled dimension.

    A layer whose layout cannot be read from the model is listed with the reason and no dimension.
    """
    try:
        built = build_model(resolve_entry(name), weights)
    except FileNotFoundError as e:
        raise not_found_as("weights", e, weights) from e
    crop = built.preprocessing.crop_size
    reader = LayoutReader(built.model, torch.zeros(1, 3, crop, crop), prefix_tokens=built.prefix_tokens)
    infos = []
    for layer in reader.execution_order([n for n in tappable_layers(built.model) if n in reader.trace.first]):
        shape = reader.output_shape(layer) or ()
        try:
            kind = reader.kind(layer)
        except LayoutError as e:
            infos.append(LayerInfo(layer, tuple(shape[1:]), "?", pooling, 0, "", str(e)))
            continue
        try:  # as an extract would: a pooling this layer cannot take is shown refused, with the reason
            P.check(pooling, kind, layer=layer, grid=tuple(multiscale_grid), max_spatial_dim=2**62)
        except ValueError as e:
            infos.append(LayerInfo(layer, tuple(shape[1:]), kind.kind, pooling, 0, kind.layout, f"refused: {e}"))
            continue
        infos.append(LayerInfo(layer, tuple(shape[1:]), kind.kind, pooling,
                               P.pooled_dim(pooling, kind, grid=tuple(multiscale_grid)), kind.layout, kind.source))
    return infos


def _all_4d(model: nn.Module) -> bool:
    """Whether channels-last can apply: torch refuses it for a model holding 5-D weights (LambdaNet's Conv3d)."""
    return not any(p.ndim == 5 for p in model.parameters())
