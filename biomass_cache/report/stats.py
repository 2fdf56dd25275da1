"""How sure a score is: grouped-bootstrap intervals of `competition_r2` and paired differences of two predictions
of the same images (prediction intervals: common/conformal.py).

Photos of one (date, State) visit are near-duplicates, so every resampling draws visits, not images: a bootstrap
sample is a multiset of visits with all their photos. `competition_r2` is a ratio of sums over (image, target)
rows, so each visit is summarised once by its sums (weight, weighted y, weighted y^2, weighted squared error) and a
resample's score is a matrix product of visit counts with those sums: thousands of resamples in milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biomass_cache.common.conformal import checked
from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import WEIGHTS

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A score, its grouped-bootstrap interval at `level`, and the number of visits resampled."""

    value: float
    low: float
    high: float
    level: float
    groups: int

    def text(self, digits: int = 3) -> str:
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"




def _visit_sums(truth: np.ndarray, pred: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(G, 4) per-visit sums of w, w*y, w*y^2 and w*(y - yhat)^2 over the visit's (image, target) rows; the visit
    index of every image."""
    truth, pred = checked(truth, pred)
    names, index = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    w = np.broadcast_to(np.asarray(WEIGHTS, float), truth.shape)
    per_image = np.stack([w.sum(1), (w * truth).sum(1), (w * truth ** 2).sum(1), (w * (truth - pred) ** 2).sum(1)], 1)
    sums = np.zeros((len(names), 4))
    np.add.at(sums, index, per_image)
    return sums, index


def _r2_of(counts: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """competition_r2 of each resample: counts (R, G) of the visits, sums (G, 4)."""
    s = counts @ sums
    ss_tot = s[:, 2] - s[:, 1] ** 2 / s[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ss_tot > 0, 1 - s[:, 3] / ss_tot, np.nan)


def _counts(n_groups: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=resamples).astype(float)


def _interval(value: float, samples: np.ndarray, level: float, groups: int) -> Interval:
    samples = samples[np.isfinite(samples)]
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(low), float(high), level, groups)


def bootstrap_r2(truth: np.ndarray, pred: np.ndarray, groups: np.ndarray, level: float = LEVEL,
                 resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """competition_r2 of (N, 5) grams with a percentile interval over visit resamples."""
    sums, _ = _visit_sums(truth, pred, groups)
    if len(sums) < 2:
        raise ValueError("a grouped bootstrap needs at least two visits")
    samples = _r2_of(_counts(len(sums), resamples, seed), sums)
    return _interval(competition_r2(truth, pred), samples, level, len(sums))


@dataclass(frozen=True)
class Difference:
    """Score of A minus score of B on the same images: the interval of the difference and P(A beats B)."""

    a: float
    b: float
    difference: Interval
    p_a_better: float


def paired_difference(truth: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, groups: np.ndarray,
                      level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Difference:
    """Both predictions scored on the same visit resamples: the resampling noise they share cancels."""
    sums_a, _ = _visit_sums(truth, pred_a, groups)
    sums_b, _ = _visit_sums(truth, pred_b, groups)
    if len(sums_a) < 2:
        raise ValueError("a grouped bootstrap needs at least two visits")
    counts = _counts(len(sums_a), resamples, seed)
    diff = _r2_of(counts, sums_a) - _r2_of(counts, sums_b)
    a, b = competition_r2(truth, pred_a), competition_r2(truth, pred_b)
    finite = diff[np.isfinite(diff)]
    return Difference(a, b, _interval(a - b, diff, level, len(sums_a)), float((finite > 0).mean()))
