import pandas as pd
import pytest

from kidney_seg.split import cases_in, make_split, read_split, subset_sizes, write_split


def ids(n):
    return [f"case_{i:05d}" for i in range(n)]


def test_sizes_follow_fractions():
    assert subset_sizes(210, (0.8, 0.1, 0.1)) == (168, 21, 21)
    assert subset_sizes(5, (0.8, 0.1, 0.1)) == (3, 1, 1)
    with pytest.raises(ValueError):
        subset_sizes(2, (0.0, 0.5, 0.5))


def test_split_is_seeded_and_order_independent():
    a = make_split(ids(40), seed=3)
    b = make_split(list(reversed(ids(40))), seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(make_split(ids(40), seed=4))
    assert sorted(a["case_id"]) == ids(40)
    assert a["subset"].value_counts().to_dict() == {"train": 32, "val": 4, "test": 4}


def test_split_round_trip(tmp_path):
    df = make_split(ids(10), seed=1)
    write_split(df, tmp_path / "split.csv")
    back = read_split(tmp_path / "split.csv")
    pd.testing.assert_frame_equal(back, df.astype(str))
    assert cases_in(back, "test") == sorted(df.loc[df.subset == "test", "case_id"])
    assert (tmp_path / "split.csv").read_text().splitlines()[0] == "case_id,subset"


def test_folds_partition_train_and_val():
    from kidney_seg.split import fold_cases

    df = make_split(ids(50), seed=5, folds=5)
    dev = df[df.subset != "test"]
    assert sorted(dev["fold"].unique()) == ["0", "1", "2", "3", "4"]
    assert (df.loc[df.subset == "test", "fold"] == "").all()
    assert dev["fold"].value_counts().tolist() == [9, 9, 9, 9, 9]
    vals = []
    for k in range(5):
        train, val = fold_cases(df, k)
        assert not set(train) & set(val) and len(train) + len(val) == 45
        vals += val
    assert sorted(vals) == sorted(dev["case_id"])
    pd.testing.assert_frame_equal(df[["case_id", "subset"]], make_split(ids(50), seed=5))
    with pytest.raises(ValueError):
        fold_cases(make_split(ids(10)), 0)
