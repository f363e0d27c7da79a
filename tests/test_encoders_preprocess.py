"""Preprocessing belongs to the weights: parity with each library's own reference transform."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import EncoderSpec
from pipeline.encoders import build_encoder, build_model, resolve_entry


def _photo(w=300, h=200, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
    noise = rng.normal(0, 30, (h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_b_16"])
@pytest.mark.parametrize("size", [(300, 200), (200, 301), (256, 256), (97, 150)])
def test_torchvision_parity_with_weights_transforms(name, size):
    from torchvision.models import get_model_weights

    built = build_model(resolve_entry(name), "random")
    reference = get_model_weights(name)[resolve_entry(name).default_weights].transforms()
    img = _photo(*size)
    ours = built.preprocessing.normalize(torch.from_numpy(built.preprocessing.batch([img])))[0]
    torch.testing.assert_close(ours, reference(img), atol=1e-6, rtol=0)


def test_timm_parity_with_timm_eval_transform():
    import timm
    from timm.data import create_transform, resolve_data_config

    built = build_model(resolve_entry("timm:resnet10t"), "random")
    reference = create_transform(**resolve_data_config({}, model=timm.create_model("resnet10t")))
    img = _photo(257, 311)
    ours = built.preprocessing.normalize(torch.from_numpy(built.preprocessing.batch([img])))[0]
    torch.testing.assert_close(ours, reference(img), atol=1e-6, rtol=0)


def test_bundled_lite0_uses_tf_lite_preprocessing():
    p = build_model(resolve_entry("efficientnet_lite0"), "random").preprocessing
    assert (p.resize_size, p.crop_size, p.interpolation) == (256, 224, "bicubic")
    x = p.normalize(torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1))
    assert x.flatten().tolist() == pytest.approx([-127 / 128, 0.0, 1.0], abs=1e-6)


def test_preprocessing_is_recorded_and_an_override_is_explicit():
    from pipeline.encoders import Preprocessing

    enc = build_encoder(EncoderSpec(name="resnet18", weights="random"), device="cpu")
    assert tuple(enc.provenance()["preprocessing"]["mean"]) == (0.485, 0.456, 0.406)
    custom = Preprocessing(resize_size=128, crop_size=112, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    enc = build_encoder(EncoderSpec(name="resnet18", weights="random", preprocessing=custom), device="cpu")
    assert enc.provenance()["preprocessing"]["crop_size"] == 112


def test_bad_interpolation_refused():
    from pipeline.encoders import Preprocessing

    with pytest.raises(ValueError, match="unknown interpolation 'lanczos9'; valid"):
        Preprocessing(resize_size=10, crop_size=8, interpolation="lanczos9", mean=(0,) * 3, std=(1,) * 3)
