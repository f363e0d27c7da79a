"""Splits: seeded and row-order independent, stratified, user column wins, few-shot, refusals."""

import numpy as np
import pandas as pd
import pytest

from pipeline.probes.config import SplitSpec, TaskSpec
from pipeline.probes.splits import split_task


def _index(n=1000, n_classes=4, seed=0):
    rng = np.random.default_rng(seed)
    p = np.arange(1, n_classes + 1) / np.arange(1, n_classes + 1).sum()  # imbalanced
    return pd.DataFrame({"image_id": [f"img-{i:05d}" for i in range(n)],
                         "label": rng.choice([f"c{j}" for j in range(n_classes)], size=n, p=p)})


def _by_id(s, index):
    out = {}
    for name, rows in s.rows.items():
        out.update({i: name for i in index["image_id"].to_numpy()[rows]})
    return out


def test_same_seed_same_split_and_row_order_does_not_matter():
    idx = _index()
    a = split_task(idx, "label", SplitSpec(seed=7))
    b = split_task(idx, "label", SplitSpec(seed=7))
    shuffled = idx.sample(frac=1.0, random_state=1).reset_index(drop=True)
    c = split_task(shuffled, "label", SplitSpec(seed=7))
    d = split_task(idx, "label", SplitSpec(seed=8))
    assert _by_id(a, idx) == _by_id(b, idx) == _by_id(c, shuffled)
    assert _by_id(a, idx) != _by_id(d, idx)


def test_fractions_per_class_hold_within_binomial_noise():
    """Hash allocation: each class's shares are binomial around the fractions (4 standard deviations here)."""
    idx = _index(n=2000)
    s = split_task(idx, "label", SplitSpec(train=0.6, val=0.2, test=0.2))
    assert sum(len(r) for r in s.rows.values()) == len(idx)
    for c in range(s.n_classes):
        n_c = int((s.targets == c).sum())
        for name, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            got = int((s.targets[s.rows[name]] == c).sum())
            assert abs(got - frac * n_c) <= 4 * np.sqrt(n_c * frac * (1 - frac)), (c, name, got, n_c)
    assert s.source == "generated" and s.classes == ("c0", "c1", "c2", "c3")


def test_an_image_keeps_its_split_when_a_refresh_adds_images():
    old = _index(n=800, seed=0)
    added = _index(n=1200, seed=1).iloc[800:]  # new ids img-00800..., new labels
    new = pd.concat([added.iloc[:200], old.iloc[::-1], added.iloc[200:]], ignore_index=True)  # and a new row order
    before = _by_id(split_task(old, "label", SplitSpec(seed=3)), old)
    after = _by_id(split_task(new, "label", SplitSpec(seed=3)), new)
    assert {i: after[i] for i in before} == before
    assert len(after) == len(before) + 400 and {after[i] for i in set(after) - set(before)} == {"train", "val", "test"}


def test_small_classes_still_get_train_val_and_test_rows():
    idx = _index(n=400)
    idx.loc[:2, "label"] = "rare"  # three rows
    idx.loc[3, "label"] = "single"  # one row: it must be in train
    s = split_task(idx, "label", SplitSpec(train=0.8, val=0.1, test=0.1))
    by_id = _by_id(s, idx)
    assert sorted(by_id[f"img-{i:05d}"] for i in range(3)) == ["test", "train", "val"]
    assert by_id["img-00003"] == "train"


def test_user_split_column_wins():
    idx = _index(n=400)
    idx["split"] = np.where(np.arange(400) < 300, "train", np.where(np.arange(400) < 350, "validation", "test"))
    s = split_task(idx, "label", SplitSpec(train=0.34, val=0.33, test=0.33))
    assert s.source == "column:split"
    assert list(s.rows["train"]) == list(range(300))
    assert list(s.rows["val"]) == list(range(300, 350))
    idx = idx.rename(columns={"split": "fold"})
    assert split_task(idx, "label", SplitSpec(column="fold")).source == "column:fold"
    with pytest.raises(ValueError, match="columns:.*fold.*set it to null"):
        split_task(idx, "label", SplitSpec(column="my_split"))


