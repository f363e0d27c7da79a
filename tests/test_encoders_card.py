"""Encoder cards: the driver's torch-free view of an encoder, cached while its weights files are unchanged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import ExtractConfig, load_config
from pipeline.encoders import build_encoder, build_model, resolve_entry
from pipeline.encoders.card import CACHE_ENV, EncoderCard, load_card, provenance_mismatch, save_card
from pipeline.extract.run import prepare_encoder
from pipeline.extract.stages import EncodeShard

REPO = Path(__file__).resolve().parents[1]
TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1,layer3]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def _json(obj):
    return json.loads(json.dumps(obj))


def _cfg(tmp_path, *extra) -> ExtractConfig:
    return load_config(ExtractConfig, None, ["source.kind=folder", f"source.uri={tmp_path}",
                                             f"store.root={tmp_path / 'stores'}", *TINY, *extra])


def test_card_describes_the_encoder_it_was_saved_from(cache, tmp_path):
    spec = _cfg(tmp_path).encoder
    encoder = build_encoder(spec, device="cpu")
    assert load_card(spec) is None
    assert save_card(spec, encoder) is not None
    card = load_card(spec)
    assert isinstance(card, EncoderCard)
    assert card.layers == tuple(encoder.layers) == ("layer1", "layer3")
    assert card.layer_dims == encoder.layer_dims
    assert card.preprocessing == encoder.preprocessing
    assert card.provenance() == _json(encoder.provenance())


def test_card_is_per_spec_but_not_per_batch_size(cache, tmp_path):
    spec = _cfg(tmp_path).encoder
    save_card(spec, build_encoder(spec, device="cpu"))
    assert load_card(replace(spec, batch_size=7, device="cpu")) is not None
    assert load_card(replace(spec, layers=("layer2",))) is None
    assert load_card(replace(spec, weights="random:1")) is None
    assert load_card(replace(spec, pooling="max")) is None


def test_changed_or_missing_weights_file_retires_the_card(cache, tmp_path):
    ckpt = tmp_path / "resnet18.pth"
    torch.save(build_model(resolve_entry("resnet18"), "random:0").model.state_dict(), ckpt)
    spec = _cfg(tmp_path, f"encoder.weights=file://{ckpt}").encoder
    encoder = build_encoder(spec, device="cpu")
    assert encoder.weights.files == (f"file://{ckpt}",)
    save_card(spec, encoder)
    assert load_card(spec) is not None
    state = torch.load(ckpt, weights_only=True)
    state["fc.bias"] = state["fc.bias"] + 1.0
    torch.save(state, ckpt)
    assert load_card(spec) is None  # new contents: the weights' sha256 in the card would be wrong
    save_card(spec, build_encoder(spec, device="cpu"))
    assert load_card(spec).provenance()["weights_sha256"] != encoder.provenance()["weights_sha256"]
    ckpt.unlink()
    assert load_card(spec) is None


def test_unreadable_card_is_ignored_and_empty_cache_dir_turns_caching_off(cache, tmp_path, monkeypatch):
    spec = _cfg(tmp_path).encoder
    path = save_card(spec, build_encoder(spec, device="cpu"))
    path.write_text("{not json")
    assert load_card(spec) is None
    monkeypatch.setenv(CACHE_ENV, "")
    assert save_card(spec, build_encoder(spec, device="cpu")) is None
    assert load_card(spec) is None


def test_driver_reads_a_cached_card_without_importing_torch(cache, tmp_path):
    cfg = _cfg(tmp_path)
    built = prepare_encoder(cfg)  # first run: builds, caches the card
    assert not isinstance(built, EncoderCard)
    script = (
        "import json, sys\n"
        "from pipeline.config import ExtractConfig, load_config\n"
        "from pipeline.extract.run import prepare_encoder\n"
        f"cfg = load_config(ExtractConfig, None, {json.dumps(['source.kind=folder', f'source.uri={tmp_path}'] + TINY)})\n"
        "enc = prepare_encoder(cfg)\n"
        "print(json.dumps({'type': type(enc).__name__, 'torch': 'torch' in sys.modules, 'timm': 'timm' in sys.modules,"
        " 'provenance': enc.provenance(), 'dims': enc.layer_dims}))\n"
    )
    env = {**os.environ, CACHE_ENV: str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["type"] == "EncoderCard"
    assert not seen["torch"] and not seen["timm"]
    assert seen["provenance"] == _json(built.provenance())
    assert seen["dims"] == built.layer_dims


def test_encoder_actor_refuses_an_encoder_other_than_the_planned_one(tmp_path):
    spec = _cfg(tmp_path).encoder
    planned = build_encoder(spec, device="cpu").provenance()
    actor = EncodeShard(encoder_spec=spec, device="cpu", store_dtype="float16", expected_provenance=planned)
    assert actor.encoder.provenance() == planned
    stale = {**planned, "layer_dims": {"layer1": 64, "layer3": 999}}
    with pytest.raises(RuntimeError, match="differs from the one the driver planned.*layer_dims"):
        EncodeShard(encoder_spec=spec, device="cpu", store_dtype="float16", expected_provenance=stale)
    # where the weights file lies is not what the features depend on
    moved = {**planned, "weights_source": "/elsewhere/weights.pth"}
    assert provenance_mismatch(moved, planned) == []
