"""Demo datasets generated locally and deterministically: sklearn digits and procedural shapes."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DEMO_DATASETS",
    "SHAPES",
    "SIZES",
    "TEXTURES",
    "write_demo",
    "write_digits",
    "write_shapes",
]

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
}
TEXTURES = ("solid", "stripes", "dots", "checker")
# Achromatic, so that a background never looks like one of the shape colours.
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (20, 20, 20)}
SIZES = {"small": 0.2, "large": 0.36}  # circumradius as a fraction of the image side


def write_digits(out_dir: str | Path, *, size: int = 64) -> Path:
    """sklearn's 1797 8x8 digits, bicubic-upsampled to ``size`` px grayscale PNGs (dark ink on white).

    Layout: ``out_dir/<digit>/<index:04d>.png`` (an image folder whose label is the
    digit) and ``out_dir/manifest.csv`` with ``uri,image_id,digit,parity,ge5``:
    ``uri`` and ``image_id`` are the relative path, ``parity`` is ``even``/``odd``
    and ``ge5`` is ``yes``/``no`` (digit >= 5). Returns ``out_dir``.
    """
    from sklearn.datasets import load_digits  # ships with sklearn, no download

    out = Path(out_dir)
    digits = load_digits()
    rows = []
    for index, (pixels, digit) in enumerate(zip(digits.images, digits.target)):
        ink = np.rint(255 - pixels * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(ink).resize((size, size), Image.Resampling.BICUBIC)
        relative = f"{int(digit)}/{index:04d}.png"
        _save_png(image, out / relative)
        parity = "even" if digit % 2 == 0 else "odd"
        rows.append((relative, relative, int(digit), parity, "yes" if digit >= 5 else "no"))
    _write_manifest(out / "manifest.csv", ("uri", "image_id", "digit", "parity", "ge5"), rows)
    logger.info("wrote %d digits to %s", len(rows), out)
    return out


def write_shapes(out_dir: str | Path, *, n: int = 2000, size: int = 64, seed: int = 0) -> Path:
    """``n`` rendered shapes with independent, uniformly drawn labels.

    Labels: ``shape`` (needs late, spatial features), ``color`` and ``texture``
    (early-layer features), ``background`` and ``size``. Position, rotation and
    texture phase are jittered so no label can be read off a fixed pixel.
    Layout: ``out_dir/images/<index:05d>.png`` and ``out_dir/manifest.csv`` with
    ``uri,image_id,shape,color,texture,background,size`` (uri and id are the
    relative path). The same seed gives byte-identical files. Returns ``out_dir``.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    names = (SHAPES, tuple(COLORS), TEXTURES, tuple(BACKGROUNDS), tuple(SIZES))
    picks = np.stack([rng.integers(len(choices), size=n) for choices in names], axis=1)
    grid = np.mgrid[0:size, 0:size]
    rows = []
    for index, pick in enumerate(picks):
        shape, color, texture, background, scale = (choices[i] for choices, i in zip(names, pick))
        image = _render_shape(
            rng, grid, shape=shape, color=COLORS[color], texture=texture,
            background=BACKGROUNDS[background], radius=SIZES[scale] * size,
        )
        relative = f"images/{index:05d}.png"
        _save_png(image, out / relative)
        rows.append((relative, relative, shape, color, texture, background, scale))
    header = ("uri", "image_id", "shape", "color", "texture", "background", "size")
    _write_manifest(out / "manifest.csv", header, rows)
    logger.info("wrote %d shapes to %s", n, out)
    return out


DEMO_DATASETS: dict[str, Callable[..., Path]] = {"digits": write_digits, "shapes": write_shapes}


def write_demo(name: str, out_dir: str | Path, **kwargs: object) -> Path:
    """Write the demo dataset ``name`` (a key of ``DEMO_DATASETS``) under ``out_dir``."""
    if name not in DEMO_DATASETS:
        raise ValueError(f"unknown demo dataset {name!r}; valid: {sorted(DEMO_DATASETS)}")
    return DEMO_DATASETS[name](out_dir, **kwargs)


def _render_shape(
    rng: np.random.Generator,
    grid: np.ndarray,
    *,
    shape: str,
    color: tuple[int, int, int],
    texture: str,
    background: tuple[int, int, int],
    radius: float,
) -> Image.Image:
    side = grid.shape[1]
    radius *= rng.uniform(0.9, 1.1)
    margin = radius + 1
    center = rng.uniform(margin, side - margin, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        cx, cy = center
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon(_outline(shape, center, radius, angle), fill=255)
    inside = np.asarray(mask) > 127
    pattern = _texture(texture, grid, period=max(4, side // 8), phase=rng.integers(0, side, size=2))
    pixels = np.empty((side, side, 3), dtype=np.uint8)
    pixels[:] = background
    pixels[inside] = color
    pixels[inside & pattern] = tuple(c // 2 for c in color)  # darker shade keeps the colour readable
    return Image.fromarray(pixels)


def _outline(shape: str, center: np.ndarray, radius: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of ``shape`` (circumradius ``radius``), rotated by ``angle``."""
    if shape == "square":
        local = [(math.cos(a), math.sin(a)) for a in np.arange(4) * math.pi / 2]
    elif shape == "triangle":
        local = [(math.cos(a), math.sin(a)) for a in np.arange(3) * 2 * math.pi / 3]
    elif shape == "star":
        local = [
            (r * math.cos(a), r * math.sin(a))
            for a, r in zip(np.arange(10) * math.pi / 5, [1.0, 0.45] * 5)
        ]
    elif shape == "cross":
        w = 0.33
        local = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                 (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {list(SHAPES)}")
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = center
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in local]


def _texture(texture: str, grid: np.ndarray, *, period: int, phase: Sequence[int]) -> np.ndarray:
    """Boolean mask of the texture's second tone; ``solid`` has none."""
    ys, xs = grid[0] + phase[0], grid[1] + phase[1]
    half = period // 2
    if texture == "solid":
        return np.zeros(ys.shape, dtype=bool)
    if texture == "stripes":
        return ((xs + ys) // half) % 2 == 1
    if texture == "checker":
        return (xs // half + ys // half) % 2 == 1
    if texture == "dots":
        dy, dx = ys % period - half, xs % period - half
        return dy * dy + dx * dx <= (period / 4) ** 2
    raise ValueError(f"unknown texture {texture!r}; valid: {list(TEXTURES)}")


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")  # no timestamps or text chunks, so the bytes are reproducible


def _write_manifest(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