def test_a_user_split_without_val_gets_val_from_its_train_rows_only():
    """Published datasets come as train + test: validation is carved from train by hash; test stays as given."""
    idx = _index(n=600)
    idx["split"] = np.where(np.arange(600) < 450, "train", "test")
    spec = SplitSpec(train=0.7, val=0.15, test=0.15)
    s = split_task(idx, "label", spec)
    assert s.source == "column:split+val-from-train"
    assert list(s.rows["test"]) == list(range(450, 600))
    assert set(s.rows["val"]) | set(s.rows["train"]) == set(range(450)) and not set(s.rows["val"]) & set(s.rows["train"])
    assert abs(len(s.rows["val"]) / 450 - 0.15 / 0.85) < 0.05
    assert set(s.targets[s.rows["val"]]) == set(range(s.n_classes))
    shuffled = idx.sample(frac=1.0, random_state=1).reset_index(drop=True)  # the same ids land in val
    t = split_task(shuffled, "label", spec)
    assert sorted(_by_id(t, shuffled).items()) == sorted(_by_id(s, idx).items())
    idx.loc[idx.index[:450], "split"] = "test"  # no train rows either: refused as before
    with pytest.raises(ValueError, match="train split has 0 labelled rows"):
        split_task(idx, "label", spec)


def test_a_user_split_without_test_gets_test_from_its_train_rows():
    """Hub exports often hold train + validation, or train alone: the missing test (and val) rows come out of
    train by hash, in the probes.split shares, so validation still selects and test still reports."""
    idx = _index(n=600)
    idx["split"] = np.where(np.arange(600) < 480, "train", "validation")
    spec = SplitSpec(train=0.7, val=0.15, test=0.15)
    s = split_task(idx, "label", spec)
    assert s.source == "column:split+test-from-train"
    assert list(s.rows["val"]) == list(range(480, 600))
    assert set(s.rows["test"]) | set(s.rows["train"]) == set(range(480))
    assert abs(len(s.rows["test"]) / 480 - 0.15 / 0.85) < 0.05
    idx["split"] = "train"  # a single train-00000-of-00001.parquet
    t = split_task(idx, "label", spec)
    assert t.source == "column:split+val+test-from-train"
    generated = split_task(idx.drop(columns="split"), "label", spec)  # the same hash, the same shares
    assert _by_id(t, idx) == _by_id(generated, idx) and all(len(t.rows[k]) > 60 for k in ("val", "test"))
    assert not split_task(idx, "label", SplitSpec(train=0.8, val=0.2, test=0.0)).rows["test"].size  # none asked


def test_few_shot_k_per_class_seeded_nested_and_order_independent():
    idx = _index(n=1000)
    s = split_task(idx, "label", SplitSpec())
    five, ten = s.few_shot(5, seed=1), s.few_shot(10, seed=1)
    for rows, k in ((five, 5), (ten, 10)):
        assert np.bincount(s.targets[rows], minlength=s.n_classes).tolist() == [k] * s.n_classes
        assert set(rows) <= set(s.rows["train"])
    assert set(five) <= set(ten)
    assert list(s.few_shot(5, seed=1)) == list(five) and list(s.few_shot(5, seed=2)) != list(five)
    assert list(s.few_shot(None, seed=1)) == list(s.rows["train"])
    shuffled = idx.sample(frac=1.0, random_state=3).reset_index(drop=True)
    s2 = split_task(shuffled, "label", SplitSpec())
    ids = lambda rows, frame: set(frame["image_id"].to_numpy()[rows])  # noqa: E731
    assert ids(s2.few_shot(5, seed=1), shuffled) == ids(five, idx)


def test_missing_labels_are_excluded_and_counted():
    idx = _index(n=300)
    idx.loc[[0, 1, 2], "label"] = None
    idx.loc[3, "label"] = np.nan
    idx.loc[[4, 5], "label"] = ["", "  "]
    s = split_task(idx, "label", SplitSpec())
    assert s.n_missing == 6
    assert sum(len(r) for r in s.rows.values()) == 294
    assert not set(range(6)) & set(np.concatenate(list(s.rows.values())))


def test_refuses_single_class():
    idx = _index(n=50)
    idx["label"] = "cat"
    with pytest.raises(ValueError, match="at least two classes: fix the label column or drop the task"):
        split_task(idx, "label", SplitSpec())


