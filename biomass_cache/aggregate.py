"""How an ensemble combines its members' predictions, always in COMPONENT space (clover, dead, green).

GDM and Total are rebuilt from the combined components, so GDM = clover + green and Total = clover + dead + green
hold exactly: a weighted mean, per-sample inverse-variance weights (MC-dropout), or weights fitted on the members'
out-of-fold predictions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from biomass_cache.metrics import competition_r2
from biomass_cache.targets import COMPONENTS, TARGETS, WEIGHTS, components_to_targets

VAR_FLOOR = 1e-12  # g^2: a member with (numerically) zero MC variance gets a large but finite weight


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


def oof_scores(preds: Sequence[np.ndarray], y_true: np.ndarray, weights: Sequence[float]) -> dict:
    """OOF competition_r2 of each member and of their component-space weighted mean."""
    return {
        "members": [competition_r2(y_true, p) for p in preds],
        "ensemble": competition_r2(y_true, weighted_mean(preds, weights)),
    }
