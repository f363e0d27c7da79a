"""Hugging Face datasets made with the `datasets` package: save_to_disk folders (Arrow) and Parquet exports, image
columns with bytes, with paths only (relative or absolute) and null images."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image as PILImage

from pipeline.config import ExtractConfig, load_config
from pipeline.extract import run_extract
from pipeline.extract.refresh import run_refresh
from pipeline.extract.sync import dry_run
from pipeline.sources import HuggingFaceSource, ImageRecord, ParquetBytesSource, make_source
from pipeline.sources.arrow_files import read_arrow, take_arrow_rows
from pipeline.stores import FeatureStore, layout
from pipeline.probes.splits import _encode
from pipeline.stores.label_types import class_name, class_names, stored_class_names, with_class_names

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1,layer2]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "store.shard_rows=32", "store.chunk_rows=16",
        "run.local_max_images=1000"]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _key(r: ImageRecord):
    return r.image_id, r.uri, r.fingerprint, tuple(sorted(r.labels.items())), r.split


def _consistent(source) -> list:
    units = list(source.list_units())
    assert sorted(_key(r) for u in units for r in source.expand(u)) == sorted(_key(r) for r in source.list_images())
    assert [u.unit_id for u in units] == sorted({u.unit_id for u in units})
    return units


def _stripped(records):
    return [ImageRecord(r.image_id, r.uri, r.fingerprint, r.labels, r.split) for r in records]


def embedded(n: int, seed: int = 0) -> datasets.Dataset:
    """Images as `datasets` holds them once saved: {bytes, path} structs; row 3 has no image."""
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    rows = [None if i == 3 else {"bytes": png(seed + i), "path": None} for i in range(n)]
    return datasets.Dataset.from_dict({"img": rows, "label": [i % 3 for i in range(n)]}, features=features)


def test_save_to_disk_arrow_files_are_units(tmp_path: Path):
    embedded(12).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    source = make_source("hf", str(tmp_path / "ds"))
    units = _consistent(source)
    assert [u.unit_id for u in units] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    # rows may name image files the Arrow file's metadata does not cover: re-checked image by image
    assert all(u.n_images is None and u.size_bytes and u.fingerprint == "" for u in units)
    records = source.list_images()
    # the image column is found from the features metadata; no path in any row: ids are <file>/<row>
    assert [r.image_id for r in records[:3]] == [f"data-00000-of-00002/{i}" for i in (0, 1, 2)]
    assert records[0].uri == f"file://{tmp_path}/ds/data-00000-of-00002.arrow#0"
    assert records[0].data == png(0) and records[0].labels == {"label": 0} and records[0].split is None
    assert records[3].data == b""  # the null image: decoding records "empty file"
    unlabelled = datasets.Dataset.from_dict({"img": [{"bytes": png(0), "path": None}] * 2, "label": [1, -1]},
                                            features=embedded(1).features)
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    assert [r.labels for r in make_source("hf", str(tmp_path / "unlabelled")).list_images()] == [
        {"label": 1}, {"label": None}]  # a ClassLabel's -1 is "no label"
    assert source.label_schema(units) == pa.schema([("label", pa.int64())])  # from the Arrow schema alone
    assert class_names(source.label_schema(units)) == {"label": ["a", "b", "c"]}  # the ClassLabel's names
    assert source.read_many(_stripped(records)) == [r.data for r in records]


def test_dataset_dict_splits_and_path_only_images(tmp_path: Path):
    """A DatasetDict whose image column holds paths only: relative to the dataset folder, and absolute."""
    (tmp_path / "dd" / "pics").mkdir(parents=True)
    for i in range(6):
        (tmp_path / "dd" / "pics" / f"{i}.png").write_bytes(png(100 + i))
    path_struct = datasets.Features({"image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                                     "label": datasets.Value("int64")})
    train = datasets.Dataset.from_dict(
        {"image": [{"bytes": None, "path": f"pics/{i}.png"} for i in range(4)], "label": [0, 1, 0, 1]},
        features=path_struct)
    test = datasets.Dataset.from_dict({"image": [str(tmp_path / "dd" / "pics" / f"{i}.png") for i in (4, 5)],
                                       "label": [1, 0]})  # a plain string column of absolute paths
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    source = HuggingFaceSource(str(tmp_path / "dd"))
    units = _consistent(source)
    assert [u.unit_id for u in units] == ["test/data-00000-of-00001.arrow", "train/data-00000-of-00001.arrow"]
    records = {r.image_id: r for r in source.list_images()}
    assert sorted(records) == [f"test/{tmp_path}/dd/pics/{i}.png" for i in (4, 5)] + [
        f"train/pics/{i}.png" for i in range(4)]
    first = records["train/pics/0.png"]
    assert first.uri == f"file://{tmp_path}/dd/pics/0.png" and first.split == "train" and first.data is None
    assert first.fingerprint.startswith("size:")  # from the file's metadata, fetched by the task
    assert records[f"test/{tmp_path}/dd/pics/5.png"].split == "test"
    assert source.read_many(list(records.values())) == [png(100 + i) for i in (4, 5, 0, 1, 2, 3)]
    (tmp_path / "dd" / "pics" / "2.png").unlink()
    gone = source.list_images()
    assert [r.fingerprint for r in gone if r.image_id == "train/pics/2.png"] == ["missing"]
    assert isinstance(source.read_many([records["train/pics/2.png"]])[0], FileNotFoundError)


def test_parquet_export_split_names_and_absolute_paths(tmp_path: Path):
    (tmp_path / "pics").mkdir()
    for i in range(5):
        (tmp_path / "pics" / f"{i}.png").write_bytes(png(200 + i))
    by_path = datasets.Dataset.from_dict({"image": [str(tmp_path / "pics" / f"{i}.png") for i in range(5)],
                                         "label": list(range(5))}).cast_column("image", datasets.Image())
    by_path.to_parquet(str(tmp_path / "export" / "data" / "train-00000-of-00001.parquet"))  # paths, no bytes
    embedded(7, seed=50).to_parquet(str(tmp_path / "export" / "data" / "test-00000-of-00001.parquet"),
                                    batch_size=3)  # row groups of 3
    source = HuggingFaceSource(str(tmp_path / "export"))
    units = _consistent(source)
    assert [u.unit_id for u in units] == ["data/test-00000-of-00001#rg=0", "data/test-00000-of-00001#rg=1",
                                          "data/test-00000-of-00001#rg=2", "data/train-00000-of-00001#rg=0"]
    assert [u.n_images for u in units] == [3, 3, 1, 5]
    assert source.label_schema(units) == pa.schema([("label", pa.int64())])
    with pytest.raises(ValueError, match=r"no label column 'kind'; columns are \['img', 'label'\]"):
        HuggingFaceSource(str(tmp_path / "export"), label_columns=["kind"]).label_schema(units)
    # row groups whose footer shows rows without bytes (the null image, the paths) have no fingerprint
    assert [bool(u.fingerprint) for u in units] == [True, False, True, False]
    records = source.list_images()
    splits = {r.image_id: r.split for r in records}
    assert splits["data/test-00000-of-00001/6"] == "test" and splits[str(tmp_path / "pics" / "0.png")] == "train"
    by_id = {r.image_id: r for r in records}
    assert by_id[str(tmp_path / "pics" / "4.png")].uri == f"file://{tmp_path}/pics/4.png"
    expected = {**{f"data/test-00000-of-00001/{i}": png(50 + i) if i != 3 else b"" for i in range(7)},
                **{str(tmp_path / "pics" / f"{i}.png"): png(200 + i) for i in range(5)}}
    assert source.read_many(_stripped(records)) == [expected[r.image_id] for r in records]
    # the `parquet` kind reads the same export, path-only rows included, without splits from names
    plain = ParquetBytesSource(str(tmp_path / "export"), image_column=None)  # each file its own Image column
    assert {r.image_id for r in plain.list_images()} == set(splits)
    assert {r.split for r in plain.list_images()} == {None}


def test_arrow_stream_and_file_formats(tmp_path: Path):
    table = pa.table({"image": [png(i) for i in range(10)], "n": list(range(10))})
    for name, open_writer in (("s.arrow", pa.ipc.new_stream), ("f.arrow", pa.ipc.new_file)):
        with pa.OSFile(str(tmp_path / name), "wb") as sink, open_writer(sink, table.schema) as writer:
            for start in range(0, 10, 4):
                writer.write_table(table.slice(start, 4))
        with open(tmp_path / name, "rb") as f:
            assert read_arrow(f).equals(table)
        with open(tmp_path / name, "rb") as f:
            taken, seen = take_arrow_rows(f, [5, 1, 12])
        assert taken.column("n").to_pylist() == [5, 1] and seen == 10


def test_extract_from_a_dataset_dict(tmp_path: Path):
    dd = datasets.DatasetDict({"train": embedded(10), "validation": embedded(4, seed=40)})
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'dd'}",
                                            f"store.root={tmp_path}/s", "run.max_error_fraction=0.5", *TINY])
    summary = run_extract(cfg)
    store = FeatureStore(summary.store_uri)
    index = store.index().set_index("image_id")
    assert summary.images == 14 and summary.errors == 2  # the null image of each split
    assert set(store.errors().to_pandas().image_id) == {"train/data-00000-of-00001/3",
                                                        "validation/data-00000-of-00001/3"}
    assert index.loc["validation/data-00000-of-00001/2", "split"] == "validation"
    assert index.loc["train/data-00000-of-00001/5", "label"] == 2
    assert store.class_names == {"label": ["a", "b", "c"]}
    assert store.index().attrs["class_names"] == store.class_names  # what the probes' messages name classes by


def test_class_label_names_are_kept_per_version_next_to_the_integers(tmp_path: Path, capsys):
    """The store keeps a ClassLabel's integers (its label type never changes) and each version records the names
    its source gave them: a rename alone publishes a version, the old one keeps the old names, and the report's
    map and `strata inspect` show them."""
    from pipeline.cli import main
    from pipeline.report.sections import map_figures

    renamed = datasets.ClassLabel(names=["chat noir", "Ünï β", "<b>x</b>"])
    embedded(9).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'ds'}",
                                            f"store.root={tmp_path}/s", "run.max_error_fraction=0.5", *TINY])
    uri = run_extract(cfg).store_uri
    embedded(9).cast_column("label", renamed).save_to_disk(str(tmp_path / "ds2"), num_shards=2)
    fs = fsspec.filesystem("file")
    fs.rm(str(tmp_path / "ds"), recursive=True)
    fs.mv(str(tmp_path / "ds2"), str(tmp_path / "ds"), recursive=True)
    planned = dry_run(cfg)  # the dry run says what the refresh will publish
    assert planned.renamed == ("label",) and not planned.nothing_changed
    assert "renamed by the source in label" in str(planned)
    summary = run_refresh(cfg)
    assert summary.version == 2 and summary.added == summary.changed == summary.relabeled == 0
    assert "to version 2: no image changed, the source renamed the classes of label" in str(summary)
    old, new = FeatureStore(uri, version=1), FeatureStore(uri)
    assert old.class_names == {"label": ["a", "b", "c"]}
    assert new.class_names == {"label": ["chat noir", "Ünï β", "<b>x</b>"]}
    assert new.index().label.dtype.kind == "i"  # still the integers
    assert new.to_xarray("layer1").label.attrs["class_names"] == new.class_names["label"]
    assert run_refresh(cfg).version == 2  # nothing changed: no version
    assert not dry_run(cfg).renamed
    (figure,) = map_figures(new, ["label"], {"label": "layer2"}, sample=20)
    shown = dict(zip(figure.data["ids"], figure.data["labels"]))
    assert shown["data-00000-of-00002/1"] == "Ünï β (1)" and shown["data-00000-of-00002/0"] == "chat noir (0)"
    assert main(["inspect", uri]) == 0
    assert re.search(r"classes of label +0='chat noir', 1='Ünï β', 2='<b>x</b>'\n", capsys.readouterr().out)
    # a Parquet export of the same dataset names its classes too
    embedded(5).to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"))
    exported = run_extract(load_config(ExtractConfig, None, [
        "source.kind=hf", f"source.uri={tmp_path / 'pq'}", f"store.root={tmp_path}/p",
        "run.max_error_fraction=0.5", *TINY]))
    assert FeatureStore(exported.store_uri).class_names == {"label": ["a", "b", "c"]}


@pytest.mark.s3
def test_save_to_disk_on_s3_with_relative_paths(s3_bucket, tmp_path: Path):
    (tmp_path / "ds" / "pics").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "ds" / "pics" / f"{i}.png").write_bytes(png(300 + i))
    datasets.Dataset.from_dict({"image": [f"pics/{i}.png" for i in range(3)]}).save_to_disk(str(tmp_path / "ds"))
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    fs.put(str(tmp_path / "ds"), s3_bucket.url("hf", "ds"), recursive=True)
    source = HuggingFaceSource(s3_bucket.url("hf", "ds"), image_column="image",
                               storage_options=s3_bucket.storage_options)
    _consistent(source)
    records = source.list_images()
    assert [r.uri for r in records] == [s3_bucket.url("hf", "ds", "pics", f"{i}.png") for i in range(3)]
    assert all(r.fingerprint.startswith("etag:") for r in records)
    assert source.read_many(records) == [png(300 + i) for i in range(3)]


def _two_arrow_files(folder: Path, ids: list[str], paths: list[str | None]) -> None:
    """12 embedded images in two Arrow files of 6 rows: `ids` as a column, `paths` in the image structs."""
    rows = [{"bytes": png(500 + i), "path": p} for i, p in enumerate(paths)]
    features = datasets.Features({"img": datasets.Image(), "uid": datasets.Value("string"),
                                  "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"img": rows, "uid": ids, "label": [i % 3 for i in range(12)]},
                               features=features).save_to_disk(str(folder), num_shards=2)


def test_ids_repeated_across_arrow_files_are_refused_by_the_driver_after_the_tasks(tmp_path: Path):
    """The driver never reads Arrow files, so their tasks send id hashes with the unit plans and the driver
    checks them across units, for an id column as for image paths; row ids are unique by construction."""
    from pipeline.extract.id_check import RepeatedImageIds, refuse_repeats_across_units
    from pipeline.extract.unit_stage import plan_item, unit_item
    from pipeline.stores import FeatureStoreWriter, StoreTarget
    from pipeline.stores.job import plan_job

    ids = [f"u{i}" for i in range(12)]
    ids[9] = "u2"  # in the other file
    _two_arrow_files(tmp_path / "ds", ids, [f"{i % 6}.png" for i in range(12)])  # paths repeat across the files
    for options, repeats in (({"id_column": "uid"}, True), ({}, True), ({"row_ids": True}, False)):
        source = HuggingFaceSource(str(tmp_path / "ds"), **options)
        writer = FeatureStoreWriter(StoreTarget(root=str(tmp_path / "s"), featureset=f"fs-{len(options)}-{repeats}",
                                                shard_rows=8))
        writer.prepare(n_rows=0, layer_dims={"l": 4}, provenance={"encoder": "toy"}, labels=pa.schema([]))
        work = plan_job(writer, list(source.list_units()), job_id="j").work
        plans = [plan_item(unit_item(w, "j"), source=source, target=writer.target)[0] for w in work]
        assert all(p.id_hashes is not None and len(p.id_hashes) == 6 for p in plans)
        if repeats:
            with pytest.raises(RepeatedImageIds, match=r"data-00000-of-00002.arrow', 'data-00001-of-00002.arrow'"):
                refuse_repeats_across_units(plans, writer, {})
        else:
            refuse_repeats_across_units(plans, writer, {})
            assert sorted(r.image_id for r in source.list_images())[:2] == ["data-00000-of-00002/0",
                                                                            "data-00000-of-00002/1"]
    with pytest.raises(ValueError, match="id_column .* and row_ids=true both choose the ids"):
        HuggingFaceSource(str(tmp_path / "ds"), id_column="uid", row_ids=True)


def test_image_paths_repeated_across_arrow_files_stop_the_extraction_before_anything_is_published(tmp_path: Path):
    """Paths unique within each file (ids from paths) but repeated across the two files: a store with two rows
    of one id would be committed without the check."""
    from pipeline.stores import NoCommittedVersionError

    _two_arrow_files(tmp_path / "ds", [str(i) for i in range(12)], [f"{i % 6}.png" for i in range(12)])
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'ds'}",
                                            f"store.root={tmp_path}/s", "store.featureset=fs", *TINY])
    with pytest.raises(ValueError, match=r"6 image id\(s\) repeat across source units .* e\.g\. \['0\.png', '1\.png', '2\.png'\].*row_ids=true"):
        run_extract(cfg)
    with pytest.raises(NoCommittedVersionError):
        FeatureStore(f"{tmp_path}/s/fs")
    # the job stopped when the second unit was planned: that unit encoded nothing
    fs = fsspec.filesystem("file")
    written = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{tmp_path}/s/fs/{layout.MANIFEST_DIR}/shards/*.json")]
    assert len({r["unit"] for r in written}) <= 1, written


def test_class_names_apply_to_integer_labels_only():
    names = ["cat", "dog"]
    assert [class_name(names, v) for v in (0, 1, 1.0, np.int64(1))] == ["cat", "dog", "dog", "dog"]
    assert [class_name(names, v) for v in (2, -1, 1.5, True, None, "1")] == [None] * 6
    assert class_name(None, 0) is None
    source = pa.schema([with_class_names(pa.field("kind", pa.int64()), names), pa.field("size", pa.int64()),
                        with_class_names(pa.field("gone", pa.int64()), ["x"]),
                        with_class_names(pa.field("text", pa.string()), ["y"])])
    # the store's own types decide: names of a column it holds as text, or does not hold, are not recorded
    stored = pa.schema([("kind", pa.int64()), ("size", pa.int64()), ("text", pa.string())])
    assert stored_class_names(source, stored) == {"kind": names}
    widened = pa.schema([("kind", pa.float64()), ("text", pa.string())])  # a store may widen int to float
    assert stored_class_names(source, widened) == {"kind": names}


def test_the_id_registry_finds_every_repeat_across_units_whatever_their_order():
    from pipeline.extract.id_check import IdRegistry

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, 5000, dtype=np.uint64)
    registry, seen, owner_of = IdRegistry(), set(), {}
    for k in range(60):
        hashes = rng.choice(pool, int(rng.integers(0, 150)), replace=False)
        units, shared = registry.add(f"u{k}", hashes)
        expected = set(hashes.tolist()) & seen
        assert set(shared.tolist()) == expected
        assert units == sorted({owner_of[h] for h in expected})
        if not expected:  # registered: its ids count from now on
            seen.update(hashes.tolist())
            owner_of.update((h, f"u{k}") for h in hashes.tolist())
    assert len(registry.runs) <= 2 * np.log2(len(seen)) + 1  # merged by size
    units, shared = registry.add(next(iter(owner_of.values())), pool)  # a unit's task run again is accepted
    assert units == [] and len(shared) == 0


def test_a_store_that_kept_a_class_labels_minus_one_relabels_it_missing(tmp_path: Path, monkeypatch):
    """Before -1 was read as "no label", stores kept it; units of files with a ClassLabel now record how they
    are read, so a refresh relabels those rows (no image encoded), fingerprinted row groups included."""
    from pipeline.sources import parquet_bytes

    data = datasets.Dataset.from_dict({"img": [{"bytes": png(i), "path": None} for i in range(6)],
                                       "label": [0, -1, 1, 2, -1, 0]}, features=embedded(1).features)
    data.to_parquet(str(tmp_path / "pq" / "train-00000-of-00001.parquet"), batch_size=3)
    cfg = load_config(ExtractConfig, None, ["source.kind=hf", f"source.uri={tmp_path / 'pq'}",
                                            f"store.root={tmp_path}/s", *TINY])
    with monkeypatch.context() as old_reader:  # what the previous release did: no ClassLabel reading at all
        old_reader.setattr(parquet_bytes, "class_label_names", lambda schema: {})
        uri = run_extract(cfg).store_uri
    assert sorted(FeatureStore(uri).index()["label"]) == [-1, -1, 0, 0, 1, 2]
    summary = run_refresh(cfg)
    assert (summary.added, summary.changed, summary.relabeled, summary.version) == (0, 0, 2, 2)
    store = FeatureStore(uri)
    assert store.index()["label"].isna().sum() == 2 and store.class_names == {"label": ["a", "b", "c"]}
    labels = store.index()["label"]  # integers still: class 1 is not read back as 1.0 because of a missing label
    assert str(labels.dtype) == "Int64" and sorted(labels.dropna().tolist()) == [0, 0, 1, 2]
    labelled = np.flatnonzero(labels.notna().to_numpy())
    _, classes = _encode(labels, labelled, "label")  # the probes' classes, which heads and results record
    assert classes == (0, 1, 2) and all(type(c) is int for c in classes)
    assert run_refresh(cfg).nothing_changed


def test_parquet_files_whose_class_label_names_differ_are_refused(tmp_path: Path):
    """One file re-exported with other class names would give the same integer two meanings in one store."""
    embedded(6).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    other = datasets.ClassLabel(names=["cat X", "dog Y", "bird Z"])
    embedded(4, seed=20).cast_column("label", other).to_parquet(
        str(tmp_path / "pq" / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"validation-00000-of-00001\.parquet: ClassLabel column 'label' names its "
                                         r"classes \['cat X', 'dog Y', 'bird Z'\], but .*train-00000-of-00001\.parquet "
                                         r"names them \['a', 'b', 'c'\].*label_columns"):
        list(HuggingFaceSource(str(tmp_path / "pq")).list_units())
    assert len(list(HuggingFaceSource(str(tmp_path / "pq"), label_columns=[]).list_units())) == 2
