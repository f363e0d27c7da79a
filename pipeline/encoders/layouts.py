"""Which axes of a tapped activation hold channels, space and tokens, read from the model, never guessed.

A 4-D activation may be NCHW (convolutions) or NHWC (Swin, SwinV2, MambaOut stages); a 3-D one NLC tokens,
with or without class/distillation/register tokens in front, in row-major patch order or not (Hiera's are
in mask-unit order). Pooling over the wrong axes gives features of the right size and no error, so the
layout of every tapped layer is read from the model, in this order:

1. timm's feature API: a layer listed in `model.feature_info` has a known channel count, and the model's
   `output_fmt` (timm's own flag for NHWC stages) decides between layouts that both fit it;
2. the module itself, or the last module run inside it that produced a tensor of the same shape: a
   convolution, BatchNorm/GroupNorm or a `*2d` norm declares channels first; a Linear or LayerNorm/RmsNorm
   declares channels last; 2-D pooling declares NCHW;
3. a module that keeps its input's shape (an activation, dropout, identity) keeps its input's layout;
4. a block whose output no module produces but whose convolutions produce NCHW maps of its height and width
   concatenates them along channels (DenseNet's dense blocks, Inception's Mixed_*).

A layer none of these explains is refused, with the reason, rather than pooled on a guess.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .pooling import LayerKind
from .taps import per_image

CHANNELS_FIRST = {4: "NCHW", 3: "NCL"}
CHANNELS_LAST = {4: "NHWC", 3: "NLC"}
_PATCH_EMBED = re.compile(r"(.+\.)?patch_embed(\.?\d+)?")


class LayoutError(ValueError):
    """A tapped layer whose axes cannot be read from the model."""


@dataclass
class _Call:
    module: nn.Module
    start: int
    end: int = -1
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


class _Trace:
    """Every module call of one forward pass: nesting (start/end ticks), first input, first output."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[_Call] = []
        self.first: dict[str, _Call] = {}
        self.producer: dict[int, _Call] = {}  # id(tensor) -> the innermost call that returned it
        self._tick = 0
        self._open: dict[int, list[_Call]] = {}

    def run(self, x: torch.Tensor) -> None:
        self.batch = x.shape[0]
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(self._pre(name)))
            handles.append(module.register_forward_hook(self._post(name)))
        try:
            with torch.inference_mode():
                self.model(x)
        finally:
            for h in handles:
                h.remove()

    def _pre(self, name: str):
        def hook(module, args):
            self._tick += 1
            call = _Call(module, self._tick, input=per_image(args, self.batch))
            self._open.setdefault(id(module), []).append(call)
            self.first.setdefault(name, call)

        return hook

    def _post(self, name: str):
        def hook(module, _args, output):
            self._tick += 1
            call = self._open[id(module)].pop()
            call.end, call.output = self._tick, per_image(output, self.batch)
            self.calls.append(call)  # kept alive: ids of live tensors are never reused within the pass
            if call.output is not None:
                self.producer.setdefault(id(call.output), call)

        return hook

    def inner(self, call: _Call) -> list[_Call]:
        """Calls made while `call` ran (itself included), the last to finish first."""
        return [c for c in reversed(self.calls) if call.start <= c.start and c.end <= call.end]


def _channel_count(module: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1]) if "2d" not in type(module).__name__.lower() else int(shape[0])
    return None


def _own_output_fmt(module: nn.Module) -> str | None:
    """timm's PatchEmbed (and kin) say what they emit: `flatten` -> NLC tokens, else their `output_fmt`."""
    fmt = getattr(module, "output_fmt", None)
    if fmt is None or hasattr(module, "feature_info"):
        return None  # a whole model's output_fmt describes its stages, not its own output
    if getattr(module, "flatten", None) is True:
        return "NLC"
    return str(getattr(fmt, "value", fmt))


