"""Work units: every source's units expand to exactly its listing, pages are stable under edits elsewhere."""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from pipeline.sources import GlobSource, ImageFolderSource, ManifestSource, ParquetBytesSource
from pipeline.sources.demo import write_shapes
from pipeline.sources.units import paginate


def _key(r):
    return r.image_id, r.uri, r.fingerprint, tuple(sorted(r.labels.items())), r.split


def _same(source) -> list:
    units = list(source.list_units())
    expanded = sorted(_key(r) for u in units for r in source.expand(u))
    assert expanded == sorted(_key(r) for r in source.list_images())
    assert len({u.unit_id for u in units}) == len(units)
    assert all(u.n_images == len(source.expand(u)) for u in units)
    return units


@pytest.fixture
def shapes(tmp_path: Path) -> Path:
    write_shapes(tmp_path / "s", n=90, size=32, seed=2)
    sub = tmp_path / "s" / "images" / "more"
    sub.mkdir()
    for i in range(5):
        shutil.copy(tmp_path / "s" / "images" / f"0000{i}.png", sub / f"m{i}.png")
    return tmp_path / "s"


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr("pipeline.sources.units.PAGE_IMAGES", 8)


def test_folder_and_glob_units(shapes, small_pages):
    units = _same(ImageFolderSource(str(shapes / "images")))
    assert any(u.unit_id.startswith("more/") for u in units) and len(units) > 4
    _same(GlobSource(str(shapes / "images" / "**" / "*.png")))
    _same(GlobSource(f"file://{shapes}/images/000[1-3]*.png"))


@pytest.mark.parametrize("kind", ["csv", "csv-fp", "csv-gz", "csv-quoted", "parquet"])
def test_manifest_units(shapes, small_pages, kind, caplog):
    table = pa_csv.read_csv(shapes / "manifest.csv")
    if kind == "csv-fp":
        table = table.append_column("fp", pa.array([f"f{i}" for i in range(table.num_rows)]))
    if kind == "csv-quoted":  # a label with a line break inside quotes: lines are not rows
        table = table.set_column(2, "shape", pa.array([f"a\nb{i}" if i == 3 else v
                                                       for i, v in enumerate(table.column("shape").to_pylist())]))
    path = shapes / {"parquet": "m.parquet", "csv-gz": "m.csv.gz"}.get(kind, "m.csv")
    if kind == "parquet":
        pq.write_table(table, path, row_group_size=7)
    elif kind == "csv-gz":
        buf = pa.BufferOutputStream()
        pa_csv.write_csv(table, buf)
        path.write_bytes(gzip.compress(buf.getvalue().to_pybytes()))
    else:
        pa_csv.write_csv(table, path)
    source = ManifestSource(str(path), fingerprint_column="fp" if kind == "csv-fp" else None)
    units = _same(source)
    assert len(units) > 4
    assert all(bool(u.fingerprint) == (kind == "csv-fp") for u in units)  # without fingerprints: re-checked
    if kind in ("csv", "csv-fp"):
        assert all("offset" in u.params for u in units)
    if kind == "csv-quoted":
        assert "lines are not rows" in caplog.text and all("offset" not in u.params for u in units)


def test_manifest_duplicates_are_refused(tmp_path, shapes):
    lines = (shapes / "manifest.csv").read_text().splitlines()
    (shapes / "dup.csv").write_text("\n".join([*lines, lines[5]]) + "\n")
    dup = lines[5].split(",")[1]
    with pytest.raises(ValueError, match=rf"1 image id\(s\) listed more than once, e.g. \['{dup}'\]; ids must be "
                                         rf"unique: name a unique column in source.options.id_column"):
        list(ManifestSource(str(shapes / "dup.csv")).list_units())


def test_parquet_row_groups_are_units(tmp_path, shapes):
    it = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    paths = sorted((shapes / "images").glob("*.png"))
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in paths[:30]]
    pq.write_table(pa.table({"image": pa.array(rows, type=it), "k": list(range(30))}), tmp_path / "a.parquet",
                   row_group_size=8)
    units = _same(ParquetBytesSource(str(tmp_path / "a.parquet")))
    assert [u.n_images for u in units] == [8, 8, 8, 6] and [u.unit_id for u in units][-1] == "a#rg=3"


def test_pages_change_only_where_images_changed():
    ids = [f"img-{i:05d}" for i in range(3000)]
    pages = {p.key: p.content.hexdigest() for p in paginate(((i, i, None) for i in ids), 64)}
    edited = ids[:1000] + ["img-01000x"] + ids[1000:2000] + ids[2001:]  # one added, one removed
    after = {p.key: p.content.hexdigest() for p in paginate(((i, i, None) for i in edited), 64)}
    changed = {k for k in pages.keys() | after.keys() if pages.get(k) != after.get(k)}
    assert 1 <= len(changed) <= 4 and len(pages) > 20
