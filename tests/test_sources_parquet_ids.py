"""Ids of Parquet and Hugging Face rows are unique: repeated image paths (a basename per class folder, as
exports often hold) fall back to <file>/<row> ids, and a repeated id column is refused before any work."""
from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ExtractConfig, load_config
from pipeline.extract import run_extract
from pipeline.sources import HuggingFaceSource, ParquetBytesSource
from pipeline.stores import FeatureStore
from test_sources_huggingface import TINY, png


def _write(path: Path, names: list[str], seed: int, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {"image": [{"bytes": png(seed + i), "path": n} for i, n in enumerate(names)], **columns}
    pq.write_table(pa.table(rows), path, row_group_size=4)


def _ids(source) -> list[str]:
    return [r.image_id for u in source.list_units() for r in source.expand(u)]


def test_paths_repeated_in_a_file_give_row_ids_and_a_warning(tmp_path: Path, caplog):
    # one basename per class, as an image folder pushed to the Hub holds them
    _write(tmp_path / "d" / "a.parquet", ["0.jpg", "1.jpg", "0.jpg", "1.jpg", "2.jpg"], 0,
           label=["cat", "cat", "dog", "dog", "dog"])
    with caplog.at_level(logging.WARNING):
        ids = _ids(ParquetBytesSource(str(tmp_path / "d")))
    assert sorted(ids) == [f"a/{i}" for i in range(5)]
    assert "a.parquet: image paths repeat (e.g. '0.jpg')" in caplog.text


def test_paths_repeated_across_files_give_those_files_row_ids(tmp_path: Path, caplog):
    _write(tmp_path / "d" / "train.parquet", ["0.jpg", "1.jpg", "2.jpg"], 0)
    _write(tmp_path / "d" / "test.parquet", ["2.jpg", "3.jpg"], 10)  # 2.jpg is in train too
    _write(tmp_path / "d" / "extra.parquet", ["x.jpg", "y.jpg"], 20)  # no clash: keeps its paths
    with caplog.at_level(logging.WARNING):
        ids = _ids(ParquetBytesSource(str(tmp_path / "d")))
    assert sorted(ids) == ["test/0", "test/1", "train/0", "train/1", "train/2", "x.jpg", "y.jpg"]
    assert "train.parquet: image paths repeat" in caplog.text and "test.parquet: image paths repeat" in caplog.text


def test_a_repeated_id_column_is_refused_while_listing(tmp_path: Path):
    _write(tmp_path / "d" / "a.parquet", ["0.jpg", "1.jpg"], 0, key=["k0", "k1"])
    _write(tmp_path / "d" / "b.parquet", ["2.jpg", "3.jpg"], 10, key=["k2", "k1"])
    source = ParquetBytesSource(str(tmp_path / "d"), id_column="key")
    with pytest.raises(ValueError, match=r"image ids repeat in the id column .*b\.parquet.*\['k1'\].*id_column"):
        list(source.list_units())
    _write(tmp_path / "d" / "b.parquet", ["2.jpg", "3.jpg"], 10, key=["k2", None])
    with pytest.raises(ValueError, match=r"b\.parquet: 1 row\(s\) have no 'key'"):
        list(source.list_units())
    _write(tmp_path / "d" / "b.parquet", ["2.jpg", "3.jpg"], 10, key=["k2", "k3"])
    assert sorted(_ids(source)) == ["k0", "k1", "k2", "k3"]
    with pytest.raises(ValueError, match=r"a\.parquet: no id column 'nope'; columns are \['image', 'key'\]"):
        list(ParquetBytesSource(str(tmp_path / "d"), id_column="nope").list_units())


def test_arrow_files_with_repeated_paths_or_ids(tmp_path: Path):
    rows = {"image": [{"bytes": png(i), "path": "image.png"} for i in range(4)], "key": ["a", "b", "a", "c"]}
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    assert sorted(_ids(HuggingFaceSource(str(tmp_path / "ds")))) == [f"data-00000-of-00001/{i}" for i in range(4)]
    keyed = HuggingFaceSource(str(tmp_path / "ds"), id_column="key")
    (unit,) = keyed.list_units()  # the driver never reads an Arrow file: its task refuses the repeat
    with pytest.raises(ValueError, match=r"data-00000-of-00001\.arrow: 1 image id\(s\) repeat, e.g. \['a'\]"):
        keyed.expand(unit)


def test_an_export_of_class_folders_extracts_every_image_once(tmp_path: Path):
    names = [f"{i % 4}.png" for i in range(12)]  # 0.png..3.png in each of three classes
    _write(tmp_path / "export" / "train-00000-of-00001.parquet", names, 0, label=[i // 4 for i in range(12)])
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'export'}",
                                            f"store.root={tmp_path}/s", *TINY])
    summary = run_extract(cfg)
    index = FeatureStore(summary.store_uri).index()
    assert summary.images == 12 and index.image_id.is_unique and len(index) == 12
    assert sorted(index.label) == [i // 4 for i in range(12)]


def test_a_file_added_later_that_repeats_stored_paths_gives_both_files_row_ids(tmp_path: Path, caplog):
    """The store holds what a fresh extract would: the stored file's rows take row ids in the refresh that
    adds the clashing file (their vectors copied, not encoded again), not only once that file changes."""
    from pipeline.extract.refresh import run_refresh

    _write(tmp_path / "d" / "train.parquet", ["0.jpg", "1.jpg", "2.jpg"], 0)
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'd'}",
                                            f"store.root={tmp_path}/s", *TINY])
    store = FeatureStore(run_extract(cfg).store_uri)
    assert sorted(store.index().image_id) == ["0.jpg", "1.jpg", "2.jpg"]
    _write(tmp_path / "d" / "test.parquet", ["2.jpg", "3.jpg"], 10)  # 2.jpg is in train too
    with caplog.at_level(logging.WARNING):
        summary = run_refresh(cfg)
    assert "train.parquet: image paths repeat" in caplog.text
    assert (summary.added, summary.deleted, summary.copied, summary.extract.encoded) == (5, 3, 3, 2)
    assert sorted(FeatureStore(store.uri).index().image_id) == ["test/0", "test/1", "train/0", "train/1", "train/2"]
    assert run_refresh(cfg).nothing_changed
