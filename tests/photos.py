"""Real photos as JPEG files of a chosen size range, from the sample images scikit-image and scikit-learn ship.

Each is a random crop of a sample photo (astronaut, coffee, chelsea, rocket, Hubble deep field, retina,
immunohistochemistry, china, flower), resized so that both sides fall in `sides`, and JPEG-encoded: camera
content with real high frequencies, unlike synthetic images. Shared by tests and benchmarks/bench_decode.py.
"""
from __future__ import annotations

import io
import random
from functools import cache

import numpy as np
from PIL import Image

_SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


@cache
def _sources() -> tuple[np.ndarray, ...]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    return tuple(getattr(skimage.data, n)() for n in _SKIMAGE) + tuple(load_sample_images().images)


def photo_jpegs(n: int, *, seed: int = 0, sides: tuple[int, int] = (500, 800), quality: int = 90) -> list[bytes]:
    """`n` JPEG files (bytes), each side in [sides[0], sides[1]] px."""
    rng = random.Random(seed)
    sources = _sources()
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = rng.randint(int(h * 0.6), h), rng.randint(int(w * 0.6), w)
        top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
        image = Image.fromarray(src[top:top + ch, left:left + cw])
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        size = (rng.randint(*sides), rng.randint(*sides))
        buf = io.BytesIO()
        image.resize(size, Image.Resampling.LANCZOS).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
