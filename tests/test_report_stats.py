"""The statistics behind the reports (report/stats.py) against hand computations: the grouped bootstrap resamples
visits with all their photos, a paired difference of identical predictions is exactly zero, and split-conformal
intervals cover held-out visits at their nominal level."""

from __future__ import annotations

import numpy as np
import pytest

from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import TARGETS
from biomass_cache.common import conformal
from biomass_cache.report import stats


def data(n_visits: int = 40, per_visit: int = 3, seed: int = 0, noise: float = 0.3):
    """Grams with a shared per-visit level (photos of a visit alike) and multiplicative prediction errors."""
    rng = np.random.default_rng(seed)
    level = rng.lognormal(3, 0.6, (n_visits, 1))
    groups = np.repeat(np.arange(n_visits), per_visit)
    clover, dead, green = (level[groups] * rng.lognormal(0, 0.3, (len(groups), 3)) * [0.3, 0.5, 1]).T
    truth = np.stack([clover, dead, green, clover + green, clover + dead + green], 1)
    pred = truth * rng.lognormal(0, noise, truth.shape)
    return truth, pred, groups


def test_a_resample_is_the_metric_on_its_visits():
    truth, pred, groups = data(n_visits=3, per_visit=2)
    sums, index = stats._visit_sums(truth, pred, groups)
    assert stats._r2_of(np.ones((1, 3)), sums)[0] == pytest.approx(competition_r2(truth, pred), abs=1e-12)
    # visit 0 twice, visit 2 once, visit 1 never: the metric on those rows, duplicated
    rows = np.r_[np.flatnonzero(groups == 0), np.flatnonzero(groups == 0), np.flatnonzero(groups == 2)]
    assert stats._r2_of(np.array([[2.0, 0.0, 1.0]]), sums)[0] == pytest.approx(
        competition_r2(truth[rows], pred[rows]), abs=1e-12)


def test_the_interval_holds_the_score_and_widens_with_fewer_visits():
    truth, pred, groups = data()
    wide = stats.bootstrap_r2(truth[:30], pred[:30], groups[:30])
    narrow = stats.bootstrap_r2(truth, pred, groups)
    assert narrow.low < narrow.value < narrow.high and narrow.groups == 40 and wide.groups == 10
    assert wide.high - wide.low > narrow.high - narrow.low
    assert stats.bootstrap_r2(truth, pred, groups) == narrow  # seeded


def test_a_paired_difference():
    truth, pred, groups = data()
    same = stats.paired_difference(truth, pred, pred, groups)
    assert (same.difference.value, same.difference.low, same.difference.high, same.p_a_better) == (0, 0, 0, 0)
    better = truth * np.random.default_rng(5).lognormal(0, 0.05, truth.shape)
    d = stats.paired_difference(truth, better, pred, groups)
    assert d.a > d.b and d.difference.low > 0 and d.p_a_better == 1.0
    assert d.difference.value == pytest.approx(d.a - d.b)


def test_conformal_by_hand():
    truth = np.tile(np.arange(1.0, 11.0)[:, None], (1, 5))  # 10 images, median 5.5
    oof = truth.copy()
    oof[:, 0] += np.arange(10)  # target 0's residuals 0..9
    c = conformal.calibrate(truth, oof, level=0.8)  # rank ceil(11 * 0.8) = 9: the 9th smallest score
    scores = np.arange(10) / (oof[:, 0] + 5.5)
    assert c.q[0] == pytest.approx(np.sort(scores)[8]) and c.q[1] == 0 and c.scale[0] == 5.5
    low, high = c.bounds(np.array([[4.0] * 5]))
    assert high[0, 0] == pytest.approx(4 + c.q[0] * 9.5) and low[0, 1] == high[0, 1] == 4
    with pytest.raises(ValueError, match="cannot calibrate 95% intervals .* at least 19"):
        conformal.calibrate(truth, oof, level=0.95)


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_coverage_on_held_out_visits_is_near_nominal(level):
    """Calibrated on the OOF residuals of half the visits, the intervals cover the other half's images at the
    nominal level within a few points (mean over 50 random halvings of 120 visits)."""
    truth, pred, groups = data(n_visits=120, per_visit=3, seed=1)
    rng = np.random.default_rng(0)
    covered = []
    for _ in range(50):
        held = np.isin(groups, rng.permutation(120)[:60])
        c = conformal.calibrate(truth[~held], pred[~held], level)
        covered.append(conformal.coverage(c, truth[held], pred[held]))
    mean = np.mean(covered, axis=0)
    assert np.all(np.abs(mean - level) < 0.03), dict(zip(TARGETS, mean.round(3)))
