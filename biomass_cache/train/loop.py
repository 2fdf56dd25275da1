"""Stage two's training loop: light readout heads trained on tokens, in minutes on a CPU.

Read top to bottom: one head being trained (`SweepMember`) -> one optimisation step -> one fold (every member sees
the same batches). The settings it runs (`TrainConfig`, the config file's [train] section, the flags over it) are in
train/config.py; cross-validation, the token sources and the run folder in train/crossval.py; the `biomass train`
command line in cli/train.py.
"""

from __future__ import annotations

import copy
import functools
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from biomass_cache.common.metrics import competition_r2, log_r2, log_r2_per_target, per_target_r2
from biomass_cache.common.signals import check_stop
from biomass_cache.common.targets import HEIGHT_NAME, TARGETS, ZScore, to_density
from biomass_cache.heads import HEADS, create_head, run_head
from biomass_cache.heads.intervals import fit_bins
from biomass_cache.train import inference
from biomass_cache.train.config import TrainConfig
from biomass_cache.train.dataset import LABEL_KEYS, AuxSpec
from biomass_cache.train.losses import (
    PRIMARY_TASKS,
    UncertaintyWeighting,
    combine_losses,
    manifold_mixup,
    pcgrad_step,
    split_terms,
    task_losses,
)


OnEpoch = Callable[[list[dict]], "dict[str, str] | None"]  # an epoch's history rows -> members to stop, and why


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ one head in training
@dataclass
class SweepMember:
    """One head being trained: its settings, weights, EMA copy, loss weighting, optimizer and counters.

    `extra_params` are trainable tensors outside the head that train with it (LoRA adapters): clipped, averaged
    across ranks and EMA-tracked together with the head's (`ema_extra`).
    """

    name: str
    cfg: TrainConfig
    head: torch.nn.Module
    ema: torch.nn.Module | None
    uw: torch.nn.Module | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    layer_idx: list[int]  # positions of this head's layers in the tokens the loop reads
    gen: torch.Generator  # mixup randomness
    zscore: ZScore
    n_states: int  # State classes of the aux task (0 = none)
    extra_params: list[torch.nn.Parameter] = field(default_factory=list)
    ema_extra: list[torch.Tensor] | None = None
    pcgrad_split: tuple[list, list] | None = None  # (arbitrated, plain) head parameters, found at the first step
    stopped: str | None = None  # why the member stopped before the run's end (a tuning trial pruned), else None
    step: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0

    @property
    def eval_head(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.head

    @functools.cached_property
    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(EMA tensors, live tensors) of the head's state and the extra parameters, listed once: both are updated
        in place, and a state_dict per step costs a tenth of a density head's step on a CPU."""
        return ([*self.ema.state_dict().values(), *(self.ema_extra or [])],
                [*self.head.state_dict().values(), *self.extra_params])

    @property
    def closed_form(self) -> bool:
        """A head fitted in one pass (`fit_closed_form`), not by gradient steps."""
        return getattr(self.head, "closed_form", False)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer steps (head, UW, extra), in a fixed order (the same on every rank)."""
        return [p for g in self.opt.param_groups for p in g["params"]]


def lr_lambda(total_steps: int, warmup_frac: float, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to `min_ratio`."""
    warmup = max(1, round(warmup_frac * total_steps))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def fit_zscore(table: pd.DataFrame, rows: np.ndarray) -> ZScore:
    """Areal-density statistics of the training rows (plus height, which scales the height loss, when known)."""
    x, names = to_density(table[list(TARGETS)].to_numpy(float)[rows]), TARGETS
    if HEIGHT_NAME in table and np.isfinite(table[HEIGHT_NAME].to_numpy(float)[rows]).sum() > 1:
        x, names = np.column_stack([x, table[HEIGHT_NAME].to_numpy(float)[rows]]), (*TARGETS, HEIGHT_NAME)
    return ZScore.fit(x, names)


def head_param_groups(head: torch.nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """Decayed weight matrices, then undecayed biases/norms/fusion logits (as in nanoGPT: by dimension, and by
    name for biases stacked over layers, e.g. the density head's `bias1`), each split further by the head's
    per-parameter learning-rate multipliers (`FusedHead.lr_scales`); scale 1 takes the optimizer's lr."""
    scales = head.lr_scales() if hasattr(head, "lr_scales") else {}
    groups: dict[tuple[bool, float], list] = {}
    for name, p in head.named_parameters():
        if p.requires_grad:
            decay = p.ndim >= 2 and not name.rsplit(".", 1)[-1].startswith("bias")
            groups.setdefault((decay, scales.get(id(p), 1.0)), []).append(p)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0, **({} if s == 1.0 else {"lr": lr * s})}
            for (decay, s), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


def build_member(name: str, cfg: TrainConfig, layers_read: list[int], signature: dict, zscore: ZScore,
                 aux: AuxSpec, total_steps: int, seed: int, device: torch.device,
                 extra_groups: Sequence[dict] = (), train_grams: np.ndarray | None = None) -> SweepMember:
    """A head with its optimizer and EMA copy. Groups: decayed weight matrices, undecayed biases/norms/fusion
    logits (as in nanoGPT), the UW log-variances at `uw_lr`, then `extra_groups` (e.g. per-block LoRA adapter
    groups with their own lr); all follow the same warmup + cosine schedule. `train_grams` (N, 5), the fold's
    training targets, place the interval bins (needed with `interval_bins`)."""
    layers = cfg.layers or layers_read
    torch.manual_seed(seed)  # identical initial weights for a (seed, fold, member) whatever ran before
    n_states = len(aux.states) if cfg.aux and len(aux.states) > 1 else 0
    aux_spec = dict(height=True, ndvi=True, n_states=n_states) if cfg.aux else {}
    bins = 0 if getattr(HEADS.get(cfg.head), "closed_form", False) else cfg.interval_bins  # no steps, no aux task
    interval = {"interval": {"bins": bins, "blend": cfg.interval_blend}} if bins else {}
    head = create_head(cfg.head, n_layers=len(layers), channels=signature["channels"], grid=signature["grid"],
                       zscore=zscore, aux=aux_spec, layers=layers, **interval, **cfg.head_kwargs)
    if bins:
        if train_grams is None:
            raise ValueError("interval_bins needs the fold's training targets (train_grams) to place the bins")
        head.interval_head.set_bins(*fit_bins(to_density(train_grams), bins))
    head = head.to(device)
    tasks = list(PRIMARY_TASKS) + (["height", "ndvi"] + (["state"] if n_states else []) if cfg.aux else [])
    tasks += ["interval"] if bins else []
    uw = UncertaintyWeighting(tasks).to(device) if cfg.uw else None
    groups = head_param_groups(head, cfg.lr, cfg.weight_decay)
    if uw is not None:
        groups.append({"params": list(uw.parameters()), "lr": cfg.uw_lr, "weight_decay": 0.0})
    groups += list(extra_groups)
    # a closed-form head (ridge) has no trainable parameter: an empty group keeps the member's shape
    opt = torch.optim.AdamW(groups or [{"params": []}], lr=cfg.lr, weight_decay=cfg.weight_decay, fused=bool(groups))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_frac, cfg.min_lr_ratio))
    ema = copy.deepcopy(head).requires_grad_(False) if cfg.ema else None
    extra = [p for g in extra_groups for p in g["params"]]
    return SweepMember(name, cfg, head, ema, uw, opt, sched, [layers_read.index(l) for l in layers],
                  torch.Generator().manual_seed(seed), zscore, n_states, extra,
                  [p.detach().clone() for p in extra] if cfg.ema else None)


