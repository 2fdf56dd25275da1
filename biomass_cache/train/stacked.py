"""The K folds of one head trained as one stacked model: each step runs every fold's own batch through the head at
once (`torch.func.vmap` over the folds' stacked weights), so a GPU does one pass of K-fold work instead of K small ones.

Every fold keeps what makes it that fold: its batches (its loader, in its own seeded order and views), its initial
weights, target statistics, learning-rate schedule, gradient clipping, AdamW moments, EMA and skipped steps. Folds whose
last batch is smaller are padded with rows every loss masks out, so each fold's update is the one it makes alone: the
OOF predictions match the fold-by-fold loop within float tolerance (tested on the CPU, heads without dropout; with
dropout the masks are drawn per fold, not in the same order).

Used where it measures faster, a GPU (`stack_folds = "auto"`); on a CPU the fold-by-fold loop is faster. It covers
the plain recipe; `stack_reason` names what it does not cover (mixup, uncertainty weighting, auxiliary and interval
tasks, several heads side by side, a LoRA backbone, closed-form heads, a tuning trial), which train fold by fold.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from biomass_cache.common.signals import check_stop
from biomass_cache.heads import HEADS
from biomass_cache.train.config import TrainConfig
from biomass_cache.train.dataset import LABEL_KEYS
from biomass_cache.train.loop import SweepMember, ema_rate, head_param_groups, own_layers, validate, validated
from biomass_cache.train.losses import combine_losses, task_losses

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as the fold-by-fold loop uses them
PADDING = {"y_mask": False, "height_mask": False, "ndvi_mask": False, "state": -1, "weight": 0.0}


def stack_reason(cfg: TrainConfig, members: dict[str, TrainConfig], extra: bool, tuning: bool) -> str | None:
    """Why the folds of this run cannot be stacked, or None when they can."""
    if len(members) != 1:
        return "several heads side by side"
    m = next(iter(members.values()))
    reasons = [("a LoRA backbone", extra), ("a tuning trial (reports fold by fold)", tuning), ("--full", cfg.full),
               ("a closed-form head", getattr(HEADS[m.head], "closed_form", False)), ("mixup", m.mixup),
               ("uncertainty weighting", m.uw), ("auxiliary tasks", m.aux), ("interval bins", m.interval_bins > 0)]
    return next((what for what, found in reasons if found), None)


@dataclass
class Fold:
    """One fold's part of a stacked run."""

    name: str
    member: SweepMember  # built as for the fold-by-fold loop: its head's weights start the stack
    train_loader: object
    val_loader: object
    val_truth: np.ndarray


def pad(batch: dict, size: int) -> dict:
    """`batch` grown to `size` rows by repeating its first row with every loss masked out (weight 0)."""
    n = len(batch["y"])
    if n == size:
        return batch
    out = {}
    for k, v in batch.items():
        filler = v[:1].expand(size - n, *v.shape[1:]).clone()
        if k in PADDING:
            filler.fill_(PADDING[k])
        out[k] = torch.cat([v, filler])
    return out


@torch.no_grad()
def stacked_adamw(params: dict, grads: dict, moments: dict, lr: torch.Tensor, steps: torch.Tensor,
                  decay: dict[str, float], scale: dict[str, float], live: torch.Tensor) -> None:
    """torch.optim.AdamW's update, each fold (leading dim) with its own lr and step count; folds not `live` (a skipped
    step) keep their weights and moments."""
    b1, b2 = BETAS
    for name, p in params.items():
        shape = (-1,) + (1,) * (p.ndim - 1)
        g, (m, v) = grads[name], moments[name]
        rate, n, keep = (lr * scale[name]).view(shape), steps.view(shape), live.view(shape)
        new_m, new_v = m.lerp(g, 1 - b1), v * b2 + (1 - b2) * g * g
        denom = (new_v.sqrt() / (1 - b2 ** n).sqrt()) + EPS
        new_p = p * (1 - rate * decay[name]) - (rate / (1 - b1 ** n)) * new_m / denom
        p.copy_(torch.where(keep, new_p, p))
        m.copy_(torch.where(keep, new_m, m))
        v.copy_(torch.where(keep, new_v, v))


