"""Sources: stable sorted ids, labels, fingerprints, and clear refusals, on local files and memory://."""

from __future__ import annotations

import io
import os
import pickle
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.images import decode_rgb
from pipeline.sources import (
    SOURCE_KINDS,
    GlobSource,
    ImageFolderSource,
    ImageRecord,
    ManifestSource,
    ParquetBytesSource,
    make_source,
)
from pipeline.sources.base import fingerprint_from_info


def png(value: int = 0, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buffer, "PNG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    write(root / "cat" / "b.png", png(1))
    write(root / "cat" / "a.jpg", png(2))  # extension says jpg, kept in the id
    write(root / "dog" / "deep" / "c.PNG", png(3))
    write(root / "loose.png", png(4))
    write(root / "notes.txt", b"not an image")
    write(root / ".hidden" / "x.png", png(5))
    return root


@pytest.fixture
def memory_root():
    root = f"memory://strata-test-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_folder_ids_labels_and_order(folder: Path):
    records = ImageFolderSource(str(folder)).list_images()
    assert [r.image_id for r in records] == ["cat/a.jpg", "cat/b.png", "dog/deep/c.PNG", "loose.png"]
    assert [r.labels for r in records] == [{"label": "cat"}, {"label": "cat"}, {"label": "dog"}, {}]
    assert records[0].uri == f"file://{folder}/cat/a.jpg"
    assert records[0].fingerprint.startswith("size:")
    assert ImageFolderSource(f"file://{folder}/").list_images() == records  # same ids through a URI


def test_folder_options(folder: Path):
    source = ImageFolderSource(str(folder), extensions=("png",), label_name="animal")
    records = source.list_images()
    assert [r.image_id for r in records] == ["cat/b.png", "dog/deep/c.PNG", "loose.png"]
    assert records[0].labels == {"animal": "cat"}
    assert source.read_bytes(records[0]) == png(1)


def test_folder_missing_root(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderSource(str(tmp_path / "nope")).list_images()


def test_folder_on_memory_filesystem(memory_root: str):
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_root}/b/2.png", png(2))
    fs.pipe(f"{memory_root}/a/1.png", png(1))
    source = ImageFolderSource(memory_root)
    records = source.list_images()
    assert [(r.image_id, r.labels["label"]) for r in records] == [("a/1.png", "a"), ("b/2.png", "b")]
    assert records[0].fingerprint.startswith("sha256:")  # memory:// has no mtime
    assert decode_rgb(source.read_bytes(records[1])).getpixel((0, 0)) == (2, 2, 2)


def test_local_fingerprint_changes_with_content(folder: Path):
    source = ImageFolderSource(str(folder))
    before = {r.image_id: r.fingerprint for r in source.list_images()}
    assert before == {r.image_id: r.fingerprint for r in source.list_images()}
    write(folder / "cat" / "b.png", png(1, size=40))  # new size
    target = write(folder / "loose.png", png(200))  # same size, later mtime
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = {r.image_id: r.fingerprint for r in source.list_images()}
    changed = {image_id for image_id in before if before[image_id] != after[image_id]}
    assert changed == {"cat/b.png", "loose.png"}


def test_memory_fingerprint_is_content_hash(memory_root: str):
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_root}/x.png", png(1))
    first = GlobSource(f"{memory_root}/*.png").list_images()[0].fingerprint
    fs.pipe(f"{memory_root}/x.png", png(2))
    assert GlobSource(f"{memory_root}/*.png").list_images()[0].fingerprint != first


def test_fingerprint_prefers_etag():
    assert fingerprint_from_info({"ETag": '"abc"', "size": 3, "mtime": 1.0}) == "etag:abc"
    assert fingerprint_from_info({"size": 3, "mtime": 1.5}) == "size:3-mtime:1500000000"
    assert fingerprint_from_info({"size": 3}) is None


def test_glob_ids_relative_to_prefix(folder: Path, memory_root: str):
    records = GlobSource(f"{folder}/**/*.png").list_images()
    assert [r.image_id for r in records] == ["cat/b.png", "loose.png"]  # fnmatch is case-sensitive
    assert all(r.labels == {} for r in records)
    fs = fsspec.filesystem("memory")
    for name in ("2024/01/a.jpg", "2024/02/b.jpg", "2024/02/c.png"):
        fs.pipe(f"{memory_root}/shots/{name}", png(1))
    records = GlobSource(f"{memory_root}/shots/2024/*/*.jpg").list_images()
    assert [r.image_id for r in records] == ["01/a.jpg", "02/b.jpg"]


def test_manifest_relative_uris_labels_and_split(folder: Path):
    manifest = folder.parent / "lists" / "manifest.csv"
    write(
        manifest,
        b"uri,image_id,kind,score,split\n"
        b"../imgs/cat/b.png,0007,cat,0.5,train\n"
        b"../imgs/loose.png,0002,,1.5,val\n",
    )
    source = ManifestSource(str(manifest))
    records = source.list_images()
    assert [r.image_id for r in records] == ["0002", "0007"]  # image_id column found, zeros kept
    assert records[1].labels == {"kind": "cat", "score": 0.5}
    assert [r.split for r in records] == ["val", "train"]
    assert records[1].uri == f"file://{folder}/cat/b.png"
    assert source.read_bytes(records[1]) == png(1)
    assert records[1].fingerprint == ImageFolderSource(str(folder)).list_images()[1].fingerprint


