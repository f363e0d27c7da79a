"""Pooling math on known tensors, in every layout."""
import pytest
import torch

from pipeline.encoders import pooling as P

MAP = P.LayerKind("map", 1, (4, 4))


def test_map_poolings_on_known_tensor():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert P.pool(x, "avg", MAP).tolist() == [[7.5]]
    assert P.pool(x, "max", MAP).tolist() == [[15.0]]
    # 1x1 mean, then the 2x2 grid of quadrant means in row-major order
    assert P.pool(x, "multiscale", MAP, grid=(1, 2)).tolist() == [[7.5, 2.5, 4.5, 10.5, 12.5]]
    assert P.pool(x, "spatial", MAP).shape == (1, 16)


def test_nhwc_map_pools_over_its_spatial_axes():
    nchw = torch.randn(2, 5, 3, 4)
    nhwc = nchw.permute(0, 2, 3, 1).contiguous()
    kind = P.LayerKind("map", 5, (3, 4), layout="NHWC")
    for pooling in ("avg", "max", "multiscale", "spatial"):
        got = P.pool(nhwc, pooling, kind)
        assert torch.allclose(got, P.pool(nchw, pooling, P.LayerKind("map", 5, (3, 4))), atol=1e-6), pooling
        assert got.shape[1] == P.pooled_dim(pooling, kind)
    assert P.pool(nhwc, "avg", kind).shape == (2, 5)


def test_token_poolings_skip_prefix_tokens():
    cls = torch.full((1, 1, 2), 100.0)
    dist = torch.full((1, 1, 2), 50.0)
    patches = torch.arange(8, dtype=torch.float32).view(1, 4, 2)
    x = torch.cat([cls, dist, patches], dim=1)
    kind = P.LayerKind("tokens", 2, (6,), prefix_tokens=2, token_grid=(2, 2))
    assert P.pool(x, "cls", kind).tolist() == [[100.0, 100.0]]
    assert P.pool(x, "prefix_mean", kind).tolist() == [[75.0, 75.0]]
    assert P.pool(x, "token_mean", kind).tolist() == [[3.0, 4.0]]
    assert P.pool(x, "max", kind).tolist() == [[6.0, 7.0]]
    ms = P.pool(x, "multiscale", kind, grid=(1, 2))
    assert ms.shape == (1, 2 * 5)
    assert ms[0, :2].tolist() == [3.0, 4.0]
    assert ms[0, 2:].tolist() == [0.0, 2.0, 4.0, 6.0, 1.0, 3.0, 5.0, 7.0]  # channel 0's 2x2, then channel 1's


def test_channels_first_tokens_pool_like_channels_last():
    nlc = torch.randn(2, 5, 3)
    ncl = P.LayerKind("tokens", 3, (5,), layout="NCL")
    assert torch.allclose(P.pool(nlc.transpose(1, 2), "avg", ncl), P.pool(nlc, "avg", P.LayerKind("tokens", 3, (5,))))


def test_pooled_dims_match_pool_output():
    kinds = [((2, 8, 6, 6), P.LayerKind("map", 8, (6, 6))),
             ((2, 17, 8), P.LayerKind("tokens", 8, (17,), prefix_tokens=1, token_grid=(4, 4))),
             ((2, 5), P.LayerKind("vector", 5))]
    for shape, kind in kinds:
        x = torch.randn(*shape)
        for pooling in ("avg", "max", "multiscale", "spatial"):
            if kind.kind == "vector" and pooling not in ("avg", "max"):
                continue
            assert P.pool(x, pooling, kind).shape[1] == P.pooled_dim(pooling, kind)


def test_pooled_output_owns_its_memory():
    # a later in-place op of the network (ReLU) must not reach features already pooled
    for x, kind, pooling in [(torch.randn(2, 4), P.LayerKind("vector", 4), "avg"),
                             (torch.randn(2, 3, 4), P.LayerKind("tokens", 4, (3,), prefix_tokens=1), "cls"),
                             (torch.randn(1, 2, 2, 2), MAP, "spatial")]:
        out = P.pool(x, pooling, kind)
        before = out.clone()
        x.relu_()
        assert torch.equal(out, before)


def test_half_precision_input_pooled_in_fp32():
    x = torch.full((1, 3, 2, 2), 1000.0, dtype=torch.float16)
    out = P.pool(x, "avg", P.LayerKind("map", 3, (2, 2)))
    assert out.dtype == torch.float32 and out.tolist() == [[1000.0] * 3]


def test_multiscale_needs_a_known_token_grid():
    kind = P.LayerKind("tokens", 8, (6,), prefix_tokens=1)
    with pytest.raises(ValueError, match="known row-major grid"):
        P.check("multiscale", kind, layer="blk", grid=(1, 2), max_spatial_dim=10**6)


def test_class_token_poolings_need_a_class_token():
    for pooling in ("cls", "prefix_mean"):
        with pytest.raises(ValueError, match="needs a transformer layer with a class token"):
            P.check(pooling, P.LayerKind("tokens", 8, (4,)), layer="blk", grid=(1,), max_spatial_dim=10**6)
