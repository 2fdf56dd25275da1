"""Scores. `competition_r2` is the leaderboard metric; `log_r2` is the reference solution's internal score.

All functions take (N, 5) arrays in grams, columns in `TARGETS` order, and refuse NaN or mismatched shapes
rather than returning a number that means nothing.
"""

from __future__ import annotations

import numpy as np

from biomass_cache.common.targets import TARGETS, WEIGHTS


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has shape {y_pred.shape}")
    if y_true.ndim != 2 or y_true.shape[1] != len(TARGETS):
        raise ValueError(f"expected (N, {len(TARGETS)}) arrays in the order {TARGETS}, got {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("cannot score zero rows")
    for name, a in (("y_true", y_true), ("y_pred", y_pred)):
        bad = ~np.isfinite(a)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(f"{name} has {bad.sum()} non-finite values (first at row {row}, {TARGETS[col]})")
    return y_true, y_pred


def _r2(ss_res: float, ss_tot: float) -> float:
    if ss_tot <= 0:
        raise ValueError("R^2 is undefined: the true values have no variance")
    return float(1.0 - ss_res / ss_tot)


def competition_r2(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """One globally weighted R^2 over all (image, target) rows, raw grams.

    1 - sum_j w_j (y_j - yhat_j)^2 / sum_j w_j (y_j - ybar_w)^2, with ybar_w the weighted mean over all rows
    of all five targets and w_j the weight of row j's target.
    """
    y_true, y_pred = _check(y_true, y_pred)
    w = np.broadcast_to(np.asarray(WEIGHTS), y_true.shape)
    ybar = (w * y_true).sum() / w.sum()
    return _r2((w * (y_true - y_pred) ** 2).sum(), (w * (y_true - ybar) ** 2).sum())


def per_target_r2(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Plain R^2 of each target in grams, against that target's own mean."""
    y_true, y_pred = _check(y_true, y_pred)
    res = ((y_true - y_pred) ** 2).sum(axis=0)
    tot = ((y_true - y_true.mean(axis=0)) ** 2).sum(axis=0)
    return {name: (float(1 - r / t) if t > 0 else float("nan")) for name, r, t in zip(TARGETS, res, tot)}


def log_r2_per_target(
    y_true: np.ndarray, y_pred: np.ndarray, baseline_grams: np.ndarray | None = None
) -> dict[str, float]:
    """R^2 of each target on log1p(clamp(y, 0)).

    The baseline is each target's own mean of log1p(y_true), or, when `baseline_grams` (5,) is given,
    log1p of that full-data mean in grams, so folds with different means stay comparable.
    """
    y_true, y_pred = _check(y_true, y_pred)
    lt, lp = np.log1p(np.clip(y_true, 0, None)), np.log1p(np.clip(y_pred, 0, None))
    if baseline_grams is None:
        base = lt.mean(axis=0)
    else:
        base = np.log1p(np.clip(np.asarray(baseline_grams, dtype=np.float64), 0, None))
        if base.shape != (len(TARGETS),):
            raise ValueError(f"baseline_grams must have shape ({len(TARGETS)},), got {base.shape}")
    res = ((lt - lp) ** 2).sum(axis=0)
    tot = ((lt - base) ** 2).sum(axis=0)
    return {name: _r2(r, t) for name, r, t in zip(TARGETS, res, tot)}


def log_r2(y_true: np.ndarray, y_pred: np.ndarray, baseline_grams: np.ndarray | None = None) -> float:
    """Weighted mean (WEIGHTS) of the five per-target R^2 on log1p scale."""
    per = log_r2_per_target(y_true, y_pred, baseline_grams)
    return float(sum(w * per[n] for n, w in zip(TARGETS, WEIGHTS)) / sum(WEIGHTS))


def score_table(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Everything a run reports: both headline scores and the per-target R^2 in grams and on log scale."""
    return {
        "competition_r2": competition_r2(y_true, y_pred),
        "log_r2": log_r2(y_true, y_pred),
        "per_target_r2": per_target_r2(y_true, y_pred),
        "per_target_log_r2": log_r2_per_target(y_true, y_pred),
        "n_images": int(len(y_true)),
    }


COLLAPSE_RTOL = 1e-3  # predictions whose std is below this share of the truth's are constant in all but name


def collapsed_targets(y_true: np.ndarray, y_pred: np.ndarray, rtol: float = COLLAPSE_RTOL) -> list[str]:
    """Targets whose predictions are (near) constant while the truth varies: a dead model, not merely a weak one.

    Rows with a missing true value are left out, as in the scores.
    """
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    out = []
    for j, name in enumerate(TARGETS):
        ok = np.isfinite(y_true[:, j])
        truth_std = y_true[ok, j].std() if ok.sum() > 1 else 0.0
        if truth_std > 0 and y_pred[ok, j].std() <= rtol * truth_std:
            out.append(name)
    return out
