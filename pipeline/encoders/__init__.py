"""Frozen pretrained encoders: registry, weights, preprocessing, layer taps and pooling.

Knows nothing of Ray or stores.
"""
from __future__ import annotations

import importlib

from .preprocess import Preprocessing

# Heavy (torch) names load on first use, so `pipeline.encoders.preprocess` stays cheap to import.
_LAZY = {
    "COMPUTE_DTYPES": ".encoder", "FrozenEncoder": ".encoder", "LayerInfo": ".encoder",
    "describe_layers": ".encoder", "resolve_device": ".encoder", "POOLINGS": ".pooling",
    "LayoutError": ".layouts",
    "ENCODERS": ".catalog", "EncoderEntry": ".catalog", "build_model": ".registry", "resolve_entry": ".catalog",
    "WeightsNotFoundError": ".weights",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "COMPUTE_DTYPES", "ENCODERS", "POOLINGS", "EncoderEntry", "FrozenEncoder", "LayerInfo", "LayoutError",
    "Preprocessing",
    "WeightsNotFoundError", "build_encoder", "build_model", "describe_layers", "resolve_device", "resolve_entry",
]


def build_encoder(spec, *, device: str | None = None, storage_options: dict | None = None, decode: str = "exact"):
    """A ready FrozenEncoder from an `EncoderSpec` (see pipeline.config); `decode` is the run's `run.decode`,
    which the encoder records in its provenance."""
    from .encoder import FrozenEncoder
    from .registry import build_model, resolve_entry

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
        fold_bn=spec.fold_batchnorm,
        compile=spec.compile,
        decode=decode,
    )