def test_refuses_unknown_label_column_listing_label_columns():
    idx = _index(n=50).assign(uri="file:///x.png", fingerprint="f", Shape="round")
    with pytest.raises(ValueError, match=r"no such label column \(did you mean 'label'\?\); label columns: "
                                         r"\['label', 'Shape'\]"):
        split_task(idx, "lable", SplitSpec())
    with pytest.raises(ValueError, match=r"did you mean 'Shape'"):
        split_task(idx, "shape", SplitSpec())


def test_refuses_split_smaller_than_number_of_classes():
    idx = _index(n=60, n_classes=10)
    with pytest.raises(ValueError, match=r"split has \d+ labelled rows but there are 10 classes.*raise probes\.split"):
        split_task(idx, "label", SplitSpec(train=0.9, val=0.05, test=0.05, stratified=False))


def test_regression_task_is_inferred_for_float_labels():
    idx = _index(n=200)
    idx["weight"] = np.random.default_rng(0).normal(size=200)
    idx.loc[0, "weight"] = np.nan
    s = split_task(idx, TaskSpec("weight"), SplitSpec())
    assert s.task_type == "regression" and s.n_missing == 1 and s.classes == ()
    idx["as_float_class"] = idx["label"].str[1:].astype(float)  # 0.0, 1.0, ...: classes, not regression
    assert split_task(idx, "as_float_class", SplitSpec()).task_type == "classification"


def test_a_given_split_missing_a_class_or_with_a_single_image_class_is_warned_about(caplog):
    from pipeline.probes.split_table import check_splits

    idx = _index(n=120, n_classes=3)
    idx.loc[0, "label"] = "single"
    split = np.where(np.arange(120) < 80, "train", np.where(np.arange(120) < 100, "val", "test"))
    val_c2 = (split == "val") & (idx["label"] == "c2").to_numpy()
    split[val_c2] = "train"  # validation has no c2 row; its row count still exceeds the classes
    given = check_splits(pd.DataFrame({"image_id": idx["image_id"], "task": "label", "split": split}))
    with caplog.at_level("WARNING", logger="pipeline.probes.splits"):
        s = split_task(idx, "label", SplitSpec(), given=given)  # accepted: a warning, not an error
    assert s.source == "file" and len(s.rows["val"]) >= s.n_classes
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("task 'label'" in m and "val split" in m and "'c2'" in m and "'single'" in m for m in msgs), msgs
    assert any("single labelled image" in m and "['single']" in m for m in msgs), msgs
    assert not any("train split" in m for m in msgs)


def test_messages_name_a_class_label_by_its_name_and_integer(caplog):
    idx = _index(n=120, n_classes=3)
    idx["kind"] = idx["label"].str[1:].astype(int)
    idx.loc[0, "kind"] = 3
    idx.attrs["class_names"] = {"kind": ["cat", "dog", "$x$", "<b>owl</b>"], "other": ["z"]}
    with caplog.at_level("WARNING", logger="pipeline.probes.splits"):
        s = split_task(idx, "kind", SplitSpec())
    assert s.classes == (0, 1, 2, 3) and s.describe([0, 3]) == ["cat (0)", "<b>owl</b> (3)"]
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("single labelled image" in m and "['<b>owl</b> (3)']" in m for m in msgs), msgs
    s.few_shot(200, seed=0)
    assert any("few-shot k=200" in m and "'cat (0)'" in m for m in [r.getMessage() for r in caplog.records])
    idx.loc[idx["kind"] == 2, "kind"] = 9  # outside the names: shown as the number it is
    idx.loc[1, "kind"] = 9
    assert split_task(idx, "kind", SplitSpec()).describe([0, 3]) == ["cat (0)", 9]
    idx.attrs["class_names"]["wide"] = idx.attrs["class_names"]["kind"]
    idx["wide"] = idx["kind"].astype(float)  # a column widened to float: its 1.0 is still class 1
    assert split_task(idx, "wide", SplitSpec()).describe([0, 1]) == ["cat (0)", "dog (1)"]
    del idx.attrs["class_names"]
    assert split_task(idx, "kind", SplitSpec()).describe([0, 3]) == [0, 9]
    idx["one"] = 2
    idx.attrs["class_names"] = {"one": ["cat", "dog", "bird"]}
    with pytest.raises(ValueError, match=r"task 'one' has a single class 'bird' \(2\) in 120 labelled rows"):
        split_task(idx, "one", SplitSpec())
