"""Pooling math on known tensors."""
import pytest
import torch

from pipeline.encoders import pooling as P


def test_map_poolings_on_known_tensor():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    assert P.pool(x, "avg").tolist() == [[7.5]]
    assert P.pool(x, "max").tolist() == [[15.0]]
    # 1x1 mean, then the 2x2 grid of quadrant means in row-major order
    assert P.pool(x, "multiscale", grid=(1, 2)).tolist() == [[7.5, 2.5, 4.5, 10.5, 12.5]]
    assert P.pool(x, "spatial").shape == (1, 16)


def test_token_poolings_skip_prefix_tokens():
    cls = torch.full((1, 1, 2), 100.0)
    patches = torch.arange(8, dtype=torch.float32).view(1, 4, 2)
    x = torch.cat([cls, patches], dim=1)
    assert P.pool(x, "cls", prefix_tokens=1).tolist() == [[100.0, 100.0]]
    assert P.pool(x, "token_mean", prefix_tokens=1).tolist() == [[3.0, 4.0]]
    assert P.pool(x, "max", prefix_tokens=1).tolist() == [[6.0, 7.0]]
    ms = P.pool(x, "multiscale", prefix_tokens=1, grid=(1, 2))
    assert ms.shape == (1, 2 * 5)
    assert ms[0, :2].tolist() == [3.0, 4.0]


def test_pooled_dims_match_pool_output():
    for shape, prefix in [((2, 8, 6, 6), 0), ((2, 17, 8), 1), ((2, 5), 0)]:
        x = torch.randn(*shape)
        kind = P.describe(x, prefix_tokens=prefix)
        for pooling in ("avg", "max", "multiscale", "spatial"):
            if kind.kind == "vector" and pooling not in ("avg", "max"):
                continue
            assert P.pool(x, pooling, prefix_tokens=prefix).shape[1] == P.pooled_dim(pooling, kind)


def test_half_precision_input_pooled_in_fp32():
    x = torch.full((1, 3, 2, 2), 1000.0, dtype=torch.float16)
    out = P.pool(x, "avg")
    assert out.dtype == torch.float32 and out.tolist() == [[1000.0] * 3]


def test_multiscale_needs_square_token_grid():
    kind = P.LayerKind("tokens", 8, (6,), prefix_tokens=1)
    with pytest.raises(ValueError, match="square patch grid"):
        P.check("multiscale", kind, layer="blk", grid=(1, 2), max_spatial_dim=10**6)
