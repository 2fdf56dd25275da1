"""Per-image prediction intervals: split-conformal calibration on out-of-fold residuals (`biomass predict
--interval`, the run report). Coverage on held-out visits is tested on synthetic data (tests/test_report_stats.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biomass_cache.common.targets import TARGETS


def checked(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth, float), np.asarray(pred, float)
    if truth.shape != pred.shape or truth.ndim != 2 or truth.shape[1] != len(TARGETS) or not len(truth):
        raise ValueError(f"expected two (N, {len(TARGETS)}) arrays of grams, got {truth.shape} and {pred.shape}")
    if not (np.isfinite(truth).all() and np.isfinite(pred).all()):
        raise ValueError("the true or predicted grams hold NaN or inf")
    return truth, pred


@dataclass(frozen=True)
class Conformal:
    """Split-conformal intervals per target: |y - yhat| <= q * (yhat + scale), calibrated on out-of-fold residuals.

    The score is the residual relative to the prediction (plus `scale`, each target's mean mass, so that
    near-empty quadrats keep a sensible width): biomass errors grow with the mass. `q` is the
    ceil((n + 1) * level) / n quantile of the n calibration scores, the split-conformal guarantee for exchangeable
    images; the OOF predictions come from models that never saw the image's visit, as test images are unseen.
    """

    level: float
    q: np.ndarray  # (5,)
    scale: np.ndarray  # (5,)
    n: int

    def bounds(self, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) grams for (N, 5) predictions; the low bound is never negative."""
        pred = np.asarray(pred, float)
        half = self.q * (np.clip(pred, 0, None) + self.scale)
        return np.clip(pred - half, 0, None), pred + half

    def to_dict(self) -> dict:
        return {"level": self.level, "n": self.n, "q": dict(zip(TARGETS, self.q.round(6).tolist())),
                "scale": dict(zip(TARGETS, self.scale.round(6).tolist()))}


def calibrate(truth: np.ndarray, oof: np.ndarray, level: float = 0.9) -> Conformal:
    truth, oof = checked(truth, oof)
    if not 0 < level < 1:
        raise ValueError(f"the interval level must be between 0 and 1, got {level}")
    n = len(truth)
    rank = int(np.ceil((n + 1) * level))
    if rank > n:
        raise ValueError(f"{n} out-of-fold predictions cannot calibrate {level * 100:.4g}% intervals (needs at least "
                         f"{int(np.ceil(level / (1 - level)))}); lower the level")
    scale = np.maximum(truth.mean(axis=0), 1e-6)  # the mean: a median is 0 where most quadrats lack clover
    scores = np.abs(truth - oof) / (np.clip(oof, 0, None) + scale)
    return Conformal(level, np.sort(scores, axis=0)[rank - 1], scale, n)


def coverage(conformal: Conformal, truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Share of images inside their interval, per target (5,)."""
    low, high = conformal.bounds(pred)
    truth = np.asarray(truth, float)
    return ((truth >= low) & (truth <= high)).mean(axis=0)