def test_manifest_ids_from_uris_and_explicit_columns(folder: Path):
    lines = ["uri,kind,other", "cat/b.png,cat,1", f"{folder}/loose.png,none,2"]
    lines.append("file:///elsewhere/z.png,none,3")
    manifest = write(folder / "m.csv", "\n".join(lines).encode())
    records = ManifestSource(str(manifest), label_columns=["kind"]).list_images()
    by_uri = {r.uri: r for r in records}
    assert by_uri[f"file://{folder}/cat/b.png"].image_id == "cat/b.png"
    assert by_uri[f"file://{folder}/loose.png"].image_id == "loose.png"
    assert by_uri["file:///elsewhere/z.png"].image_id == "file:///elsewhere/z.png"
    assert by_uri["file:///elsewhere/z.png"].fingerprint == "missing"
    assert all(set(r.labels) == {"kind"} for r in records)


def test_manifest_parquet_on_memory_with_base_uri(memory_root: str):
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{memory_root}/data/a.png", png(1))
    fs.pipe(f"{memory_root}/data/b.png", png(2))
    table = pa.table({"path": ["b.png", "a.png"], "y": [1, 0]})
    with fs.open(f"{memory_root}/meta/list.parquet", "wb") as f:
        pq.write_table(table, f)
    source = ManifestSource(
        f"{memory_root}/meta/list.parquet", uri_column="path", base_uri=f"{memory_root}/data"
    )
    records = source.list_images()
    assert [(r.image_id, r.labels) for r in records] == [("a.png", {"y": 0}), ("b.png", {"y": 1})]
    assert source.read_bytes(records[1]) == png(2)


def test_manifest_missing_column_lists_columns(tmp_path: Path):
    manifest = write(tmp_path / "m.csv", b"path,label\na.png,1\n")
    with pytest.raises(ValueError, match=r"no uri column 'uri'; columns are \['path', 'label'\]"):
        ManifestSource(str(manifest)).list_images()
    with pytest.raises(ValueError, match="no label column 'nope'"):
        ManifestSource(str(manifest), uri_column="path", label_columns=["nope"]).list_images()


def test_duplicate_ids_refused(tmp_path: Path):
    manifest = write(tmp_path / "m.csv", b"uri,image_id\na.png,x\nb.png,x\nc.png,y\n")
    with pytest.raises(ValueError, match=r"1 duplicate image ids: 'x' x2"):
        ManifestSource(str(manifest)).list_images()


def hf_parquet(path: str, rows: list[tuple[bytes | None, str | None, int]]) -> None:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([None if b is None else {"bytes": b, "path": p} for b, p, _ in rows], type=image_type)
    table = pa.table({"image": images, "label": [label for _, _, label in rows]})
    with fsspec.open(path, "wb") as f:
        pq.write_table(table, f)


def test_parquet_bytes_hf_layout(tmp_path: Path):
    hf_parquet(str(tmp_path / "train-0.parquet"), [(png(1), "b.png", 1), (png(2), "a.png", 0)])
    source = ParquetBytesSource(str(tmp_path / "train-0.parquet"))
    records = source.list_images()
    assert [(r.image_id, r.labels) for r in records] == [("a.png", {"label": 0}), ("b.png", {"label": 1})]
    assert records[0].uri == f"file://{tmp_path}/train-0.parquet#1"
    assert records[0].fingerprint.startswith("sha256:")
    assert source.read_bytes(records[0]) == png(2)
    assert "data" not in repr(records[0])
    stripped = ImageRecord(records[0].image_id, records[0].uri, records[0].fingerprint)
    assert source.read_bytes(stripped) == png(2)  # re-read from the file when bytes were dropped


def test_parquet_bytes_glob_fallback_ids_and_plain_binary(memory_root: str):
    hf_parquet(f"{memory_root}/d/a.parquet", [(png(1), None, 1), (png(2), None, 0)])
    fs = fsspec.filesystem("memory")
    with fs.open(f"{memory_root}/d/b.parquet", "wb") as f:
        pq.write_table(pa.table({"img": [png(3)], "name": ["z"], "label": [2]}), f)
    records = ParquetBytesSource(f"{memory_root}/d/a.parquet").list_images()
    assert [r.image_id for r in records] == ["a/0", "a/1"]
    plain = ParquetBytesSource(f"{memory_root}/d/b*.parquet", image_column="img", id_column="name")
    assert [(r.image_id, r.labels) for r in plain.list_images()] == [("z", {"label": 2})]
    both = ParquetBytesSource(f"{memory_root}/d", image_column="image", label_columns=["label"])
    with pytest.raises(ValueError, match=r"no image column 'image'; columns are \['img', 'name', 'label'\]"):
        both.list_images()


