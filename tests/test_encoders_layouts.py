"""Layouts read from the model: over many timm families, strata's pooled layers agree with timm's own head.

Random weights, the smallest variants (some shrunk further through timm's own constructor arguments) and
64 px inputs: the mechanics of layouts do not depend on size or training.
"""
import numpy as np
import pytest
import torch
import timm
from torch import nn

from pipeline.encoders import FrozenEncoder, LayoutError
from pipeline.encoders.layouts import LayoutReader, declared_layout
from pipeline.encoders.preprocess import Preprocessing
from pipeline.encoders.registry import BuiltModel, prefix_tokens
from pipeline.encoders.weights import LoadedWeights


def _head_norm(model, pooled):
    """Heads that normalise after pooling (MambaOut, Hiera, TinyViT): the model's own modules, applied to ours."""
    return model.head.pre_logits(model.head.norm(pooled))


_SMALL_SWIN = {"img_size": 64, "window_size": 4, "depths": (1, 1, 2, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)}

# family, timm model, constructor arguments, the layer the head pools, how it pools it (strata's name),
# what the head does after pooling
FAMILIES = [
    ("ResNet", "resnet10t", {}, "layer4", "avg", None),
    ("EfficientNet", "efficientnet_b0", {}, "bn2", "avg", None),
    ("MobileNetV3", "mobilenetv3_small_050", {}, "act2", "avg", None),  # pools before conv_head: a 1x1 map
    ("RegNet", "regnetx_002", {}, "s4", "avg", None),
    ("ConvNeXt", "convnext_atto", {"head_norm_first": True}, "norm_pre", "avg", None),
    ("Swin", "swin_tiny_patch4_window7_224", _SMALL_SWIN, "norm", "avg", None),
    ("SwinV2", "swinv2_tiny_window8_256", _SMALL_SWIN, "norm", "avg", None),
    ("MambaOut", "mambaout_femto", {}, "stages.3", "avg", _head_norm),
    ("Hiera", "hiera_tiny_224", {"img_size": 64, "embed_dim": 32, "stages": (1, 1, 2, 1)}, "blocks.4", "avg",
     _head_norm),
    ("ViT", "vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, "norm", "cls", None),
    ("DeiT-distilled", "deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, "norm", "prefix_mean", None),
    ("ViT-reg4", "vit_little_patch16_reg4_gap_256", {"img_size": 64, "depth": 2, "fc_norm": False}, "norm", "avg",
     None),  # four register tokens and no class token: the mean must skip exactly the registers
    ("CoAtNet", "coatnet_pico_rw_224", {"img_size": 64}, "norm", "avg", None),
    ("MaxViT", "maxvit_pico_rw_256", {"img_size": 64}, "norm", "avg", None),
    ("FastViT", "fastvit_t8", {}, "final_conv", "avg", None),
    ("EVA", "eva02_tiny_patch14_224", {"img_size": 56, "depth": 2, "use_fc_norm": False}, "norm", "avg", None),
    ("PVTv2", "pvt_v2_b0", {}, "stages.3", "avg", None),
    ("LeViT", "levit_128s", {"img_size": 64}, "stages.2", "avg", None),  # NLC tokens, no prefix
]


def _built(model: nn.Module, size: int) -> BuiltModel:
    cfg = model.pretrained_cfg
    pre = Preprocessing(size, size, "bilinear", tuple(cfg["mean"]), tuple(cfg["std"]))
    return BuiltModel(model, pre, LoadedWeights(None, "random:0"), prefix_tokens(model), None)


def _size(kwargs: dict) -> int:
    return int(kwargs.get("img_size", 64))


@pytest.mark.parametrize("family,arch,kwargs,final,pooling,post", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_pooled_layers_agree_with_timm(family, arch, kwargs, final, pooling, post):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    size = _size(kwargs)
    built = _built(model, size)
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(built.preprocessing.normalize(pixels)), pre_logits=True)
    stages = {d["module"]: d["num_chs"] for d in model.feature_info}

    enc = FrozenEncoder(built, name=f"timm:{arch}", layers=[*stages, *([final] if final not in stages else [])],
                        pooling={"default": "avg", final: pooling})
    # stage dims are timm's feature_info channels, whatever the stage's layout (NCHW, NHWC, NLC)
    assert {n: enc.layer_dims[n] for n in stages} == stages
    got = enc.encode(pixels)[final]  # BN folded, channels_last: numerically the same network
    if post is not None:
        with torch.inference_mode():
            got = post(model, got)
    assert got.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 0
    assert torch.allclose(got, expected, atol=1e-3 * scale, rtol=0), float((got - expected).abs().max() / scale)


def _pixels(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def _first_output(model: nn.Module, layer: str, x: torch.Tensor):
    out = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, a, o: out.setdefault("t", o))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return out["t"]


def test_a_block_returning_several_tensors_is_pooled_on_its_per_image_one():
    """TNT's blocks return (pixel tokens: B x 196 patches of 16, patch tokens: B images): the second is the
    image's; pooling the first gave 24 channels and, cut to the batch, another image's pixels."""
    model = timm.create_model("tnt_s_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    built, px = _built(model, 64), _pixels(64)
    enc = FrozenEncoder(built, name="timm:tnt_s_patch16_224", layers=["blocks.1"])
    assert enc.layer_dims == {"blocks.1": 384} and enc.kinds["blocks.1"].prefix_tokens == 1
    pixel_tokens, patch_tokens = _first_output(model, "blocks.1", built.preprocessing.normalize(px))
    assert pixel_tokens.shape[0] == 2 * 16 and patch_tokens.shape[:2] == (2, 17)
    got = enc.encode(px)["blocks.1"]
    assert torch.allclose(got, patch_tokens[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(enc.encode(px[[1, 0]])["blocks.1"][1], got[0], atol=1e-5)  # no image sees another


def test_class_tokens_are_found_where_they_are_and_only_there():
    """XCiT's class token joins after its blocks (cls_attn_blocks); VOLO's comes late too, under no
    num_prefix_tokens; CoaT has one per stage (cls_token1..4)."""
    xcit = timm.create_model("xcit_nano_12_p16_224", pretrained=False, img_size=64, depth=2).eval()
    built, px = _built(xcit, 64), _pixels(64)
    enc = FrozenEncoder(built, name="timm:xcit", layers=["blocks.1", "cls_attn_blocks.0"])
    assert [enc.kinds[n].prefix_tokens for n in enc.layers] == [0, 1]
    block = _first_output(xcit, "blocks.1", built.preprocessing.normalize(px))
    assert torch.allclose(enc.encode(px)["blocks.1"], block.mean(1), atol=1e-5)  # every token is a patch

    for arch, kwargs, layer in (("volo_d1_224", {"img_size": 64}, "norm"), ("coat_lite_tiny", {}, "norm4")):
        model = timm.create_model(arch, pretrained=False, **kwargs).eval()
        assert not hasattr(model, "num_prefix_tokens") and prefix_tokens(model) == 1
        size = kwargs.get("img_size", 224)
        built, px = _built(model, size), _pixels(size)
        with torch.inference_mode():
            expected = model.forward_head(model.forward_features(built.preprocessing.normalize(px)),
                                          pre_logits=True)
        got = FrozenEncoder(built, name=f"timm:{arch}", layers=[layer], pooling="cls").encode(px)[layer]
        assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max())), arch


def test_blocks_that_concatenate_maps_along_channels_are_read_as_nchw():
    """DenseNet's dense blocks and Inception's Mixed_* return torch.cat of their convolutions' maps: no module
    produces the output, so before they were refused; they are NCHW, and pooled as such."""
    for arch, size, layer, channels in (("densenet121", 64, "features.denseblock4", 1024),
                                        ("inception_v3", 96, "Mixed_6a", 768)):
        model = timm.create_model(arch, pretrained=False).eval()
        built, px = _built(model, size), _pixels(size)
        enc = FrozenEncoder(built, name=f"timm:{arch}", layers=[layer], pooling="max")
        kind = enc.kinds[layer]
        assert (kind.layout, enc.layer_dims[layer]) == ("NCHW", channels)
        assert kind.source.startswith("concatenation of"), kind.source
        block = _first_output(model, layer, built.preprocessing.normalize(px))
        expected = block.amax((2, 3))
        assert torch.allclose(enc.encode(px)[layer], expected, atol=1e-4 * float(expected.abs().max())), arch


def test_a_model_with_5d_weights_runs_without_channels_last():
    model = timm.create_model("lambda_resnet26t", pretrained=False).eval()  # Conv3d inside its lambda layers
    enc = FrozenEncoder(_built(model, 64), name="timm:lambda_resnet26t", layers=["stages.0", "stages.3"])
    assert enc.memory_format == torch.contiguous_format
    out = enc.encode(_pixels(64))
    assert out["stages.3"].shape == (2, 2048) and torch.isfinite(out["stages.3"]).all()


def test_strata_layers_prints_true_swin_channels(capsys):
    import re

    from pipeline.cli import main

    assert main(["layers", "timm:swin_tiny_patch4_window7_224"]) == 0
    out = capsys.readouterr().out
    for stage, (side, channels) in enumerate(zip((56, 28, 14, 7), (96, 192, 384, 768))):
        # layer, kind, layout, one image's shape, pooled dim: the channels, not the height
        pattern = rf"^layers\.{stage}\s+map\s+NHWC\s+\({side}, {side}, {channels}\)\s+{channels}\s"
        assert re.search(pattern, out, re.MULTILINE), out


def test_hiera_refusals_name_the_reason():
    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=64, embed_dim=32, stages=(1, 1, 2, 1))
    built = _built(model.eval(), 64)
    with pytest.raises(LayoutError, match="cannot tell which axis of layer 'unroll'"):
        FrozenEncoder(built, name="timm:hiera_tiny_224", layers=["unroll"])
    # its blocks keep tokens in mask-unit order: order-free poolings only
    with pytest.raises(ValueError, match="known row-major grid"):
        FrozenEncoder(built, name="timm:hiera_tiny_224", layers=["blocks.0"], pooling="multiscale")


def test_vit_patch_tokens_know_their_grid_and_prefix():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1).eval()
    reader = LayoutReader(model, torch.zeros(1, 3, 64, 64), prefix_tokens=1)
    embed, block = reader.kind("patch_embed"), reader.kind("blocks.0")
    assert (embed.layout, embed.prefix_tokens, embed.token_grid) == ("NLC", 0, (4, 4))
    assert (block.layout, block.prefix_tokens, block.token_grid, block.spatial) == ("NLC", 1, (4, 4), (17,))


class _Permuted(nn.Module):
    """A block whose output is a permute of its conv's: no module declares the result."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Permuted()
        self.norm = nn.LayerNorm(5)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.norm(self.block(x)))


def test_layout_from_modules_and_shape_keeping_ones():
    reader = LayoutReader(_Net().eval(), torch.zeros(1, 3, 8, 8))
    assert reader.kind("block.conv").layout == "NCHW"
    assert reader.kind("norm").layout == "NHWC"  # LayerNorm over the last axis: channels last
    assert reader.kind("act").layout == "NHWC"  # keeps its input's shape, so its input's layout
    with pytest.raises(LayoutError, match="cannot tell which axis of layer 'block'"):
        reader.kind("block")


@pytest.mark.parametrize("module,shape,layout", [
    (nn.Conv2d(3, 8, 1), (1, 8, 4, 4), "NCHW"),
    (nn.BatchNorm2d(8), (1, 8, 4, 4), "NCHW"),
    (nn.Linear(4, 8), (1, 4, 4, 8), "NHWC"),
    (nn.LayerNorm(8), (1, 5, 8), "NLC"),
    (timm.layers.LayerNorm2d(8), (1, 8, 4, 4), "NCHW"),
    (nn.Conv1d(3, 8, 1), (1, 8, 5), "NCL"),
    (nn.Linear(4, 8), (1, 8, 4, 4), None),  # channel count does not fit: no claim
    (nn.GELU(), (1, 8, 4, 4), None),
])
def test_declared_layouts(module, shape, layout):
    assert declared_layout(module, shape) == layout


def test_layer_that_never_runs_is_refused():
    model = timm.create_model("resnet10t", pretrained=False).eval()
    model.unused = nn.Conv2d(3, 3, 1)
    with pytest.raises(LayoutError, match=r"\['unused'\] produced no output"):
        FrozenEncoder(_built(model, 64), name="timm:resnet10t", layers=["unused"])


def test_uint8_numpy_and_tensor_inputs_encode_alike():
    model = timm.create_model("resnet10t", pretrained=False).eval()
    enc = FrozenEncoder(_built(model, 64), name="timm:resnet10t", layers=["layer2"])
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    pixels.setflags(write=False)  # a Ray block is a read-only view
    assert torch.equal(enc.encode(pixels)["layer2"], enc.encode(torch.from_numpy(pixels.copy()))["layer2"])
