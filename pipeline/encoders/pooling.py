"""Pooling of one layer's activation into a fixed-size vector per image, over the axes its layout names."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLINGS = ("avg", "max", "multiscale", "cls", "prefix_mean", "token_mean", "spatial")
LAYOUTS = ("NCHW", "NHWC", "NLC", "NCL", "NC")


@dataclass(frozen=True)
class LayerKind:
    """What a layer emits: a map (channels + H, W), tokens (channels + T) or a vector, and in which layout.

    `spatial` is (H, W) for a map and (T,) for tokens, whatever the layout; `token_grid` is the (rows, cols)
    of the patch tokens after the `prefix_tokens` when they are known to be in row-major order, else None.
    `source` says where the layout was read from (see pipeline.encoders.layouts).
    """

    kind: str  # "map" | "tokens" | "vector"
    channels: int
    spatial: tuple[int, ...] = ()
    prefix_tokens: int = 0
    layout: str = ""
    token_grid: tuple[int, int] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if not self.layout:
            object.__setattr__(self, "layout", {"map": "NCHW", "tokens": "NLC", "vector": "NC"}[self.kind])
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; valid: {list(LAYOUTS)}")


def check(pooling: str, kind: LayerKind, *, layer: str, grid: tuple[int, ...], max_spatial_dim: int) -> None:
    """Refuse a pooling that cannot apply to this layer, before any image is encoded."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r} for layer {layer!r}; valid: {list(POOLINGS)}")
    if kind.kind == "vector" and pooling not in ("avg", "max", "token_mean"):
        raise ValueError(f"layer {layer!r} is already a vector ({kind.channels}); use pooling 'avg' (identity)")
    if pooling in ("cls", "prefix_mean") and (kind.kind != "tokens" or kind.prefix_tokens < 1):
        what = f"a {kind.kind}" if kind.kind != "tokens" else "tokens without a class token"
        raise ValueError(f"pooling {pooling!r} needs a transformer layer with a class token; {layer!r} is {what}")
    if pooling == "token_mean" and kind.kind == "map":
        raise ValueError(f"pooling 'token_mean' is for transformer tokens; {layer!r} is a conv map, use 'avg'")
    if pooling == "multiscale" and kind.kind == "tokens" and kind.token_grid is None:
        raise ValueError(
            f"pooling 'multiscale' needs the patch tokens of {layer!r} in a known row-major grid; this model does "
            f"not declare one for its {kind.spatial[0]} tokens (Hiera keeps mask-unit order, hierarchical models "
            "change the token count): use 'avg', 'max' or 'token_mean'")
    if pooling == "spatial":
        dim = pooled_dim(pooling, kind, grid=grid)
        if dim > max_spatial_dim:
            raise ValueError(
                f"raw spatial map of layer {layer!r} would be {dim} values per image "
                f"({dim * 2 / 1e6:.1f} MB in float16), above max_spatial_dim={max_spatial_dim}; "
                "pick a later layer, a pooling, or raise max_spatial_dim"
            )


def pooled_dim(pooling: str, kind: LayerKind, *, grid: tuple[int, ...] = (1, 2)) -> int:
    if kind.kind == "vector":
        return kind.channels
    if pooling == "multiscale":
        return kind.channels * sum(g * g for g in grid)
    if pooling == "spatial":
        if kind.kind == "map":
            return kind.channels * kind.spatial[0] * kind.spatial[1]
        return kind.channels * kind.spatial[0]
    return kind.channels


def pool(x: torch.Tensor, pooling: str, kind: LayerKind, *, grid: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Activation -> (N, D) float32, a tensor of its own. Computed in fp32 whatever the forward's dtype.

    Maps are pooled as NCHW and tokens as NLC, whatever the layer's own layout: an NHWC map's 'spatial'
    features come out in the same (C, H, W) order as a convolution's.
    """
    x = x.float()
    if kind.layout == "NC":
        return x.flatten(1).clone()
    if kind.layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    elif kind.layout == "NCL":
        x = x.transpose(1, 2)
    if kind.kind == "tokens":
        return _pool_tokens(x, pooling, kind, grid=grid)
    if pooling == "avg":
        return x.mean(dim=(2, 3))
    if pooling == "max":
        return x.amax(dim=(2, 3))
    if pooling == "multiscale":
        return _pool_map_multiscale(x, grid)
    if pooling == "spatial":
        return x.flatten(1).clone()
    raise ValueError(f"pooling {pooling!r} does not apply to a conv map; valid: avg, max, multiscale, spatial")


def _pool_tokens(x: torch.Tensor, pooling: str, kind: LayerKind, *, grid: tuple[int, ...]) -> torch.Tensor:
    prefix = kind.prefix_tokens
    patches = x[:, prefix:]
    if pooling == "cls":
        return x[:, 0].clone()
    if pooling == "prefix_mean":
        return x[:, :prefix].mean(dim=1)
    if pooling in ("avg", "token_mean"):
        return patches.mean(dim=1)
    if pooling == "max":
        return patches.amax(dim=1)
    if pooling == "spatial":
        return x.flatten(1).clone()
    if pooling == "multiscale":
        n, _, c = patches.shape
        rows, cols = kind.token_grid
        return _pool_map_multiscale(patches.transpose(1, 2).reshape(n, c, rows, cols), grid)
    raise ValueError(f"pooling {pooling!r} does not apply to tokens; valid: cls, prefix_mean, token_mean, avg, max, "
                     "multiscale, spatial")


def _pool_map_multiscale(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([F.adaptive_avg_pool2d(x, g).flatten(1) for g in grid], dim=1)
