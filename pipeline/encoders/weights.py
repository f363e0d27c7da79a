"""Where weights come from: the bundled package, a local hub cache, a checkpoint URI, or a seed.

Nothing here downloads. A missing file is an error that names the file looked for.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec
import torch

log = logging.getLogger(__name__)

CHECKPOINT_SCHEMES = ("file://", "s3://", "gs://", "az://", "memory://", "http://", "https://")


class WeightsNotFoundError(FileNotFoundError):
    """Weights are not on this machine; strata never downloads them at run time."""


@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor] | None  # None: keep the random init
    source: str
    sha256: str = ""
    files: tuple[str, ...] = ()  # the local paths or URIs the tensors were read from


def parse_random_seed(weights: str) -> int | None:
    """`random` -> 0, `random:7` -> 7, anything else -> None."""
    if weights == "random":
        return 0
    if weights.startswith("random:"):
        try:
            return int(weights.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"weights {weights!r}: the seed after 'random:' must be an integer") from None
    return None


def is_checkpoint_uri(weights: str) -> bool:
    return weights.startswith(CHECKPOINT_SCHEMES) or weights.endswith((".pth", ".pt", ".bin", ".safetensors"))


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash of the tensors as loaded, independent of the file format they came in."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_checkpoint(uri: str, *, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    """A state dict from any fsspec URI; pickles are loaded with weights_only=True."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as f:
        data = f.read()
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {uri} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def torch_hub_file(url: str) -> Path:
    """The path torch.hub would cache `url` at (TORCH_HOME / hub / checkpoints / <name>)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_torch_hub_cached(url: str) -> dict[str, torch.Tensor]:
    path = torch_hub_file(url)
    if not path.exists():
        raise WeightsNotFoundError(
            f"weights not in the local torch hub cache: looked for {path}. strata does not download "
            f"at run time; place the file there (from {url}), or pass a checkpoint URI, or use weights 'random'"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def hf_cached_file(repo_id: str) -> str:
    """The local Hugging Face hub cache file of a timm model's weights, without network access."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str):
            return path
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsNotFoundError(
        f"timm weights for {repo_id} are not in the local Hugging Face cache ({HF_HUB_CACHE}, "
        f"model.safetensors or pytorch_model.bin); strata does not download at run time"
    )


def load_hf_cached(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a file that `hf_cached_file` found."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
