"""`run.decode: fast` against the exact path on real photos: the parity bound (mean cos >= 0.995 per layer of
the bundled pretrained EfficientNet-Lite0) and the geometry of DCT-scaled decodes."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from photos import photo_jpegs
from pipeline.config import EncoderSpec
from pipeline.encoders import build_encoder
from pipeline.encoders.fast_decode import decode_fast, decode_jpegs_on_device, resize_crop
from pipeline.images import ImageDecodeError, decode_rgb, decode_rgb_reduced

PARITY_COS = 0.995


@pytest.fixture(scope="module")
def lite0():
    return build_encoder(EncoderSpec(name="efficientnet_lite0"), device="cpu")


def _mean_cos(enc, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    fa, fb = enc.encode(a), enc.encode(b)
    return {k: float(torch.nn.functional.cosine_similarity(fa[k], fb[k]).mean()) for k in fa}


def _exact(enc, blobs):
    return np.stack([enc.preprocessing.to_uint8(decode_rgb(b)) for b in blobs])


def _rotated(data: bytes, orientation: int) -> bytes:
    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def test_fast_matches_exact_on_photos(lite0):
    blobs = photo_jpegs(16, seed=3)  # 500-800 px: decoded at full size, resized by torch
    fast = np.stack([decode_fast(b, lite0.preprocessing, max_pixels=10**8) for b in blobs])
    exact = _exact(lite0, blobs)
    assert np.abs(fast.astype(int) - exact).mean() < 0.05  # torch's uint8 antialiased resize is PIL's filter
    assert min(_mean_cos(lite0, fast, exact).values()) >= PARITY_COS


def test_large_jpegs_decode_at_reduced_dct_scale_within_the_bound(lite0):
    blobs = photo_jpegs(8, seed=4, sides=(1100, 1400))
    for b in blobs:
        decoded = decode_rgb_reduced(b, reduce_to=2 * lite0.preprocessing.resize_size)
        assert decoded.box is not None and decoded.image.size[0] < decoded.size[0] / 1.9  # really reduced
    fast = np.stack([decode_fast(b, lite0.preprocessing, max_pixels=10**8) for b in blobs])
    cos = _mean_cos(lite0, fast, _exact(lite0, blobs))
    assert min(cos.values()) >= PARITY_COS, cos


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_reduced_decode_keeps_exif_orientation_geometry(lite0, orientation):
    data = _rotated(photo_jpegs(1, seed=5, sides=(1100, 1300))[0], orientation)
    fast = decode_fast(data, lite0.preprocessing, max_pixels=10**8).astype(int)
    exact = lite0.preprocessing.to_uint8(decode_rgb(data)).astype(int)
    # a box in the wrong corner shifts the crop by a pixel: an error of several levels on photo edges
    assert np.abs(fast - exact).mean() < 2.0


def test_small_jpegs_and_other_formats_are_not_reduced():
    blobs = photo_jpegs(1, seed=6)
    assert decode_rgb_reduced(blobs[0], reduce_to=512).box is None  # < 2x: full decode
    png = io.BytesIO()
    Image.open(io.BytesIO(photo_jpegs(1, seed=6, sides=(1100, 1100))[0])).save(png, "PNG")
    assert decode_rgb_reduced(png.getvalue(), reduce_to=256).box is None


def test_resize_crop_is_the_exact_geometry(lite0):
    image = decode_rgb(photo_jpegs(1, seed=7)[0])
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    got = resize_crop(pixels, lite0.preprocessing).numpy().astype(int)
    assert got.shape == (3, 224, 224)
    assert np.abs(got - lite0.preprocessing.to_uint8(image)).max() <= 1


def test_torchvision_decode_on_cpu_and_its_failures(lite0):
    blobs = photo_jpegs(3, seed=8)
    bad = blobs[1][: len(blobs[1]) // 3]
    out, reasons = decode_jpegs_on_device([blobs[0], bad, blobs[2]], lite0.preprocessing, torch.device("cpu"))
    assert out[1] is None and reasons[1] and reasons[0] is None and reasons[2] is None
    exact = _exact(lite0, [blobs[0], blobs[2]])
    assert np.abs(torch.stack([out[0], out[2]]).numpy().astype(int) - exact).mean() < 1.0


def test_fast_decode_reports_the_same_errors():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_fast(b"hello", build_encoder(EncoderSpec(name="efficientnet_lite0", weights="random"),
                                            device="cpu").preprocessing, max_pixels=10**8)


def test_fast_decode_is_in_the_provenance_and_exact_adds_nothing():
    spec = EncoderSpec(name="efficientnet_lite0", weights="random", layers=("bn2",))
    exact, fast = (build_encoder(spec, device="cpu", decode=d).provenance() for d in ("exact", "fast"))
    assert "decode" not in exact["preprocessing"]
    assert fast["preprocessing"]["decode"] == "fast"
    assert {k: v for k, v in fast.items() if k != "preprocessing"} == {
        k: v for k, v in exact.items() if k != "preprocessing"}
    with pytest.raises(ValueError, match="unknown decode 'quick'; valid"):
        build_encoder(spec, device="cpu", decode="quick")