def test_parquet_bytes_read_many_across_row_groups_and_files(tmp_path: Path):
    # 10 rows in row groups of 3, plus a second file; records without their inline bytes (as decode
    # workers get them), asked for out of order, mixed with a row past the end and a missing file
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": png(v), "path": f"{v}.png"} for v in range(10)], type=image_type)
    pq.write_table(pa.table({"image": images}), str(tmp_path / "a.parquet"), row_group_size=3)
    hf_parquet(str(tmp_path / "b.parquet"), [(png(50), "50.png", 0)])
    assert pq.ParquetFile(str(tmp_path / "a.parquet")).num_row_groups == 4
    source = ParquetBytesSource(str(tmp_path / "*.parquet"))
    listed = {r.image_id: r for r in source.list_images()}
    stripped = lambda r: ImageRecord(r.image_id, r.uri, r.fingerprint)  # noqa: E731
    wanted = [listed[f"{v}.png"] for v in (9, 0, 50, 4, 3, 5, 8)]
    a_uri = listed["0.png"].uri.rpartition("#")[0]
    past_end = ImageRecord("x", f"{a_uri}#10", "sha256:0")
    missing = ImageRecord("y", f"file://{tmp_path}/nope.parquet#0", "sha256:0")
    out = source.read_many([stripped(r) for r in wanted] + [past_end, missing, wanted[1]])
    assert out[:7] == [png(v) for v in (9, 0, 50, 4, 3, 5, 8)]
    assert isinstance(out[7], IndexError) and "has 10 rows, no row 10" in str(out[7])
    assert isinstance(out[8], FileNotFoundError)
    assert out[9] == wanted[1].data  # inline bytes are used as they are
    with pytest.raises(FileNotFoundError):
        source.read_bytes(missing)


def test_folder_read_many_reports_a_missing_file_in_place(folder: Path):
    source = ImageFolderSource(str(folder))
    records = source.list_images()
    gone = ImageRecord("gone", records[0].uri + ".missing", "sha256:0")
    out = source.read_many([records[0], gone, records[1]])
    assert out[0] == source.read_bytes(records[0]) and out[2] == source.read_bytes(records[1])
    assert isinstance(out[1], FileNotFoundError)


def test_parquet_bytes_duplicate_paths_and_null_images(tmp_path: Path):
    hf_parquet(str(tmp_path / "x.parquet"), [(png(1), "same.png", 0), (png(2), "same.png", 1)])
    # repeated paths are no ids (tests/test_sources_parquet_ids.py): the rows are numbered instead
    assert [r.image_id for r in ParquetBytesSource(str(tmp_path / "x.parquet")).list_images()] == ["x/0", "x/1"]
    hf_parquet(str(tmp_path / "y.parquet"), [(None, None, 0)])
    (record,) = ParquetBytesSource(str(tmp_path / "y.parquet")).list_images()
    assert record.data == b"" and record.image_id == "y/0"


def test_records_are_frozen_hashable_and_sources_pickle(folder: Path):
    labels = {"label": "cat"}
    record = ImageRecord("a", "file:///a", "sha256:0", labels=labels)
    labels["label"] = "dog"
    assert record.labels == {"label": "cat"}
    assert len({record, ImageRecord("a", "file:///a", "sha256:0", labels={"label": "cat"})}) == 1
    with pytest.raises(AttributeError):
        record.image_id = "b"  # type: ignore[misc]
    source = ImageFolderSource(str(folder), storage_options={"secret": "s3cr3t"})
    assert "s3cr3t" not in repr(source)
    assert pickle.loads(pickle.dumps(source)).list_images() == source.list_images()


def test_source_kinds(folder: Path):
    assert set(SOURCE_KINDS) == {"folder", "manifest", "glob", "parquet", "hf", "webdataset"}
    assert make_source("folder", str(folder)).list_images()[0].image_id == "cat/a.jpg"
    with pytest.raises(ValueError, match=r"valid: \['folder', 'glob', 'hf', 'manifest', 'parquet', 'webdataset'\]"):
        make_source("ftp", "x")


@pytest.mark.s3
def test_sources_on_s3_take_the_endpoint_from_strata_s3_endpoint_url(s3_env, s3_bucket, folder: Path, monkeypatch):
    """The store and the sources open S3 the same way: STRATA_S3_ENDPOINT_URL alone points both at it."""
    fs = fsspec.filesystem("s3", **s3_bucket.storage_options)
    for p in folder.rglob("*.jpg"):
        fs.put_file(str(p), f"{s3_bucket.name}/imgs/{p.relative_to(folder).as_posix()}")
    monkeypatch.setenv("STRATA_S3_ENDPOINT_URL", os.environ["AWS_ENDPOINT_URL"])
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    records = make_source("folder", s3_bucket.url("imgs")).list_images()
    assert sorted(r.image_id for r in records) == sorted(p.relative_to(folder).as_posix()
                                                         for p in folder.rglob("*.jpg"))