def declared_layout(module: nn.Module, shape: Sequence[int]) -> str | None:
    """The layout `module` gives its output of `shape`, if its type says so and the channel count fits."""
    ndim = len(shape)
    if ndim not in (3, 4):
        return None
    name = type(module).__name__.lower()
    fmt = _own_output_fmt(module)
    if fmt is not None:
        return fmt if fmt in (CHANNELS_FIRST[ndim], CHANNELS_LAST[ndim]) else None
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
        return "NCHW" if ndim == 4 and "2d" in name else None
    channels = _channel_count(module)
    if channels is None:
        return None
    if isinstance(module, (nn.Linear, nn.Bilinear)):
        first = False
    elif isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        first = True
    elif hasattr(module, "normalized_shape"):  # LayerNorm / RmsNorm and timm's *2d variants
        first = "2d" in name
    elif "batchnorm" in name or "groupnorm" in name:  # timm's FrozenBatchNormAct2d and kin
        first = True
    else:
        return None
    if first and shape[1] == channels:
        return CHANNELS_FIRST[ndim]
    if not first and shape[-1] == channels:
        return CHANNELS_LAST[ndim]
    return None


def _feature_info(model: nn.Module) -> dict[str, int]:
    """timm's `feature_info`: stage module name -> channels."""
    info = getattr(model, "feature_info", None)
    out = {}
    for item in info or ():
        if isinstance(item, dict) and "module" in item and "num_chs" in item:
            out[str(item["module"])] = int(item["num_chs"])
    return out


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The (rows, cols) grid of a ViT's patch tokens, in row-major order; None where not known."""
    if hasattr(model, "unroll"):  # timm Hiera: tokens are kept in mask-unit order, not row-major
        return None
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if isinstance(grid, (tuple, list)) and len(grid) == 2:
        return int(grid[0]), int(grid[1])
    image, patch = getattr(model, "image_size", None), getattr(model, "patch_size", None)  # torchvision ViT
    if isinstance(image, int) and isinstance(patch, int) and patch and hasattr(model, "class_token"):
        return image // patch, image // patch
    return None


