"""Retention keeps the newest versions readable and deletes only what no kept version needs."""
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.stores import FeatureStore, FeatureStoreWriter, StoreTarget, label_schema
from pipeline.stores.retention import retain
from test_stores import LAYERS, _records, _shard


def _store(tmp_path):
    records = _records()
    target = StoreTarget(root=str(tmp_path), featureset="fs", shard_rows=64, chunk_rows=16)
    writer = FeatureStoreWriter(target)
    writer.prepare(n_rows=len(records), layer_dims=LAYERS, provenance={"encoder": "toy"}, labels=label_schema(records))
    for s in range(5):
        writer.write_shard(_shard(records, s, 64))
    writer.commit_version([0, 1], dataset_fingerprint="a", config={})        # v1
    writer.commit_version([0, 2], dataset_fingerprint="b", config={})        # v2: shard 1 replaced by 2
    writer.commit_version([0, 2, 3], dataset_fingerprint="c", config={})     # v3; shard 4 never published
    return target


def test_retain_removes_old_versions_and_their_only_shards(tmp_path):
    target = _store(tmp_path)
    before = FeatureStore(target.uri).layer("late").copy()
    result = retain(target.uri, keep=2)
    assert result.kept_versions == [2, 3] and result.removed_versions == [1] and result.removed_shards == [1]
    assert FeatureStore(target.uri).versions() == [2, 3]
    np.testing.assert_array_equal(FeatureStore(target.uri).layer("late"), before)
    assert len(FeatureStore(target.uri, version=2)) == 128
    with pytest.raises(ValueError, match="version 1 not found"):
        FeatureStore(target.uri, version=1)
    base = tmp_path / "fs"
    assert not (base / "index" / "shard-000001.parquet").exists()
    assert (base / "_manifest" / "shards" / "shard-000004.json").exists()  # unpublished work is not touched


def test_retain_dry_run_and_cli(tmp_path, capsys):
    target = _store(tmp_path)
    assert main(["retain", target.uri, "--keep", "1", "--dry-run"]) == 0
    assert "would remove versions [1, 2]" in capsys.readouterr().out
    assert FeatureStore(target.uri).versions() == [1, 2, 3]
    assert main(["versions", target.uri]) == 0
    assert capsys.readouterr().out.count("\n") == 3
    assert main(["retain", target.uri, "--keep", "0"]) == 2