def ema_rate(decay: float, step: int) -> float:
    """The EMA's decay after `step` steps: a warmup ((1+t)/(10+t)) so early weights do not linger in short runs."""
    return min(decay, (1 + step) / (10 + step))


def validated(epoch: int, eval_every: int, epochs: int) -> bool:
    """Whether epoch `epoch` (from 0) is validated: every `eval_every`-th, and the last."""
    return (epoch + 1) % eval_every == 0 or epoch + 1 == epochs


@torch.no_grad()
def ema_update(ema: Sequence[torch.Tensor], live: Sequence[torch.Tensor], decay: float, step: int) -> None:
    """The EMA of `live` in `ema`, at `ema_rate`: one op for all floating tensors (a step's worth on a CPU)."""
    floats = [k for k, e in enumerate(ema) if e.dtype.is_floating_point]
    if floats:
        torch._foreach_lerp_([ema[k] for k in floats], [live[k] for k in floats], 1 - ema_rate(decay, step))
    for e, p in zip(ema, live):
        if not e.dtype.is_floating_point:
            e.copy_(p)


@contextmanager
def ema_weights(m: SweepMember) -> Iterator[None]:
    """Inside the block the extra parameters (adapters) hold their EMA, to pair with the EMA head (a module of its
    own) for validation, predictions and checkpoints; the live values come back afterwards."""
    if not (m.extra_params and m.ema_extra):
        yield
        return
    live = [p.detach().clone() for p in m.extra_params]
    with torch.no_grad():
        for p, e in zip(m.extra_params, m.ema_extra):
            p.copy_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, c in zip(m.extra_params, live):
                p.copy_(c)


