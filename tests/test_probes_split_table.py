"""Splits are data: splits.parquet is written with the results, read back, checked, and `--splits` reuses it."""

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.probes import InMemoryFeatureTable, ProbeConfig, run_probe_grid
from pipeline.probes.split_table import check_splits, read_splits
from storekit import write_store


def _table(n=300, seed=0, start=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.normal(size=(3, 12))[y] * 2 + rng.normal(size=(n, 12))).astype(np.float32)
    index = pd.DataFrame({"image_id": [f"im{i:04d}" for i in range(start, start + n)],
                          "label": np.array(["a", "b", "c"])[y], "odd": np.where(y % 2, "odd", "even")})
    return InMemoryFeatureTable({"l": x}, index)


CFG = {"tasks": ["label", "odd"], "device": "cpu", "heads": [{"kind": "linear", "weight_decays": [1e-2]}],
       "few_shot": [None, 4]}


def test_splits_table_has_every_task_and_few_shot_subset(tmp_path):
    res = run_probe_grid(_table(), ProbeConfig.from_dict(CFG), use_ray=False)
    res.write(str(tmp_path))
    df = read_splits(str(tmp_path / "splits.parquet"))
    assert list(df.columns) == ["image_id", "task", "split", "few_shot_k"]
    full = df[df["few_shot_k"].isna()]
    assert full.groupby("task").size().to_dict() == {"label": 300, "odd": 300}
    assert set(full["split"]) == {"train", "val", "test"}
    four = df[df["few_shot_k"] == 4]
    assert four.groupby("task").size().to_dict() == {"label": 12, "odd": 8} and set(four["split"]) == {"train"}
    train = set(full.loc[(full["task"] == "label") & (full["split"] == "train"), "image_id"])
    assert set(four.loc[four["task"] == "label", "image_id"]) <= train
    n_train = res.table.loc[res.table["task"] == "label", "n_train"].dropna().astype(int)
    assert set(n_train) == {len(train), 12}


def test_a_given_split_is_reused_exactly_and_new_images_are_left_out(tmp_path):
    first = run_probe_grid(_table(), ProbeConfig.from_dict(CFG), use_ray=False)
    given = first.splits.copy()
    moved = given["few_shot_k"].isna() & (given["task"] == "label") & (given["split"] == "val")
    given.loc[moved[moved].index[:5], "split"] = "test"  # a user's own edit must be honoured
    grown = _table(n=360)  # 60 images more than the split knows
    cfg = ProbeConfig.from_dict(CFG)
    second = run_probe_grid(grown, cfg, use_ray=False, given_splits=check_splits(given))
    pd.testing.assert_frame_equal(second.splits.sort_values(["task", "few_shot_k", "image_id"], ignore_index=True),
                                  check_splits(given).sort_values(["task", "few_shot_k", "image_id"],
                                                                  ignore_index=True), check_dtype=False)
    full = second.table[second.table["few_shot"].isna() & (second.table["task"] == "label")]
    assert int(full["n_test"].iloc[0]) == int(first.table.loc[first.table["few_shot"].isna() & (
        first.table["task"] == "label"), "n_test"].iloc[0]) + 5


@pytest.mark.parametrize("bad,needle", [
    (pd.DataFrame({"image_id": ["a"], "task": ["t"]}), r"missing column\(s\) \['split'\]"),
    (pd.DataFrame({"image_id": ["a"], "task": ["t"], "split": ["holdout"]}), r"valid: \['train', 'val', 'test'\]"),
    (pd.DataFrame({"image_id": ["a", "a"], "task": ["t", "t"], "split": ["train", "val"]}), "appears twice"),
    (pd.DataFrame({"image_id": ["a"], "task": ["t"], "split": ["val"], "few_shot_k": [5]}), "must have split 'train'"),
])
def test_bad_split_tables_are_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        check_splits(bad)


def test_a_split_file_that_is_no_table_or_lost_few_shot_k_says_so(tmp_path):
    (tmp_path / "splits.parquet").write_text("image_id,task,split\n")
    with pytest.raises(ValueError, match=r"splits file .*splits\.parquet is not a readable Parquet table"):
        read_splits(str(tmp_path / "splits.parquet"))
    rows = pd.DataFrame({"image_id": ["a", "a", "a", "b", "b"], "task": ["t"] * 5,
                         "split": ["train"] * 5, "few_shot_k": [None, 1, 5, None, 5]})
    with pytest.raises(ValueError, match=r"e\.g\. \[\{'image_id': 'a', 'task': 't'\}, \{'image_id': 'b', 'task': "
                                         r"'t'\}\].*no few_shot_k column"):
        check_splits(rows.drop(columns="few_shot_k"))
    assert len(check_splits(rows)) == 5


def test_a_split_file_without_the_task_names_the_tasks_it_has():
    res = run_probe_grid(_table(), ProbeConfig.from_dict(CFG), use_ray=False)
    with pytest.raises(ValueError, match=r"no rows for task 'colour'; it has tasks \['label', 'odd'\]"):
        table = _table()
        table.index()["colour"] = np.where(np.arange(300) % 2, "x", "y")
        run_probe_grid(table, ProbeConfig.from_dict(CFG | {"tasks": ["colour"]}), use_ray=False,
                       given_splits=res.splits)


def _store(root, n):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, n)
    x = (np.eye(2)[y] @ rng.normal(size=(2, 6)) * 2 + rng.normal(size=(n, 6))).astype(np.float32)
    return write_store(str(root), {"l": x}, {"label": [f"c{v}" for v in y]}, shard_rows=n,
                       ids=[f"img{i:04d}" for i in range(n)]).uri


def test_cli_splits_flag_reuses_an_earlier_runs_split(tmp_path, capsys):
    uri = _store(tmp_path, 200)
    args = ["probe", "--store", uri, "--no-ray", "tasks=[label]", "heads=[linear]", "device=cpu"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    first = read_splits(str(tmp_path / "one" / "splits.parquet"))
    edited = first.assign(split=np.where(first["split"] == "test", "val", first["split"]))  # no test rows now
    edited.to_parquet(tmp_path / "mine.parquet", index=False)
    assert main(args + ["--out", str(tmp_path / "two"), "--splits", str(tmp_path / "mine.parquet")]) == 0
    second = read_splits(str(tmp_path / "two" / "splits.parquet"))
    assert set(second["split"]) == {"train", "val"}
    pd.testing.assert_frame_equal(second.sort_values("image_id", ignore_index=True),
                                  check_splits(edited).sort_values("image_id", ignore_index=True), check_dtype=False)
    assert main(args + ["--splits", str(tmp_path / "nope.parquet")]) == 3  # NOT_FOUND
    assert "does not exist" in capsys.readouterr().err


def test_a_split_file_takes_the_split_column_aliases():
    df = pd.DataFrame({"image_id": ["a", "b", "c", "d", "e"], "task": "t",
                       "split": ["training", "Validation", "dev ", "testing", "valid"]})
    assert list(check_splits(df)["split"]) == ["train", "val", "val", "test", "val"]
    with pytest.raises(ValueError, match=r"split values \['holdout'\] unknown; valid: \['train', 'val', 'test'\] "
                                         r"\(or .*'validation'"):
        check_splits(df.assign(split=["train", "val", "test", "holdout", "val"]))
