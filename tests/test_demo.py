"""Demo datasets: layout, labels, determinism, label independence."""

from __future__ import annotations

import csv
import hashlib
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.sources import ImageFolderSource, ManifestSource
from pipeline.sources.demo import (
    COLORS,
    DEMO_DATASETS,
    SHAPES,
    TEXTURES,
    write_demo,
    write_digits,
    write_shapes,
)


def read_manifest(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), n=2000, size=64, seed=0)


def test_digits_folder_and_manifest(tmp_path: Path):
    root = write_digits(tmp_path / "digits", size=32)
    rows = read_manifest(root)
    assert len(rows) == 1797
    assert list(rows[0]) == ["uri", "image_id", "digit", "parity", "ge5"]
    for row in rows[:50]:
        digit = int(row["digit"])
        assert row["uri"] == row["image_id"] and row["uri"].startswith(f"{digit}/")
        assert row["parity"] == ("even" if digit % 2 == 0 else "odd")
        assert row["ge5"] == ("yes" if digit >= 5 else "no")
    image = Image.open(root / rows[0]["uri"])
    assert image.size == (32, 32)
    pixels = np.asarray(image)
    assert pixels.max() > 200 and pixels.min() < 60  # paper and ink, not a flat square
    folder = ImageFolderSource(str(root)).list_images()
    manifest = ManifestSource(str(root / "manifest.csv")).list_images()
    assert [r.image_id for r in folder] == [r.image_id for r in manifest]
    assert [r.labels["label"] for r in folder[:3]] == [str(m.labels["digit"]) for m in manifest[:3]]
    assert {"digit", "parity", "ge5"} == set(manifest[0].labels)


def test_shapes_layout(shapes: Path):
    rows = read_manifest(shapes)
    assert len(rows) == 2000
    assert list(rows[0]) == ["uri", "image_id", "shape", "color", "texture", "background", "size"]
    assert rows[7]["uri"] == "images/00007.png"
    image = Image.open(shapes / rows[7]["uri"])
    assert image.size == (64, 64) and image.mode == "RGB"
    records = ManifestSource(str(shapes / "manifest.csv")).list_images()
    assert len(records) == 2000
    assert set(records[0].labels) == {"shape", "color", "texture", "background", "size"}


def test_shapes_labels_are_independent(shapes: Path):
    rows = read_manifest(shapes)
    pairs = {(row["shape"], row["color"]) for row in rows}
    assert pairs == set(itertools.product(SHAPES, COLORS))
    assert {(row["shape"], row["texture"]) for row in rows} == set(itertools.product(SHAPES, TEXTURES))
    for name in ("shape", "color", "texture", "background", "size"):
        counts = np.unique([row[name] for row in rows], return_counts=True)[1]
        assert counts.min() > 0.7 * counts.mean()  # roughly uniform


def test_shapes_colour_is_visible(shapes: Path):
    row = next(r for r in read_manifest(shapes) if r["color"] == "red" and r["texture"] == "solid")
    pixels = np.asarray(Image.open(shapes / row["uri"])).reshape(-1, 3)
    assert (pixels == COLORS["red"]).all(axis=1).sum() > 50


def test_shapes_byte_identical_across_runs(tmp_path: Path):
    first = write_shapes(tmp_path / "a", n=200, seed=3)
    second = write_shapes(tmp_path / "b", n=200, seed=3)
    other = write_shapes(tmp_path / "c", n=200, seed=4)
    assert tree_hash(first) == tree_hash(second)
    assert tree_hash(first) != tree_hash(other)


def test_write_demo_dispatch(tmp_path: Path):
    assert set(DEMO_DATASETS) == {"digits", "shapes"}
    root = write_demo("shapes", tmp_path / "s", n=10, size=32)
    assert len(read_manifest(root)) == 10
    with pytest.raises(ValueError, match=r"valid: \['digits', 'shapes'\]"):
        write_demo("mnist", tmp_path / "m")