# --------------------------------------------------------------------------------------------- one step
def pcgrad_split(primary: list[torch.Tensor], auxiliary: list[torch.Tensor],
                 params: list[torch.nn.Parameter]) -> tuple[list, list]:
    """(parameters PCGrad arbitrates, parameters given the plain gradient), exactly equivalent to PCGrad on all.

    PCGrad projects an auxiliary gradient along the primary one, so it changes nothing unless some parameter is
    reached by both (then every parameter the primary loss reaches takes part); a parameter only auxiliary losses
    reach gets its plain gradient either way. Reachability is the graph's, fixed for a head: found once.
    """
    def reached(term: torch.Tensor) -> set[int]:
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return {i for i, g in enumerate(grads) if g is not None}

    by_primary = reached(sum(primary))
    if not by_primary & set().union(*(reached(a) for a in auxiliary)):
        return [], list(params)
    return ([p for i, p in enumerate(params) if i in by_primary],
            [p for i, p in enumerate(params) if i not in by_primary])


def backward(m: SweepMember, loss: torch.Tensor, terms: dict[str, torch.Tensor],
             side: torch.Tensor | None = None) -> None:
    """Gradients of the step: primary-anchored PCGrad on the head (with auxiliary tasks), else plain backward.
    The UW log-variances and the extra parameters (adapters) always get the plain gradient; so does the token
    source's `side` loss (included in `loss`), which reaches the extra parameters alone."""
    primary, auxiliary = split_terms(terms)
    if not (m.cfg.pcgrad and auxiliary):
        loss.backward()
        return
    if m.pcgrad_split is None:
        m.pcgrad_split = pcgrad_split(primary, auxiliary, [p for p in m.head.parameters() if p.requires_grad])
    arbitrated, plain = m.pcgrad_split
    if not arbitrated:  # no parameter shared by a primary and an auxiliary task: PCGrad is the plain gradient
        loss.backward()
        return
    uw = list(m.uw.parameters()) if m.uw is not None else []
    pcgrad_step(primary, auxiliary, arbitrated, plain_params=plain + uw + m.extra_params)
    if side is not None:
        side.backward()


def train_step(m: SweepMember, batch: dict, tokens: torch.Tensor,
               sync: Callable[[list[torch.nn.Parameter]], None] | None = None, normed: bool = False,
               side: torch.Tensor | None = None) -> float | None:
    """(Bin labels ->) mixup -> forward -> task losses -> UW -> (PCGrad) backward -> sync -> clip -> AdamW -> EMA.

    Returns the loss, or None for a skipped step (non-finite loss). `sync(params)` averages the gradients across
    ranks (torchrun); a rank with a non-finite loss then contributes a zero gradient so every rank still steps
    alike. `normed`, and bf16 tokens: see `heads.run_head`. `side`: the token source's own loss on this batch
    (feature distillation, lora/features.py), added to the member's.
    """
    cfg = m.cfg
    b = dict(batch, tokens=own_layers(m, tokens))
    if cfg.interval_bins:
        b["interval"] = m.head.interval_head.labels(b["y"], b["y_mask"])
    if cfg.mixup:
        b = manifold_mixup(b, alpha=cfg.mixup_alpha, prob=cfg.mixup_prob, generator=m.gen, n_states=m.n_states,
                           n_bins=cfg.interval_bins)
    m.head.train()
    losses = task_losses(run_head(m.head, b["tokens"], normed), b, m.zscore, interval_weight=cfg.interval_weight)
    loss, terms = combine_losses(losses, m.uw)
    if side is not None:
        loss = loss + side
    m.opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if finite:
        m.bad_in_a_row = 0
        backward(m, loss, terms, side)
    else:
        m.skipped += 1
        m.bad_in_a_row += 1
        if m.bad_in_a_row >= cfg.max_nonfinite:
            raise FloatingPointError(
                f"head {m.name}: {m.bad_in_a_row} non-finite losses in a row (step {m.step}; "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in
                            {**losses, **({} if side is None else {"features": side})}.items())
                + "); check the cache for NaN/inf tokens, or lower the learning rate"
            )
        if sync is None:
            return None
    if sync is not None:
        sync(m.params)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([*m.head.parameters(), *m.extra_params], cfg.grad_clip)
    m.opt.step()
    m.sched.step()
    m.step += 1
    if m.ema is not None:
        ema_update(*m.ema_pairs, cfg.ema_decay, m.step)
    return loss.item() if finite else None


