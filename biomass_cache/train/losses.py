"""Training losses on head outputs: masked task losses, manifold mixup, uncertainty weighting and PCGrad.

Every piece can be switched off for ablations: mixup with prob=0, `combine_losses(..., uw=None)` is a plain sum,
plain `loss.backward()` instead of `pcgrad_step`, and a head without aux outputs has no aux losses.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biomass_cache.common.targets import TOTAL, WEIGHTS, ZScore, height_stats, target_stats, targets_to_total_ratio

PRIMARY_TASKS = ("total", "ratio", "five")
AUX_TASKS = ("height", "ndvi", "state", "interval")
LAMBDA_EPS = 1e-6  # keeps a Beta draw strictly inside (0, 1) so both samples always contribute


def masked_mean(err: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `err` over valid entries (optionally weighted); exactly 0 with a finite gradient when none is valid.

    `err` must be finite everywhere (callers zero the targets they do not supervise), so no NaN flows back.
    """
    w = mask.to(err.dtype) if weight is None else mask.to(err.dtype) * weight
    return (err * w).sum() / w.sum().clamp_min(1e-12)


def soft_labels(labels: torch.Tensor, n_classes: int, lam: float = 1.0, perm: torch.Tensor | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(one-hot labels (..., n_classes) mixed as lam * own + (1 - lam) * partner's, known mask) of class indices
    (-1 = unknown); `perm` (the mixup partners along dim 0) None: the plain one-hot labels."""
    known = labels >= 0
    hard = F.one_hot(labels.clamp_min(0), n_classes).to(dtype)
    if perm is None:
        return hard, known
    return lam * hard + (1 - lam) * hard[perm], known & known[perm]


def manifold_mixup(
    batch: Mapping[str, torch.Tensor],
    alpha: float,
    prob: float,
    generator: torch.Generator,
    n_states: int = 0,
    n_bins: int = 0,
) -> dict[str, torch.Tensor]:
    """Mix each sample with a random partner of the batch, with probability `prob` (training only).

    lambda ~ Beta(alpha, alpha) for the whole batch; tokens and the 5D masses y (g/m^2) are mixed linearly, so the
    GDM/Total identities still hold and the loss recomputes the ratio from the mixed masses; masks are AND-ed;
    height, NDVI and the samples' loss weights are mixed linearly; State becomes a soft label `state_soft`
    (B, n_states) with `state_mask` (needs `n_states` > 0); the interval bin indices `interval` (B, 5) become
    `interval_soft` (B, 5, n_bins) with `interval_mask` alike (needs `n_bins` > 0): the one-hot bins mixed with the
    same lambda. Returns a new dict (with `mixup_lambda`); the input batch is never modified. Deterministic given the
    generator's state.
    """
    if not 0.0 <= prob <= 1.0 or alpha <= 0:
        raise ValueError(f"mixup needs 0 <= prob <= 1 and alpha > 0, got prob={prob}, alpha={alpha}")
    out = dict(batch)
    b = batch["tokens"].shape[0]
    apply = bool(torch.rand((), generator=generator) < prob)
    if apply:
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        lam = float(np.clip(np.random.default_rng(seed).beta(alpha, alpha), LAMBDA_EPS, 1 - LAMBDA_EPS))
        perm = torch.randperm(b, generator=generator).to(batch["tokens"].device)
        for key in ("tokens", "y", "height", "ndvi_z", "weight"):
            if key in batch:
                out[key] = lam * batch[key] + (1 - lam) * batch[key][perm]
        for key in ("y_mask", "height_mask", "ndvi_mask"):
            if key in batch:
                out[key] = batch[key] & batch[key][perm]
    else:
        lam, perm = 1.0, None
    out["mixup_lambda"] = torch.tensor(lam)
    dtype = batch["tokens"].dtype
    if n_states and "state" in batch:
        out["state_soft"], out["state_mask"] = soft_labels(batch["state"], n_states, lam, perm, dtype)
    if n_bins and "interval" in batch:
        out["interval_soft"], out["interval_mask"] = soft_labels(batch["interval"], n_bins, lam, perm, dtype)
    return out


def task_losses(
    out: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    zscore: ZScore,
    weights: Sequence[float] = WEIGHTS,
    interval_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Masked per-task losses: `total`, `ratio`, `five`, and `height`/`ndvi`/`state`/`interval` where the head
    predicts them.

    - total: MSE of total_z against the z-scored true Dry_Total_g density;
    - ratio: MSE (mean over the 3 parts) of the predicted composition against the true one, recomputed from the
      (possibly mixed) masses, where all three components and a positive total are known;
    - five: competition-weighted MSE of five_z over the supervised (sample, target) entries;
    - height: MSE in z units (height statistics from `zscore` if present, else cm / 10); ndvi: MSE of ndvi_z;
    - state: cross-entropy against hard labels (state >= 0) or mixup's `state_soft` / `state_mask`;
    - interval: `interval_weight` x cross-entropy of the bin logits (B, 5, K), mean over the known (sample, target)
      entries, against the bin indices `interval` (B, 5; -1 = unknown) or mixup's `interval_soft` / `interval_mask`.

    Each mean is weighted by the batch's per-sample "weight" when present (pseudo-labelled test images count less
    than labelled ones: a sample of weight w counts w times a sample of weight 1 of the same batch).
    """
    y, y_mask = batch["y"], batch["y_mask"].bool()
    w = batch.get("weight")
    mean_np, std_np = target_stats(zscore)
    mean, std = (torch.as_tensor(a, dtype=y.dtype, device=y.device) for a in (mean_np, std_np))
    y_z = torch.where(y_mask, (y - mean) / std, torch.zeros_like(y))
    target_w = torch.as_tensor(weights, dtype=y.dtype, device=y.device)
    losses = {
        "total": masked_mean((out["total_z"] - y_z[:, TOTAL]) ** 2, y_mask[:, TOTAL], w),
        "five": masked_mean((out["five_z"] - y_z) ** 2, y_mask, target_w if w is None else w[:, None] * target_w),
    }
    _, ratio, ratio_mask = targets_to_total_ratio(torch.where(y_mask, y, torch.full_like(y, float("nan"))))
    losses["ratio"] = masked_mean(((out["ratio"] - ratio) ** 2).mean(dim=-1), ratio_mask, w)
    if "height" in out:
        h_mean, h_std = height_stats(zscore)
        h_true = torch.where(batch["height_mask"], batch["height"], torch.full_like(batch["height"], h_mean))
        losses["height"] = masked_mean(((out["height"] - h_true) / h_std) ** 2, batch["height_mask"], w)
    if "ndvi_z" in out:
        n_true = torch.where(batch["ndvi_mask"], batch["ndvi_z"], torch.zeros_like(batch["ndvi_z"]))
        losses["ndvi"] = masked_mean((out["ndvi_z"] - n_true) ** 2, batch["ndvi_mask"], w)
    if "state_logits" in out:
        losses["state"] = class_loss(out["state_logits"], batch, "state", w)
    if "interval_logits" in out:
        losses["interval"] = interval_weight * class_loss(out["interval_logits"], batch, "interval",
                                                          None if w is None else w[:, None])
    return losses


def class_loss(logits: torch.Tensor, batch: Mapping[str, torch.Tensor], key: str,
               w: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of `logits` (..., K) against the class indices `batch[key]` (-1 = unknown), or mixup's soft
    labels `{key}_soft` / `{key}_mask`; mean over the known entries, weighted by `w` when given."""
    if f"{key}_soft" in batch:
        soft, known = batch[f"{key}_soft"], batch[f"{key}_mask"]
    else:
        soft, known = soft_labels(batch[key], logits.shape[-1], dtype=logits.dtype)
    return masked_mean(-(soft * torch.log_softmax(logits, dim=-1)).sum(dim=-1), known, w)


class UncertaintyWeighting(nn.Module):
    """Learned task weighting (Kendall et al.): loss = mean_t 0.5 * (exp(-s_t) * L_t + s_t), s_t a log-variance.

    `log_vars` is a parameter of its own: the training loop puts it in a separate optimizer group.
    """

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"uncertainty weighting needs distinct task names, got {list(tasks)}")
        self.tasks = list(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))

    def forward(self, losses: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, terms): terms[t] = 0.5 * (exp(-s_t) L_t + s_t) / T, so total = sum of the terms exactly."""
        if set(losses) != set(self.tasks):
            raise ValueError(f"uncertainty weighting was built for tasks {self.tasks}, got losses {sorted(losses)}")
        n = len(self.tasks)
        terms = {
            t: 0.5 * (torch.exp(-self.log_vars[k]) * losses[t] + self.log_vars[k]) / n
            for k, t in enumerate(self.tasks)
        }
        return sum(terms.values()), terms

    def weights(self) -> dict[str, float]:
        """The effective weight 0.5 * exp(-s_t) / T of each task, for logging."""
        w = 0.5 * torch.exp(-self.log_vars.detach()) / len(self.tasks)
        return {t: float(w[k]) for k, t in enumerate(self.tasks)}


def combine_losses(
    losses: Mapping[str, torch.Tensor], uw: UncertaintyWeighting | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, per-task terms): uncertainty-weighted, or a plain sum when `uw` is None (the ablation)."""
    if uw is not None:
        return uw(losses)
    terms = dict(losses)
    return sum(terms.values()), terms


def split_terms(terms: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Primary (total, ratio, five) and auxiliary (height, ndvi, state, interval) terms for `pcgrad_step`."""
    unknown = sorted(set(terms) - set(PRIMARY_TASKS) - set(AUX_TASKS))
    if unknown:
        raise ValueError(f"unknown task terms {unknown}; known: {list(PRIMARY_TASKS + AUX_TASKS)}")
    return [terms[t] for t in PRIMARY_TASKS if t in terms], [terms[t] for t in AUX_TASKS if t in terms]


def _flat_grad(loss: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def pcgrad_step(
    primary: Sequence[torch.Tensor],
    auxiliary: Sequence[torch.Tensor],
    params: Sequence[nn.Parameter],
    plain_params: Sequence[nn.Parameter] = (),
) -> None:
    """Primary-anchored PCGrad: each auxiliary gradient that conflicts with the summed primary gradient g_p loses
    its component along g_p; the result g_p + sum(g_a) is accumulated into `params`' .grad (like backward()).

    `plain_params` (e.g. the uncertainty-weighting log-variances) get the plain gradient of the summed terms.
    """
    params = [p for p in params if p.requires_grad]
    if not primary:
        raise ValueError("pcgrad_step needs at least one primary loss term")
    g_p = _flat_grad(sum(primary), params)
    norm2 = g_p.dot(g_p)
    total = g_p.clone()
    for aux in auxiliary:
        g_a = _flat_grad(aux, params)
        dot = g_a.dot(g_p)
        if dot < 0 and norm2 > 0:
            g_a = g_a - (dot / norm2) * g_p
        total += g_a
    if plain_params:
        for p, g in zip(plain_params, torch.autograd.grad(sum(primary) + sum(auxiliary), list(plain_params),
                                                          retain_graph=True, allow_unused=True)):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g
    offset = 0
    for p in params:
        g = total[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        p.grad = g.clone() if p.grad is None else p.grad + g
