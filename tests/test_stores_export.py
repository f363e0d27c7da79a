"""`strata export`: the embedding-reader layout read back with embedding-reader itself, and FAISS index files
that faiss.read_index opens, with ids that map back to image ids; both against FeatureStore.layer."""
from __future__ import annotations

import json
import os

import fsspec
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.stores import FeatureStore
from pipeline.stores.export import export_faiss
from toystore import write_toy_store

faiss = pytest.importorskip("faiss", reason="faiss-cpu is in the ann and test extras")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    return write_toy_store(tmp_path_factory.mktemp("toy"))


def _by_id(store: FeatureStore, layer: str) -> dict[str, np.ndarray]:
    return dict(zip(store.index_table().column("image_id").to_pylist(), store.layer(layer)))


def test_embedding_reader_reads_the_export(store, tmp_path, monkeypatch):
    from embedding_reader import EmbeddingReader

    out = tmp_path / "er"
    monkeypatch.chdir(os.path.dirname(store.uri))  # the store named relative to here: recorded absolute
    assert main(["export", "--store", os.path.basename(store.uri), "--layer", "a", "--format", "embedding-reader",
                 "--out", str(out)]) == 0
    reader = EmbeddingReader(embeddings_folder=str(out / "embeddings"), metadata_folder=str(out / "metadata"),
                             meta_columns=["image_id", "shape"], file_format="parquet_npy")
    assert (reader.count, reader.dimension) == (len(store), 6)
    embeddings, meta = [], []
    for emb, m in reader(batch_size=40, start=0, end=reader.count, show_progress=False):
        embeddings.append(emb)
        meta.append(m)
    emb, meta = np.concatenate(embeddings), pd.concat(meta)
    expected = _by_id(store, "a")
    assert sorted(meta["image_id"]) == sorted(expected)
    np.testing.assert_array_equal(emb, np.stack([expected[i] for i in meta["image_id"]]))
    shapes = dict(zip(store.index_table().column("image_id").to_pylist(), store.labels("shape")))
    assert [s if s == s else None for s in meta["shape"]] == [shapes[i] for i in meta["image_id"]]
    info = json.loads((out / "export.json").read_text())
    assert (info["format"], info["layer"], info["rows"], info["version"]) == ("embedding-reader", "a", len(store), 1)
    assert info["store"] == os.path.abspath(store.uri)


def _ids(path) -> dict[int, str]:
    t = pd.read_parquet(path)
    return dict(zip(t["id"], t["image_id"]))


def test_faiss_cosine_index_finds_each_row_itself(store, tmp_path):
    out = tmp_path / "faiss"
    assert main(["export", "--store", store.uri, "--layer", "a", "--format", "faiss", "--out", str(out)]) == 0
    index = faiss.read_index(str(out / "index.faiss"))
    ids = _ids(out / "ids.parquet")
    assert index.ntotal == len(store) == len(ids)
    image_ids = store.index_table().column("image_id").to_pylist()
    x = store.layer("a")
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores, found = index.search(np.ascontiguousarray(unit, np.float32), 3)
    assert [ids[i] for i in found[:, 0]] == image_ids  # every row is its own nearest neighbour
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    brute = np.argsort(-(unit @ unit.T), axis=1)[:, 1]
    assert [ids[i] for i in found[:, 1]] == [image_ids[j] for j in brute]
    rows = dict(zip(image_ids, store.index_table().column("row").to_pylist()))
    np.testing.assert_allclose(index.reconstruct(int(rows[image_ids[4]])), unit[4], rtol=1e-6)


