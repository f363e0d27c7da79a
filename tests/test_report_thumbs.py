"""Thumbnails of images stored inside files (Hugging Face Parquet/Arrow rows, WebDataset tar members): read by
the store's own source, rebuilt from its version's config, within a byte budget."""
from __future__ import annotations

import base64
import io
import logging
import shutil
import tarfile
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from pipeline.config import ExtractConfig, load_config
from pipeline.extract import run_extract
from pipeline.report.thumbs import store_source, thumbnails
from pipeline.stores import FeatureStore

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "store.shard_rows=32", "store.chunk_rows=16",
        "run.local_max_images=1000"]
COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 240, 20), (20, 240, 240)]


def _image(k: int, fmt: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[k % len(COLOURS)]).save(buf, format=fmt)
    return buf.getvalue()


def _colour(data_uri: str) -> tuple[int, ...]:
    raw = base64.b64decode(data_uri.split(",", 1)[1])
    img = Image.open(io.BytesIO(raw))
    assert max(img.size) <= 64
    return tuple(int(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3).mean(0).round())


def _store(tmp_path: Path, kind: str, uri: Path) -> FeatureStore:
    cfg = load_config(ExtractConfig, None, [f"source.kind={kind}", f"source.uri={uri}",
                                            f"store.root={tmp_path}/s", *TINY])
    return FeatureStore(run_extract(cfg).store_uri)


def _assert_right_pictures(store: FeatureStore, thumbs: dict[str, str], expected: dict[str, int]) -> None:
    assert set(thumbs) <= set(store.index()["image_id"])
    for image_id, thumb in thumbs.items():
        assert np.abs(np.subtract(_colour(thumb), COLOURS[expected[image_id] % len(COLOURS)])).max() <= 12, image_id


def test_thumbnails_of_hugging_face_rows_and_the_byte_budget(tmp_path: Path, caplog):
    features = datasets.Features({"image": datasets.Image(),
                                  "kind": datasets.ClassLabel(names=["red", "green", "blue", "yellow", "cyan"])})
    rows = [{"bytes": _image(i, "JPEG" if i % 2 else "PNG", (40 + 7 * i, 30 + 5 * i)), "path": None}
            for i in range(10)]
    data = datasets.Dataset.from_dict({"image": rows, "kind": [i % 5 for i in range(10)]}, features=features)
    data.save_to_disk(str(tmp_path / "ds"), num_shards=3)
    store = _store(tmp_path, "hf", tmp_path / "ds")
    index = store.index()
    assert index["uri"].str.contains(".arrow#").all()  # rows of Arrow files, not files of their own
    ids, uris = index["image_id"].tolist(), index["uri"].tolist()
    expected = dict(zip(ids, index["kind"].tolist()))

    assert thumbnails(ids, uris, limit=100) == {}  # without the source, no URI of a row can be read
    source = store_source(store)
    assert source is not None and type(source).__name__ == "HuggingFaceSource"
    thumbs = thumbnails(ids, uris, limit=100, source=source)
    assert len(thumbs) == 10
    _assert_right_pictures(store, thumbs, expected)
    assert len(thumbnails(ids, uris, limit=4, source=source)) == 4

    sizes = sorted((tmp_path / "ds").glob("*.arrow"), key=lambda p: p.stat().st_size)
    budget = sizes[-1].stat().st_size  # room for the fullest file (4 rows) only, not for a second one
    with caplog.at_level(logging.INFO, logger="pipeline.report.thumbs"):
        partial = thumbnails(ids, uris, limit=100, source=source, budget=budget)
    assert len(partial) == 4 and len({u.split("#")[0] for i, u in zip(ids, uris) if i in partial}) == 1
    assert any("6 images could not be read for thumbnails" in r.getMessage() for r in caplog.records)

    stored = dict(zip(ids, index["fingerprint"]))
    assert len(thumbnails(ids, uris, limit=100, source=source, fingerprints=stored)) == 10
    other = datasets.Dataset.from_dict({"image": [{"bytes": _image(i + 1, "PNG", (33, 33)), "path": None}
                                                  for i in range(10)], "kind": [0] * 10}, features=features)
    shutil.rmtree(tmp_path / "ds")
    other.save_to_disk(str(tmp_path / "ds"), num_shards=3)  # the same files and rows, other pictures
    assert thumbnails(ids, uris, limit=100, source=store_source(store), fingerprints=stored) == {}


def test_thumbnails_of_tar_members(tmp_path: Path):
    (tmp_path / "wds").mkdir()
    for shard in range(2):
        with tarfile.open(tmp_path / "wds" / f"s-{shard}.tar", "w") as tar:
            for k in range(3):
                key = f"{shard}{k:03d}"
                for ext, raw in (("webp", _image(shard * 3 + k, "WEBP", (48, 36))), ("cls", str(k).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))
    store = _store(tmp_path, "webdataset", tmp_path / "wds")
    index = store.index()
    ids, uris = index["image_id"].tolist(), index["uri"].tolist()
    thumbs = thumbnails(ids, uris, limit=100, source=store_source(store),
                        fingerprints=dict(zip(ids, index["fingerprint"])))
    assert len(thumbs) == 6
    _assert_right_pictures(store, thumbs, {i: int(i.split("/")[1][0]) * 3 + int(i[-1]) for i in ids})


def test_a_file_changed_since_it_was_encoded_gets_no_thumbnail(tmp_path: Path):
    from pipeline import storage

    path = tmp_path / "a.png"
    path.write_bytes(_image(0, "PNG", (40, 30)))
    fs, p = storage.resolve(str(path))
    stored = {"a": storage.fingerprint_from_info(fs.info(p))}
    assert stored["a"].startswith("size:")
    assert len(thumbnails(["a"], [str(path)], limit=5, fingerprints=stored)) == 1
    path.write_bytes(_image(1, "PNG", (41, 30)))  # another picture at the same URI
    assert thumbnails(["a"], [str(path)], limit=5, fingerprints=stored) == {}
    assert len(thumbnails(["a"], [str(path)], limit=5)) == 1  # nothing to check against: shown
