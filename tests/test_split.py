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
