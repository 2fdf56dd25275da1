import numpy as np
import pytest

from biomass_cache.common.metrics import competition_r2, log_r2, log_r2_per_target, per_target_r2, score_table
from biomass_cache.common.targets import TARGETS, WEIGHTS


def test_competition_r2_hand_case():
    # Two images. Rows (target weight, true, pred):
    y = np.array([[1.0, 2.0, 3.0, 4.0, 10.0], [3.0, 0.0, 1.0, 4.0, 6.0]])
    p = np.array([[1.0, 2.0, 3.0, 4.0, 8.0], [3.0, 1.0, 1.0, 4.0, 6.0]])
    # weighted mean: sum w*y = 0.1*(1+2+3+3+0+1) + 0.2*(4+4) + 0.5*(10+6) = 1.0 + 1.6 + 8.0 = 10.6; sum w = 2.0
    ybar = 10.6 / 2.0
    ss_res = 0.5 * (10 - 8) ** 2 + 0.1 * (0 - 1) ** 2  # = 2.1
    ss_tot = sum(w * (v - ybar) ** 2 for row in y for w, v in zip(WEIGHTS, row))
    assert ss_res == pytest.approx(2.1)
    assert competition_r2(y, p) == pytest.approx(1 - ss_res / ss_tot, rel=1e-12)
    assert competition_r2(y, y) == 1.0


def test_competition_r2_is_global_not_per_target_mean():
    rng = np.random.default_rng(0)
    y = rng.gamma(2.0, 10.0, size=(50, 5))
    p = y + rng.normal(0, 5, size=y.shape)
    per = per_target_r2(y, p)
    naive = sum(w * per[k] for k, w in zip(per, WEIGHTS))
    assert competition_r2(y, p) != pytest.approx(naive, abs=1e-6)
    # predicting the global weighted mean everywhere scores exactly 0
    w = np.broadcast_to(WEIGHTS, y.shape)
    mean = np.full_like(y, (w * y).sum() / w.sum())
    assert competition_r2(y, mean) == pytest.approx(0.0, abs=1e-12)


def test_log_r2_hand_case():
    y = np.array([[0.0, 1.0, 3.0, 3.0, 4.0], [1.0, 3.0, 7.0, 8.0, 11.0]])
    p = np.array([[-5.0, 1.0, 3.0, 3.0, 4.0], [1.0, 3.0, 7.0, 8.0, 11.0]])  # negative clamps to 0: perfect
    assert log_r2(y, p) == pytest.approx(1.0)
    p2 = y.copy()
    p2[:, 4] = [np.e - 1, np.e - 1]  # log1p -> 1 for both rows of Total
    lt = np.log1p(y[:, 4])
    r2_total = 1 - ((lt - 1) ** 2).sum() / ((lt - lt.mean()) ** 2).sum()
    assert log_r2(y, p2) == pytest.approx(0.5 * r2_total + 0.5 * 1.0)
    per = log_r2_per_target(y, p2)
    assert per["Dry_Total_g"] == pytest.approx(r2_total)


def test_log_r2_global_baseline():
    y = np.array([[1.0, 1.0, 1.0, 2.0, 3.0], [3.0, 3.0, 3.0, 6.0, 9.0]])
    p = y * 1.1
    base = np.array([2.0, 2.0, 2.0, 4.0, 6.0])
    per = log_r2_per_target(y, p, baseline_grams=base)
    lt, lp = np.log1p(y[:, 0]), np.log1p(p[:, 0])
    expect = 1 - ((lt - lp) ** 2).sum() / ((lt - np.log1p(2.0)) ** 2).sum()
    assert per["Dry_Clover_g"] == pytest.approx(expect)


def test_errors_are_clear():
    y = np.ones((3, 5))
    with pytest.raises(ValueError, match="shape"):
        competition_r2(y, np.ones((3, 4)))
    bad = y.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite.*row 1, GDM_g"):
        competition_r2(y, bad)
    with pytest.raises(ValueError, match="no variance"):
        competition_r2(y, y)
    with pytest.raises(ValueError, match="zero rows"):
        log_r2(np.ones((0, 5)), np.ones((0, 5)))


def test_score_table_keys():
    rng = np.random.default_rng(1)
    y = rng.gamma(2.0, 10.0, size=(20, 5))
    t = score_table(y, y * 0.9)
    assert set(t) == {"competition_r2", "log_r2", "per_target_r2", "per_target_log_r2", "n_images"}
    assert t["n_images"] == 20


def test_collapsed_targets_are_the_constant_ones():
    from biomass_cache.common.metrics import collapsed_targets

    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 10.0, size=(20, 5))
    pred = truth + rng.normal(0, 5.0, size=truth.shape)
    assert collapsed_targets(truth, pred) == []
    pred[:, 4] = 0.0  # a dead total
    pred[:, 0] = 3.0 + 1e-9 * np.arange(20)  # constant in all but name
    assert collapsed_targets(truth, pred) == [TARGETS[0], TARGETS[4]]
    truth[:, 1] = 7.0  # a target without variance in this fold cannot tell a dead model from a right one
    pred[:, 1] = 7.0
    truth[3, 2] = np.nan  # unknown truth: its row is left out
    assert collapsed_targets(truth, pred) == [TARGETS[0], TARGETS[4]]