class LayoutReader:
    """Layouts of a model's layers from one traced forward pass on a probe input."""

    def __init__(self, model: nn.Module, x: torch.Tensor, *, prefix_tokens: int = 0) -> None:
        self.model = model
        self.prefix_tokens = prefix_tokens
        self.features = _feature_info(model)
        self.output_fmt = str(getattr(model, "output_fmt", "") or "")
        self.grid = patch_grid(model)
        self.trace = _Trace(model)
        self.trace.run(x)
        self.patch_tokens = self._patch_token_counts()

    def _patch_token_counts(self) -> set[int]:
        """Token counts the patch embeddings emitted in the trace (``patch_embed``, ``patch_embed1``..4,
        ``patch_embed.0``): a token layer of exactly such a count holds patches only, no class token yet."""
        counts = set()
        for name, call in self.trace.first.items():
            out = call.output
            if _PATCH_EMBED.fullmatch(name) and out is not None and out.ndim in (3, 4):
                if out.ndim == 4:
                    counts.add(int(out.shape[2] * out.shape[3]))
                else:
                    counts.add(int(out.shape[2] if _own_output_fmt(call.module) == "NCL" else out.shape[1]))
        return counts

    def execution_order(self, layers: Sequence[str]) -> list[str]:
        """`layers` in the order their first calls finish; refuses a layer that never runs."""
        missing = [n for n in layers if n not in self.trace.first]
        if missing:
            raise LayoutError(f"layers {missing} produced no output in a forward pass; pick another layer")
        return sorted(layers, key=lambda n: self.trace.first[n].end)

    def output_shape(self, layer: str) -> tuple[int, ...] | None:
        call = self.trace.first.get(layer)
        out = call.output if call is not None else None
        return tuple(out.shape) if out is not None else None

    def kind(self, layer: str) -> LayerKind:
        """The layer's LayerKind (layout, channels, spatial size, prefix tokens), or LayoutError."""
        call = self.trace.first.get(layer)
        if call is None or call.output is None:
            raise LayoutError(f"layer {layer!r} produced no tensor in a forward pass; pick another layer")
        shape = tuple(call.output.shape)
        if len(shape) == 2:
            return LayerKind("vector", shape[1], layout="NC", source="2-D output")
        if len(shape) not in (3, 4):
            raise LayoutError(f"layer {layer!r} outputs a {len(shape)}-D tensor {shape}; strata pools 2-D vectors, "
                              "3-D tokens and 4-D maps")
        fmt, source = self._from_feature_info(layer, shape)
        if fmt is None:
            fmt, source = self._from_modules(call, shape, depth=0)
        if fmt is None:
            fmt, source = self._from_concatenation(call, shape)
        if fmt is None:
            raise LayoutError(
                f"cannot tell which axis of layer {layer!r} (output {shape}) holds its channels: no convolution, "
                f"norm or linear layer inside it produces that shape and timm's feature_info does not list it; "
                f"tap one of the model's stages{': ' + ', '.join(self.features) if self.features else ''}")
        return self._kind(fmt, shape, source)

    def _from_feature_info(self, layer: str, shape: tuple[int, ...]) -> tuple[str | None, str]:
        channels = self.features.get(layer)
        if channels is None:
            return None, ""
        fits = [fmt for fmt, axis in ((CHANNELS_FIRST[len(shape)], 1), (CHANNELS_LAST[len(shape)], -1))
                if shape[axis] == channels]
        if len(fits) == 2 and self.output_fmt in fits:
            fits = [self.output_fmt]
        if len(fits) != 1:
            return None, ""  # the modules decide; if they cannot either, the layer is refused
        return fits[0], f"timm feature_info ({channels} channels)"

    def _from_modules(self, call: _Call, shape: tuple[int, ...], *, depth: int) -> tuple[str | None, str]:
        for inner in self.trace.inner(call):
            if inner.output is not None and tuple(inner.output.shape) == shape:
                fmt = declared_layout(inner.module, shape)
                if fmt is not None:
                    return fmt, type(inner.module).__name__
        x = call.input
        source = self.trace.producer.get(id(x)) if x is not None else None
        if source is not None and tuple(x.shape) == shape and source.end < call.start and depth < 64:
            return self._from_modules(source, shape, depth=depth + 1)  # shape-keeping: the input's layout
        return None, ""

    def _from_concatenation(self, call: _Call, shape: tuple[int, ...]) -> tuple[str | None, str]:
        """A block that concatenates maps along channels (DenseNet's dense blocks, Inception's Mixed_*): no
        module produces its output, but convolutions inside it produce NCHW maps of its height and width, and
        nothing inside produces a channels-last map of the sizes an NHWC reading would give."""
        if len(shape) != 4:
            return None, ""
        first, last = [], False
        for inner in self.trace.inner(call)[1:]:
            out = inner.output
            if out is None or out.ndim != 4:
                continue
            fmt = declared_layout(inner.module, tuple(out.shape))
            if fmt == "NCHW" and tuple(out.shape[2:]) == shape[2:] and out.shape[1] <= shape[1]:
                first.append(type(inner.module).__name__)
            elif fmt == "NHWC" and tuple(out.shape[1:3]) == shape[1:3]:
                last = True
        if not first or last:
            return None, ""
        return "NCHW", f"concatenation of {first[0]} maps"

    def _kind(self, fmt: str, shape: tuple[int, ...], source: str) -> LayerKind:
        if fmt == "NCHW":
            return LayerKind("map", shape[1], (shape[2], shape[3]), layout=fmt, source=source)
        if fmt == "NHWC":
            return LayerKind("map", shape[3], (shape[1], shape[2]), layout=fmt, source=source)
        channels, tokens = (shape[2], shape[1]) if fmt == "NLC" else (shape[1], shape[2])
        prefix, grid = self.prefix_tokens, None
        if self.grid is not None:
            patches = self.grid[0] * self.grid[1]
            if tokens == patches:
                prefix, grid = 0, self.grid
            elif tokens == patches + self.prefix_tokens:
                grid = self.grid
        elif tokens in self.patch_tokens:  # XCiT's blocks run before its class token joins (cls_attn_blocks)
            prefix = 0
        prefix = prefix if tokens > prefix else 0
        return LayerKind("tokens", channels, (tokens,), prefix_tokens=prefix, layout=fmt, token_grid=grid,
                         source=source)


def read_layouts(model: nn.Module, layers: Sequence[str], x: torch.Tensor, *,
                 prefix_tokens: int = 0) -> list[tuple[str, LayerKind]]:
    """(layer, kind) in the order the layers' first calls finish; LayoutError for a layer that cannot be read."""
    reader = LayoutReader(model, x, prefix_tokens=prefix_tokens)
    return [(name, reader.kind(name)) for name in reader.execution_order(layers)]
