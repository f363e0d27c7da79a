"""Frozen pretrained encoders: registry, weights, preprocessing, layer taps and pooling.

Knows nothing of Ray or stores.
"""
from __future__ import annotations

from .encoder import COMPUTE_DTYPES, FrozenEncoder, LayerInfo, describe_layers, resolve_device
from .pooling import POOLINGS
from .preprocess import Preprocessing
from .registry import ENCODERS, EncoderEntry, build_model, resolve_entry
from .weights import WeightsNotFoundError

__all__ = [
    "COMPUTE_DTYPES", "ENCODERS", "POOLINGS", "EncoderEntry", "FrozenEncoder", "LayerInfo", "Preprocessing",
    "WeightsNotFoundError", "build_encoder", "build_model", "describe_layers", "resolve_device", "resolve_entry",
]


def build_encoder(spec, *, device: str | None = None, storage_options: dict | None = None) -> FrozenEncoder:
    """A ready FrozenEncoder from an `EncoderSpec` (see pipeline.config)."""
    entry = resolve_entry(spec.name)
    built = build_model(entry, spec.weights, storage_options=storage_options)
    if spec.preprocessing is not None:
        built.preprocessing = spec.preprocessing
    return FrozenEncoder(
        built,
        name=spec.name,
        layers=spec.layers,
        pooling=dict(spec.layer_pooling) | {"default": spec.pooling} if spec.layer_pooling else spec.pooling,
        multiscale_grid=spec.multiscale_grid,
        compute_dtype=spec.compute_dtype,
        device=device or spec.device,
        max_spatial_dim=spec.max_spatial_dim,
    )