# --------------------------------------------------------------------------------------------- one fold
def scores(y_true_grams: np.ndarray, y_pred_grams: np.ndarray, baseline_grams: np.ndarray | None = None) -> dict:
    """The run's scores on the images whose five targets are all known; JSON-ready (an undefined R^2 is None).

    Fold scores pass `baseline_grams` (the full table's mean): a fold may hold a target without variance (e.g.
    only WA images, no dead matter), where the log R^2 against the fold's own mean is undefined.
    """
    ok = np.isfinite(y_true_grams).all(axis=1)
    t, p = y_true_grams[ok], y_pred_grams[ok]
    out = {
        "competition_r2": competition_r2(t, p),
        "log_r2": log_r2(t, p, baseline_grams),
        "per_target_r2": per_target_r2(t, p),
        "per_target_log_r2": log_r2_per_target(t, p, baseline_grams),
        "n_images": int(ok.sum()),
        "n_unscored": int((~ok).sum()),
    }
    for key in ("per_target_r2", "per_target_log_r2"):
        out[key] = {k: (None if not np.isfinite(v) else v) for k, v in out[key].items()}
    return out


def own_layers(m: SweepMember, tokens: torch.Tensor) -> torch.Tensor:
    """The member's layers, in its order, of the tokens (B, L, T, C) read for every member."""
    return tokens if m.layer_idx == list(range(tokens.shape[1])) else tokens[:, m.layer_idx]


def validate(m: SweepMember, val_loader, val_truth: np.ndarray, tokens_fn: Callable[[dict], torch.Tensor],
             baseline_grams: np.ndarray | None, normed: bool = False) -> dict:
    """The (EMA) member's validation scores as history columns."""
    with ema_weights(m):
        pred = inference.predict_loader(m.eval_head, val_loader, lambda b: own_layers(m, tokens_fn(b)),
                                        normed=normed).grams
    s = scores(val_truth, pred, baseline_grams)
    return {"val_competition_r2": s["competition_r2"], "val_log_r2": s["log_r2"]}


@torch.no_grad()
def fit_closed_form(m: SweepMember, fit_loader: Iterable[dict], tokens_fn: Callable[[dict], torch.Tensor],
                    groups: np.ndarray, desc: str, val_loader=None, val_truth: np.ndarray | None = None,
                    baseline_grams: np.ndarray | None = None) -> dict:
    """Fit a closed-form head (`closed_form = True`, e.g. ridge) on one pass over `fit_loader`: every stored view of
    the training images once, the samples the gradient heads draw their views from. No optimizer, EMA or mixup.
    `groups` (per table row) keeps an image's views and a visit's images together in the head's inner CV.
    Returns its history row (epoch 1)."""
    t0, parts = time.time(), []
    for batch in fit_loader:
        known = batch["y_mask"][:, :3].all(dim=1)  # images with all three components
        tokens = own_layers(m, tokens_fn(batch)).float()
        parts.append((m.head.pooled(tokens[known.to(tokens.device)]), batch["y"][known, :3], batch["index"][known]))
    features, y, index = (torch.cat(x) for x in zip(*parts))
    report = m.head.fit(features, y.to(features.device), groups[index.numpy()])
    m.ema = None  # the fit is the model: no trajectory to average
    tqdm.write(f"{desc} {m.name}: closed-form fit on {len(y)} views: " + ", ".join(
        f"{k}={[round(v, 4) for v in x] if isinstance(x, list) else round(x, 4)}" for k, x in report.items()))
    row = {"epoch": 1, "head": m.name, "train_loss": float("nan"), "skipped_steps": 0, "seconds": time.time() - t0}
    return row if val_loader is None else {**row, **validate(m, val_loader, val_truth, tokens_fn, baseline_grams)}


