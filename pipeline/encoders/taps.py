"""Layer taps: many layers out of ONE forward pass, pooled as they are produced.

Forward hooks pool each tapped activation immediately (so in-place ops later in the
network cannot corrupt it, and full maps are never held), and the deepest tap stops
the forward: blocks after the last requested layer are never run.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

CONTAINER_NAMES = {"blocks", "stages", "layers", "features", "encoder", "trunk"}


class _StopForward(Exception):
    pass


def per_image(value, batch: int | None):
    """The tensor of a module's output that holds one entry per image: the output itself, or the first element
    of a tuple whose leading axis is the batch (TNT's blocks return (pixel tokens of B x 16 patches, patch
    tokens of B images)); the first tensor element when the batch is not known; None when there is none."""
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, (tuple, list)):
        return None
    tensors = [v for v in value if isinstance(v, torch.Tensor)]
    if batch is None:
        return tensors[0] if tensors and tensors[0] is value[0] else None
    return next((t for t in tensors if t.ndim >= 1 and t.shape[0] == batch), None)


def tappable_layers(model: nn.Module) -> list[str]:
    """Named stages of a model, in definition order: top-level modules, with block containers expanded."""
    names: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, (nn.Dropout, nn.Identity)):
                continue
            if name in CONTAINER_NAMES and any(True for _ in child.children()):
                walk(f"{prefix}{name}.", child)
            else:
                names.append(f"{prefix}{name}")

    walk("", model)
    return names


def normalize_layers(requested: Sequence[str | int], model: nn.Module) -> list[str]:
    """Ints index the tappable list (negatives from the end); names must be modules of the model."""
    tappable = tappable_layers(model)
    modules = dict(model.named_modules())
    out: list[str] = []
    for item in requested:
        if isinstance(item, int) or (isinstance(item, str) and item.lstrip("-").isdigit()):
            i = int(item)
            if not -len(tappable) <= i < len(tappable):
                raise ValueError(f"layer index {i} out of range for {len(tappable)} tappable layers: {tappable}")
            name = tappable[i]
        elif item in modules and item:
            name = item
        else:
            raise ValueError(f"unknown layer {item!r}; tappable layers: {tappable} (or any module name)")
        if name in out:
            raise ValueError(f"layer {name!r} requested twice")
        out.append(name)
    if not out:
        raise ValueError(f"no layers requested; tappable layers: {tappable}")
    return out


class LayerTaps:
    """Hooks on `layers` that call `sink(layer, activation)` and stop after `stop_after`."""

    def __init__(self, model: nn.Module, layers: Sequence[str], sink: Callable[[str, torch.Tensor], None],
                 *, stop_after: str | None = None, batch: int | None = None) -> None:
        self.model = model
        self.layers = list(layers)
        self.sink = sink
        self.stop_after = stop_after
        self.batch = batch
        self._handles: list = []

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            output = per_image(output, self.batch)
            if output is None:
                return
            self.sink(name, output)
            if name == self.stop_after:
                raise _StopForward

        return hook

    def __enter__(self) -> "LayerTaps":
        modules = dict(self.model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def run(self, x: torch.Tensor) -> None:
        self.batch = x.shape[0]
        try:
            self.model(x)
        except _StopForward:
            pass


class PooledTaps(nn.Module):
    """The model with its tapped layers pooled as they fire: `forward(x)` -> one (N, D) tensor per layer.

    Each layer's first call is pooled (later calls of a shared module are ignored). With `stop_early`, the
    deepest tap ends the forward by an exception, which eager mode handles for free; `torch.compile` cannot
    trace through that exception, so a compiled PooledTaps runs without it, and the compiler drops the
    blocks whose results nothing uses.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str],
                 poolers: Sequence[Callable[[torch.Tensor], torch.Tensor]], *, stop_early: bool = True) -> None:
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.stop_after = self.layers[-1] if stop_early else None
        self._poolers = dict(zip(self.layers, poolers))
        self._out: dict[str, torch.Tensor] = {}
        self._active = False  # the hooks stay on the model, but act only inside `forward`
        self._batch = 0
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.layers]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if not self._active:
                return
            if name not in self._out:
                self._out[name] = self._poolers[name](per_image(output, self._batch))
            if name == self.stop_after:
                raise _StopForward

        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._out, self._active, self._batch = {}, True, x.shape[0]
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            self._active = False
        out, self._out = self._out, {}
        return tuple(out[n] for n in self.layers)

    def remove(self) -> None:
        """Take the hooks off the model."""
        for h in self._handles:
            h.remove()
        self._handles = []
