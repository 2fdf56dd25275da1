"""How an ensemble combines its members' predictions, always in COMPONENT space (clover, dead, green).

GDM and Total are rebuilt from the combined components, so GDM = clover + green and Total = clover + dead + green
hold exactly: a weighted mean, per-sample inverse-variance weights (MC-dropout), weights fitted on the members'
out-of-fold predictions, or a stacker (non-negative weights per component) fitted on them. A fitted combination
scores itself too well on the rows it was fitted on; `cross_fitted` gives the honest out-of-fold score.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.linear_model import LinearRegression

from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import COMPONENTS, TARGETS, WEIGHTS, components_to_targets

VAR_FLOOR = 1e-12  # g^2: a member with (numerically) zero MC variance gets a large but finite weight
STACK_ALPHA = 0.01  # ridge strength of the stacker, relative to the mean squared norm of its design columns


def _components(preds: Sequence[np.ndarray]) -> np.ndarray:
    """(M, N, 5) or list of (N, 5) grams -> (M, N, 3) clover, dead, green."""
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in preds])
    if stack.ndim != 3 or stack.shape[2] != len(TARGETS):
        raise ValueError(f"member predictions must be (N, {len(TARGETS)}) arrays, got {stack.shape[1:]}")
    return stack[..., [TARGETS.index(c) for c in COMPONENTS]]


def weighted_mean(preds: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of the members' components, rebuilt to the 5 targets (weights normalised to sum 1)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(preds),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {len(preds)} non-negative weights with a positive sum, got {w.tolist()}")
    comps = np.einsum("m,mnk->nk", w / w.sum(), _components(preds))
    return components_to_targets(comps)


def inverse_variance_mean(preds: Sequence[np.ndarray], variances: np.ndarray) -> np.ndarray:
    """Per-sample weights w_m(i) = (1 / var_m(i)) / sum_m' (1 / var_m'(i)) on the components, rebuilt to 5."""
    var = np.asarray(variances, dtype=np.float64)
    if var.shape != (len(preds), len(preds[0])) or not np.isfinite(var).all() or (var < 0).any():
        raise ValueError(f"variances must be finite, non-negative, shape (members, images); got {var.shape}")
    inv = 1.0 / np.maximum(var, VAR_FLOOR)
    w = inv / inv.sum(axis=0, keepdims=True)
    return components_to_targets(np.einsum("mn,mnk->nk", w, _components(preds)))


def fit_weights(preds: Sequence[np.ndarray], y_true: np.ndarray, steps: int = 200) -> np.ndarray:
    """Non-negative weights summing to 1 that maximise competition_r2 of the component-space weighted mean.

    The weights are softmax(a); 1 - R^2 is a smooth quadratic in w, minimised over a with L-BFGS in float64
    from equal weights, so the fit is deterministic.
    """
    comps = torch.as_tensor(_components(preds))
    y = torch.tensor(np.asarray(y_true, dtype=np.float64))
    w_t = torch.as_tensor(WEIGHTS, dtype=torch.float64)
    ss_tot = (w_t * (y - (w_t * y).sum() / (w_t.sum() * len(y))) ** 2).sum()
    logits = torch.zeros(len(comps), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)

    def loss_fn() -> torch.Tensor:
        opt.zero_grad()
        pred = components_to_targets(torch.einsum("m,mnk->nk", torch.softmax(logits, 0), comps))
        loss = (w_t * (y - pred) ** 2).sum() / ss_tot
        loss.backward()
        return loss

    opt.step(loss_fn)
    return torch.softmax(logits.detach(), 0).numpy()


def fit_stack(preds: Sequence[np.ndarray], y_true: np.ndarray, alpha: float = STACK_ALPHA) -> np.ndarray:
    """(3, M) non-negative weights, one per (component, member), minimising the competition loss of the stack.

    Every target is linear in the component weights (GDM = clover + green, Total = clover + dead + green), so the
    competition's weighted squared error over all five targets is one non-negative least-squares problem in the
    3M weights, solved exactly. No intercept: with non-negative members the output stays non-negative, as a
    submission must. The ridge term alpha * mean squared column norm * |w - 1/M|^2 pulls towards the equal-weight
    mean (alpha -> infinity gives `mean`), not towards zero grams.
    """
    comps = _components(preds)
    m = len(comps)
    spread = components_to_targets(np.eye(len(COMPONENTS)))  # (3, 5): which targets each component adds to
    root = np.sqrt(np.asarray(WEIGHTS, dtype=np.float64))
    design = np.einsum("cj,mnc,j->njcm", spread, comps, root).reshape(-1, len(COMPONENTS) * m)
    target = (np.asarray(y_true, dtype=np.float64) * root).reshape(-1)
    lam = alpha * (design**2).sum() / design.shape[1]
    if lam > 0:
        design = np.vstack([design, np.sqrt(lam) * np.eye(design.shape[1])])
        target = np.concatenate([target, np.full(design.shape[1], np.sqrt(lam) / m)])
    coef = LinearRegression(fit_intercept=False, positive=True).fit(design, target).coef_
    return coef.reshape(len(COMPONENTS), m)


def stack_predict(preds: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The stack's (N, 5) grams: each component a weighted sum over members (weights (3, M)), rebuilt to 5."""
    return components_to_targets(np.einsum("cm,mnc->nc", np.asarray(weights, dtype=np.float64), _components(preds)))


def cross_fitted(preds: Sequence[np.ndarray], y_true: np.ndarray, folds: np.ndarray,
                 fit: Callable[[list, np.ndarray], np.ndarray],
                 combine: Callable[[list, np.ndarray], np.ndarray]) -> dict:
    """The honest OOF score of a fitted combination: for each fold k, `fit` on the other folds' rows and
    `combine` fold k's; competition_r2 of the pooled held-out predictions over all rows, and of each fold's, and
    those predictions (`predictions`, (N, 5))."""
    y = np.asarray(y_true, dtype=np.float64)
    folds = np.asarray(folds)
    pooled = np.full_like(y, np.nan)
    per_fold = {}
    for k in np.unique(folds):
        held = folds == k
        params = fit([np.asarray(p)[~held] for p in preds], y[~held])
        pooled[held] = combine([np.asarray(p)[held] for p in preds], params)
        per_fold[f"fold{k}"] = competition_r2(y[held], pooled[held])
    return {"ensemble": competition_r2(y, pooled), "n_folds": len(per_fold), "folds": per_fold, "predictions": pooled}


def oof_scores(preds: Sequence[np.ndarray], y_true: np.ndarray, weights: np.ndarray,
               combine: Callable[[list, np.ndarray], np.ndarray] = weighted_mean) -> dict:
    """OOF competition_r2 of each member and of their combination (by default the component-space weighted mean)."""
    return {
        "members": [competition_r2(y_true, p) for p in preds],
        "ensemble": competition_r2(y_true, combine(list(preds), weights)),
    }
