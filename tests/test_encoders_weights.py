"""Weight sources: seeds, checkpoint URIs, the local hub cache; nothing is downloaded."""
import pytest
import torch

from pipeline.config import EncoderSpec
from pipeline.encoders import WeightsNotFoundError, build_encoder, build_model, resolve_entry


def test_random_seed_is_reproducible_and_recorded():
    a = build_model(resolve_entry("resnet18"), "random:5").weights
    b = build_model(resolve_entry("resnet18"), "random:5").weights
    c = build_model(resolve_entry("resnet18"), "random:6").weights
    assert a.sha256 == b.sha256 != c.sha256
    assert a.source == "random:5"


@pytest.mark.parametrize("scheme", ["path", "file", "memory"])
def test_checkpoint_uri_round_trip(tmp_path, scheme):
    import fsspec

    src = build_model(resolve_entry("resnet18"), "random:9")
    payload = {"state_dict": {f"module.{k}": v for k, v in src.model.state_dict().items()}}
    if scheme == "memory":
        uri = "memory://ckpt/resnet18.pth"
        with fsspec.open(uri, "wb") as f:
            torch.save(payload, f)
    else:
        path = tmp_path / "resnet18.pth"
        torch.save(payload, path)
        uri = str(path) if scheme == "path" else f"file://{path}"
    loaded = build_model(resolve_entry("resnet18"), uri)
    assert loaded.weights.sha256 == src.weights.sha256
    assert loaded.weights.source == uri


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    src = build_model(resolve_entry("resnet18"), "random:2")
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    assert build_model(resolve_entry("resnet18"), str(path)).weights.sha256 == src.weights.sha256


def test_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        build_model(resolve_entry("resnet18"), str(path))


def test_mismatched_checkpoint_names_the_problem(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(build_model(resolve_entry("resnet18"), "random").model.state_dict(), path)
    with pytest.raises(ValueError, match="do not fit the architecture"):
        build_model(resolve_entry("resnet50"), str(path))


def test_torchvision_weights_missing_from_cache_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")):
        build_model(resolve_entry("resnet18"), "IMAGENET1K_V1")


def test_torchvision_weights_found_in_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    src = build_model(resolve_entry("resnet18"), "random:4")
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    target.parent.mkdir(parents=True)
    torch.save(src.model.state_dict(), target)
    built = build_model(resolve_entry("resnet18"), "IMAGENET1K_V1")
    assert built.weights.sha256 == src.weights.sha256
    assert built.class_names[0] == "tench"


def test_timm_pretrained_missing_from_cache_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="not in the local Hugging Face cache"):
        build_encoder(EncoderSpec(name="timm:resnet10t", weights="pretrained"), device="cpu")