def train_stacked(folds: Sequence[Fold], tokens_fn: Callable[[dict], torch.Tensor], epochs: int, eval_every: int,
                  normed: bool, baseline_grams: np.ndarray) -> list[list[dict]]:
    """Train every fold's member as one stacked model; returns each fold's history rows. Afterwards each member's
    head and EMA hold that fold's weights, as after `loop.train_fold`."""
    members = [f.member for f in folds]
    cfg = members[0].cfg  # the same settings in every fold; the schedules differ with the folds' batch counts
    schedules = [m.sched.lr_lambdas[0] for m in members]
    params, buffers = stack_module_state([m.head for m in members])
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    ema = {k: v.detach().clone() for k, v in params.items()} if cfg.ema else None
    base = copy.deepcopy(members[0].head).to("meta").train()
    moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
    names = {id(p): n for n, p in members[0].head.named_parameters()}
    groups = head_param_groups(members[0].head, cfg.lr, cfg.weight_decay)
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    scale = {names[id(p)]: g.get("lr", cfg.lr) / cfg.lr for g in groups for p in g["params"]}
    k_folds = len(folds)
    steps = torch.zeros(k_folds, dtype=torch.long)

    def forward(p: dict, b: dict, x: torch.Tensor) -> dict:
        return functional_call(base, (p, b), (x,), {"normed": normed})

    heads = vmap(forward, randomness="different")
    n_batches = max(len(f.train_loader) for f in folds)
    bar = tqdm(total=epochs * n_batches, desc=f"{k_folds} folds stacked", unit="step", dynamic_ncols=True)
    history: list[list[dict]] = [[] for _ in folds]
    for epoch in range(epochs):
        t0 = time.time()
        for f in folds:
            f.train_loader.dataset.set_epoch(epoch)
        sums = [[0.0, 0] for _ in folds]
        for batches in _zip_longest([iter(f.train_loader) for f in folds]):
            check_stop()
            active = torch.tensor([b is not None for b in batches])
            size = max(len(b["y"]) for b in batches if b is not None)
            filled = [pad(b if b is not None else next(x for x in batches if x is not None), size) for b in batches]
            tokens = torch.stack([own_layers(members[0], tokens_fn(b)) for b in filled])  # (K, B, L, T, C)
            labels = [{k: v.to(tokens.device) for k, v in b.items() if k in LABEL_KEYS} for b in filled]
            with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=tokens.dtype == torch.bfloat16):
                out = heads(params, buffers, tokens)
            losses = [combine_losses(task_losses({k: v[r] for k, v in out.items()}, labels[r], members[r].zscore,
                                                 interval_weight=cfg.interval_weight))[0] for r in range(k_folds)]
            values = torch.stack(losses).detach().float().cpu()  # one device sync per step, not one per fold
            finite = torch.isfinite(values) & active
            for r, m in enumerate(members):
                if active[r]:
                    skip(m, folds[r].name, bool(finite[r]))
            total = sum(l for l, ok in zip(losses, finite) if ok)
            if not isinstance(total, torch.Tensor):
                continue
            grads = dict(zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True)))
            grads = {k: torch.zeros_like(params[k]) if g is None else g for k, g in grads.items()}
            if cfg.grad_clip > 0:
                norm = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
                coef = (cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
                grads = {k: g * coef.view((-1,) + (1,) * (g.ndim - 1)) for k, g in grads.items()}
            lr = torch.tensor([cfg.lr * f(int(s)) for f, s in zip(schedules, steps)], dtype=torch.float32)
            live = finite.to(next(iter(params.values())).device)
            steps = steps + finite.long()
            stacked_adamw(params, grads, moments, lr.to(live.device), steps.to(live.device).float().clamp(min=1),
                          decay, scale, live)
            if ema is not None:
                d = torch.tensor([ema_rate(cfg.ema_decay, int(s)) for s in steps])
                with torch.no_grad():
                    for name, e in ema.items():
                        w = (1 - d).to(e.device).view((-1,) + (1,) * (e.ndim - 1))
                        e.copy_(torch.where(live.view(w.shape), e.lerp(params[name], w.to(e.dtype)), e))
            for r in range(k_folds):
                if finite[r]:
                    sums[r][0] += float(values[r])
                    sums[r][1] += 1
            bar.update()
        for r, (f, m) in enumerate(zip(folds, members)):
            m.step = int(steps[r])
            row = {"epoch": epoch + 1, "head": m.name, "lr": cfg.lr * schedules[r](m.step),
                   "train_loss": sums[r][0] / max(sums[r][1], 1), "skipped_steps": m.skipped,
                   "seconds": time.time() - t0}
            if validated(epoch, eval_every, epochs):  # the last always is: each member then holds its final weights
                load(m, params, ema, r)
                row.update(validate(m, f.val_loader, f.val_truth, tokens_fn, baseline_grams, normed))
            history[r].append(row)
    bar.close()
    return history


def skip(m: SweepMember, fold: str, finite: bool) -> None:
    """Count a fold's skipped (non-finite) step; `max_nonfinite` in a row stop the run, as in `loop.train_step`."""
    if finite:
        m.bad_in_a_row = 0
        return
    m.skipped += 1
    m.bad_in_a_row += 1
    if m.bad_in_a_row >= m.cfg.max_nonfinite:
        raise FloatingPointError(f"head {m.name} {fold}: {m.bad_in_a_row} non-finite losses in a row (step {m.step}); "
                                 "check the cache for NaN/inf tokens, or lower the learning rate")


def load(m: SweepMember, params: dict, ema: dict | None, r: int) -> None:
    """Fold r's slice of the stacked weights into its member's head (and EMA copy)."""
    with torch.no_grad():
        for name, p in m.head.named_parameters():
            p.copy_(params[name][r])
        if ema is not None and m.ema is not None:
            for name, p in m.ema.named_parameters():
                p.copy_(ema[name][r])


def _zip_longest(iterators: list) -> Iterator[list[dict | None]]:
    """Each step's batches of every fold (None for a fold whose epoch has ended)."""
    while True:
        batches = [next(it, None) for it in iterators]
        if all(b is None for b in batches):
            return
        yield batches

