"""Layer taps: one forward pass yields every requested layer, equal to separate passes."""
import pytest
import torch

from pipeline.config import EncoderSpec
from pipeline.encoders import ENCODERS, build_encoder, describe_layers

# Expected pooled ("avg") dims of each registered encoder's default layers.
EXPECTED_DIMS = {
    "efficientnet_lite0": [24, 40, 112, 320, 1280],
    "resnet18": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "efficientnet_b0": [24, 80, 192, 1280],
    "convnext_tiny": [96, 192, 384, 768],
    "vit_b_16": [768, 768, 768, 768],
}


def _pixels(n=2, size=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_default_layers_shapes_and_dims(name):
    enc = build_encoder(EncoderSpec(name=name, weights="random:0"), device="cpu")
    assert list(enc.layer_dims.values()) == EXPECTED_DIMS[name]
    out = enc.encode(_pixels(n=2, size=enc.preprocessing.crop_size))
    assert list(out) == enc.layers
    for layer, t in out.items():
        assert t.shape == (2, enc.layer_dims[layer]) and t.dtype == torch.float32
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_layers_listing_covers_default_layers(name):
    listed = {i.name: i for i in describe_layers(name)}
    for layer, dim in zip(ENCODERS[name].default_layers, EXPECTED_DIMS[name]):
        assert listed[layer].dim == dim


def test_timm_model_by_name():
    enc = build_encoder(EncoderSpec(name="timm:resnet10t", weights="random:1", layers=("layer2", "-1")), device="cpu")
    out = enc.encode(_pixels(n=1, size=enc.preprocessing.crop_size))
    assert out["layer2"].shape == (1, 128) and out["fc"].shape == (1, 1000)


@pytest.mark.parametrize("name,layers,pooling", [
    ("efficientnet_lite0", ("blocks.1", "blocks.4", "bn2", "classifier"), "avg"),
    ("resnet18", ("bn1", "layer2", "layer4"), "multiscale"),
    ("vit_b_16", ("encoder.layers.encoder_layer_3", "encoder.ln"), "cls"),
])
def test_one_pass_equals_single_layer_passes(name, layers, pooling):
    x = _pixels(n=3)
    multi = build_encoder(EncoderSpec(name=name, weights="random:3", layers=layers, pooling=pooling), device="cpu")
    together = multi.encode(x)
    for layer in layers:
        single = build_encoder(EncoderSpec(name=name, weights="random:3", layers=(layer,), pooling=pooling), device="cpu")
        assert torch.equal(single.encode(x)[layer], together[layer]), layer


def test_forward_stops_after_deepest_tap():
    enc = build_encoder(EncoderSpec(name="resnet18", weights="random:0", layers=("layer2",)), device="cpu")
    calls = []
    handle = enc.model.layer3.register_forward_hook(lambda *a: calls.append(1))
    enc.encode(_pixels(n=1))
    handle.remove()
    assert calls == []


def test_tap_sees_activation_before_inplace_relu():
    # resnet's bn1 output is rectified in place by the next module; the tap must keep negatives.
    enc = build_encoder(EncoderSpec(name="resnet18", weights="random:0", layers=("bn1",), pooling="spatial",
                                    max_spatial_dim=10**7), device="cpu")
    assert (enc.encode(_pixels(n=1))["bn1"] < 0).any()


def test_layers_by_negative_index_and_execution_order():
    enc = build_encoder(EncoderSpec(name="efficientnet_lite0", weights="random:0", layers=("-1", "blocks.2")),
                        device="cpu")
    assert enc.layers == ["blocks.2", "classifier"]


def test_batches_padded_to_a_shape_multiple_keep_each_images_features():
    """On CUDA batches run padded (few shapes for blocks of any size); forced here on the CPU: same features."""
    enc = build_encoder(EncoderSpec(name="resnet18", weights="random:0", layers=("layer1", "layer2")), device="cpu")
    x = _pixels(n=5)
    plain = enc.encode(x)
    enc.shape_multiple = 8
    assert enc._run_size(5) == 8 and enc._run_size(8) == 8 and enc._run_size(9) == 16
    padded = enc.encode(x)
    for layer in plain:
        assert padded[layer].shape == plain[layer].shape == (5, enc.layer_dims[layer])
        torch.testing.assert_close(padded[layer], plain[layer], rtol=1e-4, atol=1e-5)


def test_bf16_compute_close_to_fp32():
    x = _pixels(n=2)
    ref = build_encoder(EncoderSpec(name="resnet18", weights="random:0"), device="cpu").encode(x)
    low = build_encoder(EncoderSpec(name="resnet18", weights="random:0", compute_dtype="bf16"), device="cpu").encode(x)
    for layer in ref:
        assert low[layer].dtype == torch.float32
        rel = (low[layer] - ref[layer]).norm() / ref[layer].norm()
        assert rel < 0.05, (layer, float(rel))


@pytest.mark.parametrize("spec,match", [
    (EncoderSpec(name="resnet19"), "unknown encoder 'resnet19'; valid: .*resnet18"),
    (EncoderSpec(name="resnet18", weights="random", layers=("layer9",)), "unknown layer 'layer9'; tappable layers: .*layer4"),
    (EncoderSpec(name="resnet18", weights="random", pooling="median"), "unknown pooling 'median'.*valid: .*multiscale"),
    (EncoderSpec(name="resnet18", weights="random", pooling="cls"), "class token"),
    (EncoderSpec(name="resnet18", weights="random", compute_dtype="fp8"), "unknown compute dtype 'fp8'; valid"),
    (EncoderSpec(name="resnet18", weights="IMAGENET9K"), "unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"),
    (EncoderSpec(name="resnet18", weights="random", layers=("layer1",), pooling="spatial", max_spatial_dim=1000),
     r"raw spatial map of layer 'layer1' would be 200704 values per image"),
    (EncoderSpec(name="resnet18", weights="random", layer_pooling={"layer9": "max"}), "pooling given for layers not requested"),
])
def test_bad_encoder_specs_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        build_encoder(spec, device="cpu")


def test_cuda_refused_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_encoder(EncoderSpec(name="resnet18", weights="random", device="cuda"))


def test_per_layer_pooling_overrides_the_default():
    enc = build_encoder(EncoderSpec(name="efficientnet_lite0", weights="random:0", layers=("blocks.2", "classifier"),
                                    pooling="multiscale", layer_pooling={"classifier": "avg"}), device="cpu")
    assert enc.pooling == {"blocks.2": "multiscale", "classifier": "avg"}
    assert enc.layer_dims == {"blocks.2": 40 * 5, "classifier": 1000}


def test_compiled_encoder_matches_eager():
    """encoder.compile: torch.compile of the tapped forward gives the eager features, a short batch included
    (padded to the compiled shape, so it does not recompile)."""
    from pipeline.encoders.preprocess import Preprocessing

    spec = EncoderSpec(name="timm:test_resnet", weights="random:0", layers=("layer2", "layer4"), pooling="multiscale",
                       preprocessing=Preprocessing(64, 64, "bilinear", (0.5,) * 3, (0.25,) * 3))
    eager = build_encoder(spec, device="cpu")
    compiled = build_encoder(EncoderSpec(**{**spec.__dict__, "compile": True}), device="cpu")
    assert compiled.provenance() == eager.provenance()  # the same network: the same feature set
    x = _pixels(n=3, size=64)
    for batch in (x, x[:2]):
        want, got = eager.encode(batch), compiled.encode(batch)
        for layer in spec.layers:
            assert got[layer].shape == want[layer].shape
            assert torch.allclose(got[layer], want[layer], rtol=1e-4, atol=1e-4 * float(want[layer].abs().max()))


def test_hooks_act_only_inside_the_encoder():
    enc = build_encoder(EncoderSpec(name="resnet18", weights="random:0", layers=("layer2",)), device="cpu")
    with torch.inference_mode():
        logits = enc.model(torch.zeros(1, 3, 64, 64))  # a plain forward of the model runs to the end
    assert logits.shape == (1, 1000)


def test_encode_batches_streams_what_encode_gives():
    enc = build_encoder(EncoderSpec(name="resnet18", weights="random:0", layers=("layer1", "layer3")), device="cpu")
    x = _pixels(n=5, size=64)
    batches = [x[:2].numpy(), x[2:4], x[4:].numpy()]
    streamed = list(enc.encode_batches(iter(batches)))
    assert len(streamed) == 3
    for got, batch in zip(streamed, batches):
        want = enc.encode(batch)
        assert all(torch.equal(got[k], want[k]) for k in enc.layers)
    assert list(enc.encode_batches([])) == []


def test_layers_listing_refuses_a_pooling_as_an_extract_would():
    """`strata layers --pooling cls` on a CNN: every layer refused with extract's reason, not '32 (avg)'."""
    listed = {i.name: i for i in describe_layers("resnet18", pooling="cls")}
    assert listed["layer2"].dim == 0 and "refused: pooling 'cls' needs a transformer layer" in listed["layer2"].note
    assert listed["fc"].dim == 0 and "already a vector" in listed["fc"].note
    multiscale = {i.name: i for i in describe_layers("resnet18", pooling="multiscale")}
    assert multiscale["layer2"].dim == 128 * 5 and multiscale["layer2"].pooling == "multiscale"


def test_layers_listing_names_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"weights: .*nope.pth not found"):
        describe_layers("resnet18", weights=str(tmp_path / "nope.pth"))
