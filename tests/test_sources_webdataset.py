"""WebDataset tars: img2dataset's layout, brace patterns and globs, broken members as error rows, refresh by tar."""
from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from dataclasses import replace
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.config import ExtractConfig, load_config
from pipeline.extract import run_extract
from pipeline.extract.refresh import run_refresh
from pipeline.sources import ImageRecord, WebDatasetSource, make_source
from pipeline.sources.braces import expand_braces
from pipeline.sources.webdataset import TarMemberError
from pipeline.stores import FeatureStore

TINY = ["encoder.name=resnet18", "encoder.weights=random:0", "encoder.layers=[layer1,layer2]",
        "encoder.preprocessing={resize_size: 32, crop_size: 32, interpolation: bilinear, "
        "mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}", "store.shard_rows=32", "store.chunk_rows=16",
        "run.local_max_images=1000"]  # a few dozen images: encoded in the driver, no Ray


def image(seed: int, fmt: str = "jpeg", size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def sample(shard: int, k: int, *, seed: int | None = None, fmt: str = "jpg") -> tuple[str, dict[str, bytes]]:
    """One img2dataset sample: key <shard><index>, the image, its json metadata, caption and class."""
    key = f"{shard:05d}{k:04d}"
    meta = {"key": key, "caption": f"a photo {k}", "similarity": k / 10, "status": "success",
            "exif": {"Make": "x"}}
    return key, {fmt: image(seed if seed is not None else shard * 100 + k, {"jpg": "jpeg"}.get(fmt, fmt)),
                 "json": json.dumps(meta).encode(), "txt": f"a photo {k}".encode(), "cls": str(k % 3).encode()}


def write_tar(path: str, samples, *, cut: int | None = None, fs=None) -> bytes:
    """A tar as webdataset's TarWriter writes it (members of a key together, extensions sorted)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples:
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(files[ext])
                tar.addfile(info, io.BytesIO(files[ext]))
    raw = buf.getvalue()[:cut]
    with (fs or fsspec.filesystem("file")).open(path, "wb") as f:
        f.write(raw)
    return raw


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    root = tmp_path / "wds"
    root.mkdir()
    for s in range(3):
        write_tar(str(root / f"shard-{s:05d}.tar"), [sample(s, k, fmt="png" if k == 1 else "jpg") for k in range(8)])
    (root / "shard-00000.parquet").write_bytes(b"img2dataset writes these next to the tars")
    (root / "shard-00000_stats.json").write_text("{}")
    return root


def _key(r: ImageRecord):
    return r.image_id, r.uri, r.fingerprint, tuple(sorted(r.labels.items())), r.split


@pytest.mark.parametrize(("pattern", "expected"), [
    ("s-{00008..00011}.tar", ["s-00008.tar", "s-00009.tar", "s-00010.tar", "s-00011.tar"]),
    ("{a,b}/{0..4..2}", ["a/0", "a/2", "a/4", "b/0", "b/2", "b/4"]),
    ("x{3..1}{,.bak}", ["x3", "x3.bak", "x2", "x2.bak", "x1", "x1.bak"]),
    ("{train,{val,test}-{1..2}}", ["train", "val-1", "val-2", "test-1", "test-2"]),
    ("literal{x}and{}", ["literal{x}and{}"]),
])
def test_brace_expansion(pattern, expected):
    assert expand_braces(pattern) == expected


def test_img2dataset_layout(shards: Path):
    source = make_source("webdataset", f"{shards}/shard-{{00000..00002}}.tar",
                         json_fields=["caption", "similarity", "exif"], text_field="text")
    units = list(source.list_units())
    assert [u.unit_id for u in units] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert all(u.n_images is None and u.size_bytes == (shards / u.unit_id).stat().st_size and
               u.fingerprint.startswith("size:") for u in units)
    json.dumps([u.to_json() for u in units])  # units travel as JSON

    records = source.list_images()
    assert sorted(_key(r) for u in units for r in source.expand(u)) == sorted(_key(r) for r in records)
    assert len(records) == 24 and records[0].image_id == "shard-00000/000000000"
    r = {x.image_id: x for x in records}["shard-00001/000010001"]
    assert r.uri == f"file://{shards}/shard-00001.tar#000010001.png"
    assert r.labels == {"cls": 1, "caption": "a photo 1", "similarity": 0.1, "exif": '{"Make": "x"}',
                        "text": "a photo 1"}
    assert r.data == sample(1, 1, fmt="png")[1]["png"] and r.fingerprint.startswith("sha256:")

    # records that travelled as JSON (no bytes) are read back from their tars, one pass per tar
    stripped = [ImageRecord(x.image_id, x.uri, x.fingerprint, x.labels) for x in records[::-3]]
    assert source.read_many(stripped) == [x.data for x in records[::-3]]
    assert pickle.loads(pickle.dumps(source)) == source
    plain = WebDatasetSource(str(shards / "shard-00002.tar"), cls_field=None)
    assert [x.labels for x in plain.list_images()] == [{}] * 8


def test_label_schema_from_options(shards: Path, caplog):
    units = list(WebDatasetSource(str(shards)).list_units())
    typed = WebDatasetSource(str(shards), json_fields={"similarity": "int64", "caption": "string", "exif": "string"},
                             text_field="text")
    schema = typed.label_schema([replace(u, params={**u.params, "uri": "file:///nowhere.tar"}) for u in units])
    assert schema == pa.schema([("caption", pa.string()), ("cls", pa.int64()), ("exif", pa.string()),
                                ("similarity", pa.int64()), ("text", pa.string())])  # no tar was opened
    with caplog.at_level(logging.WARNING):
        values = [r.labels["similarity"] for r in typed.list_images()]
    assert values[:3] == [0, None, None] and "0.1 is not a int64" in caplog.text  # 0.0 fits, 0.1 does not
    untyped = WebDatasetSource(str(shards), json_fields=["similarity", "caption"], cls_field="label")
    assert untyped.label_schema(units) == pa.schema([("caption", pa.string()), ("label", pa.int64()),
                                                     ("similarity", pa.float64())])  # typed from the first tar
    with pytest.raises(ValueError, match=r"'similarity' has type 'float'; valid: \['string', 'int64'"):
        WebDatasetSource(str(shards), json_fields={"similarity": "float"})


def test_globs_folders_and_missing_shards(shards: Path, caplog):
    (shards / "more").mkdir()
    write_tar(str(shards / "more" / "extra.tar"), [sample(7, 0)])
    everything = WebDatasetSource(str(shards))
    assert [u.unit_id for u in everything.list_units()] == [
        "more/extra.tar", "shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert "more/extra/000070000" in {r.image_id for r in everything.list_images()}
    globbed = WebDatasetSource(f"file://{shards}/shard-*.tar")
    assert [u.unit_id for u in globbed.list_units()] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    both = WebDatasetSource(f"{shards}/{{shard-0000[12],more/*}}.tar")
    assert [u.unit_id for u in both.list_units()] == ["more/extra.tar", "shard-00001.tar", "shard-00002.tar"]
    with caplog.at_level(logging.WARNING):
        gappy = [u.unit_id for u in WebDatasetSource(f"{shards}/shard-{{00001..00004}}.tar").list_units()]
    assert gappy == ["shard-00001.tar", "shard-00002.tar"]
    assert "2 shard(s) named by the pattern do not exist" in caplog.text
    with pytest.raises(FileNotFoundError, match="no .tar shards found"):
        list(WebDatasetSource(f"{shards}/nope-{{0..3}}.tar").list_units())
    with pytest.raises(ValueError, match="not a .tar file"):
        list(WebDatasetSource(str(shards / "shard-00000.parquet")).list_units())
    with pytest.raises(ValueError, match="label names"):
        WebDatasetSource(str(shards), json_fields=["cls"])


def broken_tars(root: Path) -> None:
    """A corrupt image, a key without image, a tar cut inside a member and one cut inside a header, and a file
    that is not a tar at all."""
    good = [sample(0, k) for k in range(4)]
    corrupt = ("000000004", {"jpg": b"\xff\xd8 this is not a jpeg", "cls": b"1"})
    no_image = ("000000005", {"json": b'{"caption": "lost"}', "txt": b"lost", "cls": b"2"})
    write_tar(str(root / "a.tar"), [*good, corrupt, no_image])
    for name, shard, member, cut in (("b", 1, "000010002.jpg", "data"), ("c", 2, "000020003.cls", "header")):
        whole = write_tar(str(root / f"{name}.tar"), [sample(shard, k) for k in range(4)])
        at = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(whole))}[member]
        write_tar(str(root / f"{name}.tar"), [sample(shard, k) for k in range(4)],
                  cut=at.offset_data + 100 if cut == "data" else at.offset + 200)
    (root / "d.tar").write_bytes(b"not a tar" * 100)


def test_broken_members_become_error_records(tmp_path: Path):
    broken_tars(tmp_path)
    source = WebDatasetSource(str(tmp_path), json_fields=["caption"])
    records = {r.image_id: r for r in source.list_images()}
    assert sorted(records) == [*(f"a/00000000{k}" for k in range(6)), *(f"b/00001000{k}" for k in range(3)),
                               *(f"c/00002000{k}" for k in range(3)), "d/__broken_tar__"]
    assert records["a/000000004"].data == b"\xff\xd8 this is not a jpeg"  # decoding will record it
    lost = records["a/000000005"]
    assert lost.labels == {"cls": 2, "caption": "lost"} and lost.uri.endswith("a.tar#000000005")
    cut_inside, cut_after = records["b/000010002"], records["c/000020002"]  # c lost its next sample's header
    assert "inside member '000010002.jpg'" in cut_inside.fingerprint
    assert "after member '000020002.txt'" in cut_after.fingerprint
    assert records["b/000010001"].data == sample(1, 1)[1]["jpg"]  # what comes before the cut is intact

    wanted = [records[i] for i in ("a/000000005", "b/000010002", "c/000020002", "d/__broken_tar__", "b/000010000")]
    for batch in (wanted, [ImageRecord(r.image_id, r.uri, r.fingerprint, r.labels) for r in wanted]):
        out = source.read_many(batch)
        assert all(isinstance(e, TarMemberError) for e in out[:4]) and out[4] == sample(1, 0)[1]["jpg"]
        assert "no image member for key '000000005' (members: cls, json, txt)" in str(out[0])
        assert "no member can be read" in str(out[3])
    # a record listed before the tar was cut asks for a member that is no longer whole
    gone = ImageRecord("b/000010003", f"file://{tmp_path}/b.tar#000010003.jpg", "sha256:0")
    assert "the tar is cut or corrupt" in str(source.read_many([gone])[0])


def test_a_member_written_twice_keeps_its_first_copy_and_is_warned_about(tmp_path: Path, caplog):
    key, files = sample(0, 1)
    again = [(key, {"jpg": image(99)}), ("000000002", {"jpg": image(2), "cls": b"1"}), (key, {"cls": b"2"})]
    write_tar(str(tmp_path / "t.tar"), [(key, files), *again])
    with caplog.at_level(logging.WARNING, logger="pipeline.sources.webdataset"):
        records = {r.image_id: r for r in WebDatasetSource(str(tmp_path)).list_images()}
    assert sorted(records) == ["t/000000001", "t/000000002"]
    assert records["t/000000001"].data == files["jpg"] and records["t/000000001"].labels["cls"] == 1
    msgs = [r.getMessage() for r in caplog.records if "repeat the name" in r.getMessage()]
    assert len(msgs) == 1 and "t.tar: 2 member(s)" in msgs[0] and "'000000001.jpg'" in msgs[0], msgs


def test_extract_records_broken_members_as_errors(tmp_path: Path):
    (tmp_path / "wds").mkdir()
    broken_tars(tmp_path / "wds")
    cfg = load_config(ExtractConfig, None, ["source.kind=webdataset", f"source.uri={tmp_path / 'wds'}",
                                            "source.options={json_fields: [caption]}", f"store.root={tmp_path}/s",
                                            "run.max_error_fraction=0.5", *TINY])
    summary = run_extract(cfg)
    store = FeatureStore(summary.store_uri)
    errors = dict(zip(*[store.errors().to_pandas()[c] for c in ("image_id", "reason")]))
    assert summary.images == 13 and summary.errors == 5 and len(store.index()) == 8
    assert set(errors) == {"a/000000004", "a/000000005", "b/000010002", "c/000020002", "d/__broken_tar__"}
    assert "no image member" in errors["a/000000005"] and "cut or corrupt" in errors["b/000010002"]
    assert set(store.index().columns) >= {"cls", "caption"}


def _refresh_case(fs, root: str, store_root: str, storage_options=None):
    for s in range(3):
        write_tar(f"{root}/shard-{s:05d}.tar", [sample(s, k) for k in range(8)], fs=fs)
    cfg = load_config(ExtractConfig, None, ["source.kind=webdataset", f"source.uri={root}/shard-{{00000..00002}}.tar",
                                            f"store.root={store_root}", *TINY])
    if storage_options:
        cfg = replace(cfg, source=replace(cfg.source, storage_options=storage_options))
    first = run_refresh(cfg)
    assert first.added == 24 and first.version == 1
    source = make_source("webdataset", cfg.source.uri, storage_options=storage_options)
    units_before = {u.unit_id: u.fingerprint for u in source.list_units()}
    before = FeatureStore(first.store_uri)
    kept = ["shard-00000/000000003", "shard-00001/000010000", "shard-00002/000020007"]
    old = {i: before.get([i], "layer2")[0] for i in [*kept, "shard-00001/000010005"]}

    # shard 1 re-written: key 3 gone, key 5 with new pixels, a new key 8; the other keys byte for byte the same
    write_tar(f"{root}/shard-00001.tar", [sample(1, k, seed=999 if k == 5 else None) for k in (0, 1, 2, 4, 5, 6, 7, 8)],
              fs=fs)
    units_after = {u.unit_id: u.fingerprint for u in source.list_units()}
    assert [u for u in units_after if units_after[u] != units_before[u]] == ["shard-00001.tar"]
    second = run_refresh(cfg)
    assert (second.added, second.changed, second.deleted, second.unchanged) == (1, 1, 1, 22)
    assert second.extract.images == 2 and second.version == 2
    after = FeatureStore(first.store_uri)
    ids = set(after.index().image_id)
    assert len(ids) == 24 and "shard-00001/000010003" not in ids and "shard-00001/000010008" in ids
    for i in kept:
        np.testing.assert_array_equal(after.get([i], "layer2")[0], old[i])
    assert not np.allclose(after.get(["shard-00001/000010005"], "layer2")[0], old["shard-00001/000010005"])
    assert run_refresh(cfg).nothing_changed


def test_refresh_re_encodes_only_the_replaced_tar(tmp_path: Path):
    _refresh_case(fsspec.filesystem("file", auto_mkdir=True), str(tmp_path / "wds"), str(tmp_path / "stores"))


@pytest.mark.s3
def test_refresh_re_encodes_only_the_replaced_tar_on_s3(s3_bucket, s3_env, tmp_path: Path):
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    _refresh_case(fs, s3_bucket.url("wds"), str(tmp_path / "stores"), storage_options=s3_bucket.storage_options)
