import numpy as np
import pandas as pd
import pytest

from biomass_cache.common.errors import DataError
from biomass_cache.common.folds import grouped_folds, read_folds, visit_groups, write_folds


def table(n=300, seed=0):
    rng = np.random.default_rng(seed)
    dates = [f"2015/{m}/{d}" for m in range(1, 10) for d in (3, 17)]
    # very unequal group sizes, as in the real data
    p = rng.dirichlet(np.full(len(dates), 0.5))
    return pd.DataFrame({
        "image_id": [f"ID{1000000 + i}" for i in range(n)],
        "Sampling_Date": rng.choice(dates, n, p=p),
        "State": rng.choice(["Tas", "Vic", "NSW", "WA"], n, p=[0.39, 0.31, 0.21, 0.09]),
    })


@pytest.mark.parametrize("stratify", [False, True])
def test_no_group_spans_two_folds(stratify):
    t = table()
    folds = grouped_folds(t, 5, seed=3, stratify=stratify)
    assert set(folds) == set(range(5))
    per_group = pd.Series(folds).groupby(visit_groups(t).to_numpy()).nunique()
    assert per_group.max() == 1


def test_balanced_and_deterministic():
    t = table()
    a, b, c = grouped_folds(t, 5, 0), grouped_folds(t, 5, 0), grouped_folds(t, 5, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    sizes = np.bincount(a)
    largest_group = visit_groups(t).value_counts().max()
    assert sizes.max() - sizes.min() <= largest_group


def test_too_few_groups_and_missing_columns():
    t = table(20).assign(Sampling_Date="2015/1/1", State="Tas")
    with pytest.raises(DataError, match="cannot make 5 grouped folds from 1"):
        grouped_folds(t, 5)
    with pytest.raises(DataError, match="lacks \\['State'\\]"):
        grouped_folds(t.drop(columns="State"), 2)


def test_write_read_round_trip(tmp_path):
    t = table(50)
    folds = grouped_folds(t, 3)
    write_folds(tmp_path / "folds.csv", t, folds)
    np.testing.assert_array_equal(read_folds(tmp_path / "folds.csv", t.sample(frac=1, random_state=0)),
                                  folds[t.sample(frac=1, random_state=0).index])
    with pytest.raises(DataError, match="have no fold"):
        read_folds(tmp_path / "folds.csv", pd.concat([t, t.assign(image_id="IDX" + t["image_id"])]))
