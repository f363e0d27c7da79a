"""Pooling of one layer's activation into a fixed-size vector per image."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

POOLINGS = ("avg", "max", "multiscale", "cls", "token_mean", "spatial")


@dataclass(frozen=True)
class LayerKind:
    """What a layer emits: a conv map (N, C, H, W), tokens (N, T, C) or a vector (N, C)."""

    kind: str  # "map" | "tokens" | "vector"
    channels: int
    spatial: tuple[int, ...] = ()
    prefix_tokens: int = 0


def describe(t: torch.Tensor, *, prefix_tokens: int = 0) -> LayerKind:
    if t.ndim == 4:
        return LayerKind("map", int(t.shape[1]), (int(t.shape[2]), int(t.shape[3])))
    if t.ndim == 3:
        return LayerKind("tokens", int(t.shape[2]), (int(t.shape[1]),), prefix_tokens)
    if t.ndim == 2:
        return LayerKind("vector", int(t.shape[1]))
    raise ValueError(f"cannot pool an activation of shape {tuple(t.shape)}")


def check(pooling: str, kind: LayerKind, *, layer: str, grid: tuple[int, ...], max_spatial_dim: int) -> None:
    """Refuse a pooling that cannot apply to this layer, before any image is encoded."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r} for layer {layer!r}; valid: {list(POOLINGS)}")
    if kind.kind == "vector" and pooling not in ("avg", "max", "token_mean"):
        raise ValueError(f"layer {layer!r} is already a vector ({kind.channels}); use pooling 'avg' (identity)")
    if pooling == "cls" and (kind.kind != "tokens" or kind.prefix_tokens < 1):
        raise ValueError(f"pooling 'cls' needs a transformer layer with a class token; {layer!r} is a {kind.kind}")
    if pooling == "token_mean" and kind.kind == "map":
        raise ValueError(f"pooling 'token_mean' is for transformer tokens; {layer!r} is a conv map, use 'avg'")
    if pooling == "multiscale" and kind.kind == "tokens" and _token_grid(kind) is None:
        raise ValueError(f"pooling 'multiscale' needs a square patch grid; {layer!r} has {kind.spatial[0]} tokens")
    if pooling == "spatial":
        dim = pooled_dim(pooling, kind, grid=grid)
        if dim > max_spatial_dim:
            raise ValueError(
                f"raw spatial map of layer {layer!r} would be {dim} values per image "
                f"({dim * 2 / 1e6:.1f} MB in float16), above max_spatial_dim={max_spatial_dim}; "
                "pick a later layer, a pooling, or raise max_spatial_dim"
            )


def _token_grid(kind: LayerKind) -> int | None:
    n = kind.spatial[0] - kind.prefix_tokens
    side = int(math.isqrt(n))
    return side if side * side == n else None


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


def pool(x: torch.Tensor, pooling: str, *, prefix_tokens: int = 0, grid: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """Activation -> (N, D) float32. Computed in fp32 whatever the forward's dtype."""
    x = x.float()
    if x.ndim == 2 or pooling == "spatial":
        return x.flatten(1)
    if x.ndim == 3:
        return _pool_tokens(x, pooling, prefix_tokens=prefix_tokens, grid=grid)
    if pooling == "avg":
        return x.mean(dim=(2, 3))
    if pooling == "max":
        return x.amax(dim=(2, 3))
    if pooling == "multiscale":
        return _pool_map_multiscale(x, grid)
    raise ValueError(f"pooling {pooling!r} does not apply to a conv map; valid: avg, max, multiscale, spatial")


def _pool_tokens(x: torch.Tensor, pooling: str, *, prefix_tokens: int, grid: tuple[int, ...]) -> torch.Tensor:
    patches = x[:, prefix_tokens:]
    if pooling == "cls":
        return x[:, 0]
    if pooling in ("avg", "token_mean"):
        return patches.mean(dim=1)
    if pooling == "max":
        return patches.amax(dim=1)
    if pooling == "multiscale":
        n, t, c = patches.shape
        side = int(math.isqrt(t))
        return _pool_map_multiscale(patches.transpose(1, 2).reshape(n, c, side, side), grid)
    raise ValueError(f"pooling {pooling!r} does not apply to tokens; valid: cls, token_mean, avg, max, multiscale")


def _pool_map_multiscale(x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([F.adaptive_avg_pool2d(x, g).flatten(1) for g in grid], dim=1)
