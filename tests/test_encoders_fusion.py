"""Conv-BN folding: same activations, fewer modules; refused where it would change the network."""
import pytest
import torch
from torch import nn

from pipeline.config import EncoderSpec
from pipeline.encoders import FrozenEncoder, build_encoder, build_model, resolve_entry
from pipeline.encoders.fusion import find_conv_bn_pairs, fold_batchnorm


def _pixels(n=2, size=224, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _randomize_bn(model: nn.Module, seed=0) -> None:
    """Init-time BN stats are the identity map: give them real values so that folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.5)


def _pair(name, layers, pooling="avg"):
    """The same encoder (randomized BN statistics) built unfolded and folded."""
    def make(fold):
        built = build_model(resolve_entry(name), "random:0")
        _randomize_bn(built.model)
        return FrozenEncoder(built, name=name, layers=layers, pooling=pooling, max_spatial_dim=10**7, fold_bn=fold)

    plain, folded = make(False), make(True)
    return plain, folded, folded.folded_bn


@pytest.mark.parametrize("name,layers,expected", [
    ("resnet18", ("layer1", "layer3", "layer4"), 20),  # conv1/bn1, 2 per basic block x 8, 3 downsample
    ("efficientnet_lite0", ("blocks.2", "blocks.6", "bn2"), 49),
])
def test_folded_encoder_gives_the_same_features(name, layers, expected):
    plain, folded, n = _pair(name, layers)
    assert n == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    x = _pixels()
    ref, got = plain.encode(x), folded.encode(x)
    for layer in layers:
        scale = ref[layer].abs().max()
        assert scale > 0.1, layer
        assert torch.allclose(got[layer], ref[layer], atol=1e-3 * float(scale)), layer


def test_tapped_bn_and_tapped_conv_keep_their_own_outputs():
    # bn2 is a BatchNormAct2d (BN + ReLU6): folded, its module must still yield the activation;
    # conv_head is tapped itself, so it must stay the raw conv (its BN is not folded into it).
    plain, folded, n = _pair("efficientnet_lite0", ("conv_head", "bn2"), pooling="spatial")
    assert n == 48
    assert isinstance(folded.model.get_submodule("conv_head"), nn.Conv2d)
    assert isinstance(folded.model.bn2, nn.BatchNorm2d)  # the pair that feeds a tapped conv's BN stays
    x = _pixels(n=1)
    ref, got = plain.encode(x), folded.encode(x)
    assert (ref["conv_head"] < 0).any() and ref["bn2"].min() >= 0 and ref["bn2"].max() <= 6
    for layer in ("conv_head", "bn2"):
        assert torch.allclose(got[layer], ref[layer], atol=1e-3 * float(ref[layer].abs().max())), layer


def test_tapped_bn_becomes_its_activation():
    plain, folded, n = _pair("resnet18", ("bn1",), pooling="spatial")
    assert n == 20 and isinstance(folded.model.bn1, nn.Identity)
    x = _pixels(n=1)
    ref, got = plain.encode(x)["bn1"], folded.encode(x)["bn1"]
    assert (ref < 0).any()  # taken before the in-place ReLU, folded or not
    assert torch.allclose(got, ref, atol=1e-3 * float(ref.abs().max()))


class _ConvUsedTwice(nn.Module):
    """The conv output feeds the BN AND a residual: folding the BN into it would change the residual."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


def test_fold_that_changes_the_network_is_undone():
    model = _ConvUsedTwice()
    _randomize_bn(model)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x).detach()
    assert find_conv_bn_pairs(model, x) == [("conv", "bn")]
    assert fold_batchnorm(model, ["bn"], x) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert torch.equal(model(x).detach(), ref)


def test_bn_before_conv_is_not_folded():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)).eval()
    assert fold_batchnorm(model, ["1"], torch.randn(1, 3, 8, 8)) == 0


def test_training_mode_refused():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), ["1"], torch.randn(1, 3, 8, 8))


def test_encoder_folds_by_default_and_can_be_told_not_to():
    on = build_encoder(EncoderSpec(name="resnet18", weights="random:0"), device="cpu")
    off = build_encoder(EncoderSpec(name="resnet18", weights="random:0", fold_batchnorm=False), device="cpu")
    assert on.folded_bn > 0 and off.folded_bn == 0
    assert any(isinstance(m, nn.BatchNorm2d) for m in off.model.modules())
    assert on.provenance() == off.provenance()  # numerically the same network: the same feature set
