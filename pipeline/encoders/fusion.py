"""Conv-BatchNorm folding for frozen encoders.

A frozen BatchNorm is a per-channel affine map, so it can be folded into the weights and bias of the
convolution that feeds it; the network then skips one full pass over every such activation. On CPU
this is the largest single saving for BN-heavy CNNs (EfficientNet, MobileNet, ResNet): about 1.5x
for efficientnet_lite0 at batch 64. The arithmetic is torch's own (`torch.nn.utils.fusion.fuse_conv_bn_weights`,
what `torch.fx.experimental.optimization.fuse` uses); it is applied here on the eager module so that layer
names and forward hooks keep working.

A pair is folded only when the forward shows the BatchNorm consuming the convolution's output
tensor, the convolution is not itself a tapped layer, and the folded network gives the same tapped
activations on a probe input; anything else is left as it was.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .taps import LayerTaps

log = logging.getLogger(__name__)

# relative to the largest activation of a layer: folding reorders fp32 products (1e-6 to 1e-4 after
# dozens of layers), well under the float16 rounding (~5e-4) of the stored features
FOLD_TOLERANCE = 1e-3


@dataclass
class _Fold:
    conv: nn.Conv2d
    weight: torch.Tensor
    bias: torch.Tensor | None
    parent: nn.Module
    bn_name: str
    bn: nn.BatchNorm2d

    def undo(self) -> None:
        self.conv.weight = nn.Parameter(self.weight, requires_grad=False)
        self.conv.bias = None if self.bias is None else nn.Parameter(self.bias, requires_grad=False)
        setattr(self.parent, self.bn_name, self.bn)


def _after_bn(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of a BN module once its affine map lives in the conv: timm's BatchNormAct2d keeps drop + act."""
    drop, act = getattr(bn, "drop", None), getattr(bn, "act", None)
    rest = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _foldable_bn(bn: nn.Module) -> bool:
    if not isinstance(bn, nn.BatchNorm2d) or not bn.track_running_stats or bn.running_mean is None:
        return False
    if type(bn) is nn.BatchNorm2d:
        return True
    # subclasses: only the ones whose forward is known to be BN -> drop -> act (timm's BatchNormAct2d)
    return type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop")


def find_conv_bn_pairs(model: nn.Module, x: torch.Tensor) -> list[tuple[str, str]]:
    """(conv name, bn name) pairs where, in a real forward, the BN's input IS the conv's output."""
    names = {m: n for n, m in model.named_modules()}
    produced: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # holds outputs alive so that ids are not reused during the pass
    pairs: list[tuple[str, str]] = []

    def on_conv(module, _inputs, output):
        produced[id(output)] = names[module]
        keep.append(output)

    def on_bn(module, inputs, _output):
        conv = produced.get(id(inputs[0]))
        if conv is not None:
            pairs.append((conv, names[module]))

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(on_conv))
        elif _foldable_bn(module):
            handles.append(module.register_forward_hook(on_bn))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    calls: dict[str, int] = {}
    for conv, bn in pairs:
        calls[conv] = calls.get(conv, 0) + 1
        calls[bn] = calls.get(bn, 0) + 1
    return [(c, b) for c, b in dict.fromkeys(pairs) if calls[c] == 1 and calls[b] == 1]  # each used once


def _fold_pair(model: nn.Module, conv_name: str, bn_name: str) -> _Fold:
    conv: nn.Conv2d = model.get_submodule(conv_name)
    parent_name, _, leaf = bn_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    bn: nn.BatchNorm2d = getattr(parent, leaf)
    undo = _Fold(conv, conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), parent, leaf, bn)
    with torch.no_grad():
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight if bn.affine else None,
                                                      bn.bias if bn.affine else None)
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    setattr(parent, leaf, _after_bn(bn))
    return undo


def _activations(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each tapped layer's first activation, plus the model's output, from one full forward."""
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode(), LayerTaps(model, layers, lambda n, t: out.setdefault(n, t.detach().clone()),
                                           batch=x.shape[0]):
        final = model(x)
    if isinstance(final, torch.Tensor):
        out.setdefault("<output>", final)
    return out


def fold_batchnorm(model: nn.Module, layers: Sequence[str], x: torch.Tensor) -> int:
    """Fold every safe conv->BN pair of an eval-mode model in place; returns how many were folded.

    `layers` are the tapped layer names: a tapped conv keeps its own (pre-BN) output, and every tapped
    activation (plus the model output) must match the unfolded model on `x`, else nothing is folded.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs an eval-mode model: training BatchNorm uses batch statistics")
    if not any(_foldable_bn(m) for m in model.modules()):
        return 0
    tapped = set(layers)
    pairs = [(c, b) for c, b in find_conv_bn_pairs(model, x) if c not in tapped]
    if not pairs:
        return 0
    reference = _activations(model, layers, x)
    undo = [_fold_pair(model, c, b) for c, b in pairs]
    folded = _activations(model, layers, x)
    worst = 0.0
    for name, ref in reference.items():
        got = folded.get(name)
        if got is None or got.shape != ref.shape:
            worst = float("inf")
            break
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6)))
    if worst > FOLD_TOLERANCE:
        for u in reversed(undo):
            u.undo()
        log.warning("conv-BN folding changed activations (rel. error %.2g); running the model unfolded", worst)
        return 0
    return len(pairs)