def test_faiss_l2_trained_index_on_an_fsspec_uri(store):
    out = "memory://strata-export/ivf"
    export_faiss(store, "b", out, metric="l2", factory="IVF4,Flat")
    fs = fsspec.filesystem("memory")
    index = faiss.deserialize_index(np.frombuffer(fs.cat_file("/strata-export/ivf/index.faiss"), np.uint8))
    assert index.ntotal == len(store) and index.is_trained
    faiss.extract_index_ivf(index).nprobe = 4  # every list: exact
    x = np.ascontiguousarray(store.layer("b"), np.float32)
    dist, found = index.search(x, 1)
    ids = dict(zip(*[pd.read_parquet(fs.open("/strata-export/ivf/ids.parquet"))[c] for c in ("id", "image_id")]))
    assert [ids[i] for i in found[:, 0]] == store.index_table().column("image_id").to_pylist()
    np.testing.assert_allclose(dist[:, 0], 0.0, atol=1e-5)


def test_export_refusals_are_one_line(store, tmp_path, capsys):
    assert main(["export", "--store", store.uri, "--layer", "zz", "--format", "faiss", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "strata export: error: layer 'zz' not in this feature set; layers: ['a', 'b']"
    assert main(["export", "--store", store.uri, "--layer", "a", "--format", "faiss", "--index-factory", "Nope9",
                 "--out", str(tmp_path)]) == 2
    assert "faiss cannot build index 'Nope9'" in capsys.readouterr().err
    assert main(["export", "--store", store.uri, "--layer", "a", "--format", "faiss", "--index-factory", "IVF64,PQ2",
                 "--out", str(tmp_path)]) == 2  # 64 lists need more training rows than the store has
    assert "faiss cannot train index 'IVF64,PQ2' on" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    for fmt in ("faiss", "embedding-reader"):
        assert main(["export", "--store", store.uri, "--layer", "a", "--format", fmt,
                     "--out", str(tmp_path / "a-file")]) == 2
        assert "is a file; --out takes a folder" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "x"


def test_faiss_ids_keep_a_label_named_id_apart(tmp_path):
    from storekit import write_store

    rng = np.random.default_rng(0)
    store = write_store(str(tmp_path / "s"), {"a": rng.normal(size=(20, 4))}, {"id": [f"x{i}" for i in range(20)]})
    export_faiss(store, "a", str(tmp_path / "f"))
    ids = pd.read_parquet(tmp_path / "f" / "ids.parquet")
    assert list(ids["label_id"]) == [f"x{i}" for i in range(20)]
    assert sorted(ids["id"]) == sorted(store.index()["row"])


def test_exporting_again_into_the_same_folder_replaces_the_earlier_export(store, tmp_path):
    """embedding-reader reads every numbered file in the folder: an earlier, bigger export's shards must go."""
    import shutil

    from embedding_reader import EmbeddingReader

    out = tmp_path / "er"
    args = ["export", "--store", store.uri, "--layer", "a", "--format", "embedding-reader", "--out", str(out)]
    assert main(args) == 0
    for sub, name in (("embeddings", "emb_{}.npy"), ("metadata", "metadata_{}.parquet")):  # an earlier, longer export
        shutil.copy(out / sub / name.format("00000"), out / sub / name.format("00099"))
    assert main(args) == 0
    reader = EmbeddingReader(embeddings_folder=str(out / "embeddings"), metadata_folder=str(out / "metadata"),
                             meta_columns=["image_id"], file_format="parquet_npy")
    assert reader.count == len(store) == json.loads((out / "export.json").read_text())["rows"]
    foreign = tmp_path / "foreign"
    (foreign / "embeddings").mkdir(parents=True)
    (foreign / "embeddings" / "mine.npy").write_bytes(b"x")
    assert main([*args[:-1], str(foreign)]) == 2
    assert (foreign / "embeddings" / "mine.npy").exists()


def test_faiss_options_with_another_format_are_refused(store, tmp_path, capsys):
    assert main(["export", "--store", store.uri, "--layer", "a", "--format", "embedding-reader", "--metric", "l2",
                 "--out", str(tmp_path / "er")]) == 2
    assert "--metric and --index-factory are faiss options" in capsys.readouterr().err
    assert not (tmp_path / "er").exists()
