"""decode_rgb: every PIL mode to correct RGB, and clear reasons for bad files."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageDecodeError, decode_rgb, to_rgb

RED = (255, 0, 0)
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def close(pixel, expected, tol=0):
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected))


def decoded(data: bytes) -> Image.Image:
    image = decode_rgb(data)
    assert image.mode == "RGB"
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking 1-bit PNG that claims a huge size but is a few dozen bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def noise(size=48) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_rgb_png_and_jpeg_roundtrip():
    image = Image.new("RGB", (40, 32), (10, 200, 30))
    assert decoded(encode(image, "PNG")).getpixel((5, 5)) == (10, 200, 30)
    jpeg = decoded(encode(image, "JPEG", quality=95))
    assert jpeg.size == (40, 32) and close(jpeg.getpixel((5, 5)), (10, 200, 30), tol=6)


def test_grayscale_and_one_bit():
    assert decoded(encode(Image.new("L", (32, 32), 77), "PNG")).getpixel((0, 0)) == (77, 77, 77)
    bits = Image.new("1", (32, 32), 0)
    bits.putpixel((3, 3), 1)
    out = decoded(encode(bits, "PNG"))
    assert out.getpixel((3, 3)) == WHITE and out.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    out = decoded(encode(palette, "PNG"))
    assert out.getpixel((0, 0)) == RED and out.getpixel((5, 5)) == (0, 0, 255)
    # index 0 (red) transparent: composited onto white, not shown as red or black
    out = decoded(encode(palette, "PNG", transparency=0))
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((5, 5)) == (0, 0, 255)


def test_rgba_and_la_composite_onto_white():
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))  # half transparent black -> mid grey
    out = decoded(encode(rgba, "PNG"))
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 1)) == RED
    assert close(out.getpixel((2, 2)), (127, 127, 127), tol=1)
    la = Image.new("LA", (32, 32), (0, 0))
    la.putpixel((1, 1), (0, 255))
    out = decoded(encode(la, "PNG"))
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 1)) == (0, 0, 0)


def test_grayscale_png_with_transparent_value():
    gray = Image.new("L", (32, 32), 9)
    gray.putpixel((0, 0), 200)
    out = decoded(encode(gray, "PNG", transparency=9))
    assert out.getpixel((5, 5)) == WHITE and out.getpixel((0, 0)) == (200, 200, 200)


def test_cmyk_jpeg_colours():
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in CMYK
    out = decoded(encode(cmyk, "JPEG", quality=95))
    assert close(out.getpixel((16, 16)), RED, tol=8)


def test_sixteen_bit_png_scales_not_clips():
    values = np.array([[0, 32768, 65535, 257 * 100]], dtype=np.uint16)
    out = decoded(encode(Image.fromarray(values), "PNG"))
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 255, 100]


def test_big_endian_sixteen_bit_and_int_modes():
    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    big = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    assert [to_rgb(big).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    as_int = Image.fromarray(values.astype(np.int32))
    assert as_int.mode == "I"
    out = decoded(encode(as_int, "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_tiff():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = decoded(encode(Image.fromarray(values), "TIFF"))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    # outside 0..1 there is no natural range: stretched min..max
    out = to_rgb(Image.fromarray(np.array([[-2.0, 0.0, 2.0]], dtype=np.float32)))
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_lab_converts_colorimetrically():
    black, white = Image.new("LAB", (4, 4), (0, 128, 128)), Image.new("LAB", (4, 4), (255, 128, 128))
    assert close(to_rgb(black).getpixel((0, 0)), (0, 0, 0), tol=3)
    assert close(to_rgb(white).getpixel((0, 0)), WHITE, tol=3)


def test_exif_orientation_six_rotates_clockwise():
    stored = Image.new("RGB", (48, 32), (0, 0, 255))
    stored.paste(RED, (0, 0, 8, 8))  # stored top-left corner is red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = decoded(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.size == (32, 48)
    assert close(out.getpixel((28, 3)), RED, tol=30)  # now top-right
    assert close(out.getpixel((3, 3)), (0, 0, 255), tol=30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"", "empty file"), (b"hello, this is text, not pixels\n" * 4, "not an image")],
)
def test_empty_and_non_images(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(data)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_raise(fmt):
    data = encode(noise(), fmt)
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(data[: len(data) // 2])
    assert info.value.reason == "truncated"


def test_png_missing_its_end_raises():
    data = encode(noise(), "PNG")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_rgb(data[:-12])


def test_bomb_refused_from_header_before_decoding():
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(png_header_only(100_000, 100_000))
    assert info.value.reason.startswith("decompression bomb: 100000 x 100000 = 10000000000 pixels > limit")
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(encode(Image.new("L", (32, 32)), "PNG"), max_pixels=1000)
    assert info.value.reason == "decompression bomb: 32 x 32 = 1024 pixels > limit 1000"


def test_own_limit_does_not_touch_pil_global():
    before = Image.MAX_IMAGE_PIXELS
    decode_rgb(encode(Image.new("L", (32, 32)), "PNG"), max_pixels=2000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_error_survives_pickling():
    error = pickle.loads(pickle.dumps(ImageDecodeError("truncated", detail="x")))
    assert error.reason == "truncated" and error.detail == "x"
