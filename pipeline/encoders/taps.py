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
                 *, stop_after: str | None = None) -> None:
        self.model = model
        self.layers = list(layers)
        self.sink = sink
        self.stop_after = stop_after
        self._handles: list = []

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
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
        try:
            self.model(x)
        except _StopForward:
            pass


def execution_order(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Run once, recording each tapped layer's first activation in the order they fire."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, t: torch.Tensor) -> None:
        seen.setdefault(name, t.detach())

    with torch.inference_mode(), LayerTaps(model, layers, record) as taps:
        taps.run(x)
    missing = [n for n in layers if n not in seen]
    if missing:
        raise ValueError(f"layers {missing} produced no output in a forward pass; pick another layer")
    return list(seen.items())