def train_fold(
    members: list[SweepMember],
    train_loader,
    val_loader,
    val_truth: np.ndarray | None,
    tokens_fn: Callable[[dict], torch.Tensor],
    epochs: int,
    desc: str,
    extra: torch.nn.Module | None = None,
    baseline_grams: np.ndarray | None = None,
    sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
    on_epoch: OnEpoch | None = None,
    fit_loader: Iterable[dict] | None = None,
    groups: np.ndarray | None = None,
    eval_every: int = 1,
    normed: bool = False,
) -> list[dict]:
    """Train all members on the same batches; every `eval_every` epochs and after the last, score each (EMA) member
    on the validation set (it only reads the weights: the training is the same whatever `eval_every`).

    Returns the history rows. `val_loader` may be None (training on all data); `baseline_grams`: see `scores`;
    `extra`: the token source's trainable module (train mode while training; `extra.side_loss(batch, tokens)` its
    own loss term on a batch, or None); `sync`: see `train_step`;
    `on_epoch(rows)` sees each epoch's history rows, with validation columns in the validated epochs (a tuning
    trial reports those and may stop the fold by raising); it may return {member name: reason} to stop some members
    (tuning trials side by side, one pruned): they train no more, and their `stopped` says why.
    Closed-form members are fitted first on `fit_loader` with `groups` (`fit_closed_form`): one history row each.
    `normed`: `tokens_fn` gives tokens with the heads' input LayerNorm applied (heads.run_head).
    """
    vals: dict[str, float] = {}
    history = [fit_closed_form(m, fit_loader, tokens_fn, groups, desc, val_loader, val_truth, baseline_grams)
               for m in members if m.closed_form]
    if history and on_epoch is not None:
        on_epoch(history)
    members = [m for m in members if not m.closed_form]
    if not members:
        return history
    bar = tqdm(total=epochs * len(train_loader), desc=desc, unit="step", dynamic_ncols=True)
    for epoch in range(epochs):
        t0 = time.time()
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        sums = {m.name: [0.0, 0] for m in members}
        if extra is not None:
            extra.train()
        for batch in train_loader:
            check_stop()
            tokens = tokens_fn(batch)  # read once, shared by every member
            side = None if extra is None else extra.side_loss(batch, tokens)  # one member when there is an extra
            batch = {k: v.to(tokens.device) for k, v in batch.items() if k in LABEL_KEYS}
            for m in members:
                loss = train_step(m, batch, tokens, sync, normed, side)
                if loss is not None:
                    sums[m.name][0] += loss
                    sums[m.name][1] += 1
            bar.update()
            bar.set_postfix_str(f"ep {epoch + 1} loss " + " ".join(
                f"{n}={s / max(c, 1):.3f}" for n, (s, c) in sums.items()) + (" | val R2 " + " ".join(
                f"{n}={v:.3f}" for n, v in vals.items()) if vals else ""))
        if extra is not None:
            extra.eval()
        for m in members:
            row = {"epoch": epoch + 1, "head": m.name, "lr": m.cfg.lr * m.sched.lr_lambdas[0](m.sched.last_epoch),
                   "train_loss": sums[m.name][0] / max(sums[m.name][1], 1), "skipped_steps": m.skipped,
                   "seconds": time.time() - t0}
            if val_loader is not None and validated(epoch, eval_every, epochs):
                row.update(validate(m, val_loader, val_truth, tokens_fn, baseline_grams, normed))
                vals[m.name] = row["val_competition_r2"]
            history.append(row)
        if on_epoch is not None:
            stop = on_epoch(history[-len(members):]) or {}
            for m in members:
                m.stopped = stop.get(m.name, m.stopped)
            members = [m for m in members if m.stopped is None]
            if not members:
                break
    bar.close()
    return history
