"""Stage two: train light readout heads on cached tokens, with grouped cross-validation, in minutes on a CPU.

Read top to bottom: configuration -> one head being trained (`Member`) -> one optimisation step -> one fold
(every member sees the same batches) -> cross-validation and the run folder -> the command line.

Where tokens come from is a small `TokenSource` (loaders, `tokens_fn(batch) -> (B, L, T, C)`, how to predict and
save): here a token cache (`cache_source`); the LoRA path passes a live adapted backbone, whose adapters train with
the head, and reuses everything else (`cross_validate`).
"""

from __future__ import annotations

import copy
import math
import random
import time
import tomllib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import typer
from tqdm.auto import tqdm

from biomass_cache import runs
from biomass_cache.data import DataError, read_long_csv
from biomass_cache.dataset import LABEL_KEYS, AuxSpec, TokenDataset, make_loader, store_rows
from biomass_cache.folds import grouped_folds, read_folds, write_folds
from biomass_cache.losses import (PRIMARY_TASKS, UncertaintyWeighting, combine_losses, manifold_mixup, pcgrad_step,
                                  split_terms, task_losses)
from biomass_cache.metrics import competition_r2, log_r2, log_r2_per_target, per_target_r2
from biomass_cache.targets import TARGETS, ZScore, to_density
from heads import create_head
from heads.common import HEIGHT_NAME


# ----------------------------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Every training setting; configs/default.toml documents each key (section [train])."""

    head: str = "density"  # a name in heads.HEADS
    head_kwargs: dict = field(default_factory=dict)  # passed to heads.create_head
    layers: list[int] = field(default_factory=list)  # cached block indices to read; empty = all of them
    folds: int = 5
    full: bool = False  # train one model on all images instead of cross-validating
    epochs: int = 20
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 2e-3
    uw_lr: float = 1e-2  # uncertainty-weighting log-variances: own optimizer group
    weight_decay: float = 0.05
    warmup_frac: float = 0.05  # share of all steps with a linear warmup, then cosine decay
    min_lr_ratio: float = 0.01  # final lr / peak lr
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema: bool = True  # evaluate and save an exponential moving average of the weights
    ema_decay: float = 0.99
    mixup: bool = True  # token-level manifold mixup
    mixup_alpha: float = 3.9
    mixup_prob: float = 0.96
    uw: bool = True  # uncertainty weighting of the task losses (else a plain sum)
    pcgrad: bool = True  # primary-anchored PCGrad of the auxiliary gradients (needs aux)
    aux: bool = True  # auxiliary tasks: height, NDVI, State
    tta: str | int = "all"  # OOF predictions: "all" = mean over the stored views, or one view index
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # CPU threads for torch (0 = torch's default); 1 is fastest for small heads on a busy CPU
    workers: int = 2  # DataLoader workers when streaming from disk
    preload: bool | str = "auto"  # keep the tokens in RAM: true | false | "auto" (when they fit)
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops


# keys every member of a sweep shares (they define the batches); the others may differ per member
SHARED_KEYS = ("folds", "full", "epochs", "batch_size", "eval_batch_size", "tta", "seed", "device", "threads",
               "workers", "preload")


def _check_keys(d: dict, where: str, allowed: Iterable[str]) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def load_config(path: Path | None) -> tuple[dict, list[dict], dict]:
    """A TOML file -> ([train] settings, [[train.sweep]] members, [extract] section)."""
    if path is None:
        return {}, [], {}
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise DataError(f"{path}: not a readable TOML config ({e})") from e
    train = dict(doc.get("train", {}))
    sweep = train.pop("sweep", [])
    _check_keys(train, f"{path} [train]", [f.name for f in fields(TrainConfig)])
    for k, entry in enumerate(sweep):
        _check_keys(entry, f"{path} [[train.sweep]] #{k + 1}", ["name", *_member_keys()])
    return train, sweep, doc.get("extract", {})


def _member_keys() -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.name not in SHARED_KEYS]


def resolve(base: dict, sweep: list[dict], overrides: dict, heads: list[str] | None) -> tuple[TrainConfig, dict]:
    """Config file values, then CLI flags; `--head a,b` replaces the file's sweep. Returns (base, members)."""
    cfg = replace(TrainConfig(), **{**base, **overrides})
    if heads:
        sweep = [{"name": h, "head": h} for h in heads]
    elif not sweep:
        sweep = [{"name": cfg.head}]
    names = [e.get("name", e.get("head", cfg.head)) for e in sweep]
    if len(set(names)) != len(names):
        raise DataError(f"sweep member names must be unique, got {names}")
    ablations = {k: v for k, v in overrides.items() if k in _member_keys()}
    members = {n: replace(cfg, **{**{k: v for k, v in e.items() if k != "name"}, **ablations})
               for n, e in zip(names, sweep)}
    for name, m in members.items():
        if not (m.tta == "all" or isinstance(m.tta, int)):
            raise DataError(f"tta must be 'all' or a view index, got {m.tta!r}")
        if m.preload not in (True, False, "auto"):
            raise DataError(f"preload must be true, false or 'auto', got {m.preload!r}")
        if m.epochs < 1 or m.batch_size < 1:
            raise DataError(f"epochs and batch_size must be positive (member {name})")
    return cfg, members


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------ one head in training
@dataclass
class Member:
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
    step: int = 0
    bad_in_a_row: int = 0
    skipped: int = 0

    @property
    def eval_head(self) -> torch.nn.Module:
        return self.ema if self.ema is not None else self.head

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


def build_member(name: str, cfg: TrainConfig, layers_read: list[int], signature: dict, zscore: ZScore,
                 aux: AuxSpec, total_steps: int, seed: int, device: torch.device,
                 extra_groups: Sequence[dict] = ()) -> Member:
    """A head with its optimizer and EMA copy. Groups: decayed weight matrices, undecayed biases/norms/fusion
    logits (as in nanoGPT), the UW log-variances at `uw_lr`, then `extra_groups` (e.g. per-block LoRA adapter
    groups with their own lr); all follow the same warmup + cosine schedule."""
    layers = cfg.layers or layers_read
    torch.manual_seed(seed)  # identical initial weights for a (seed, fold, member) whatever ran before
    n_states = len(aux.states) if cfg.aux and len(aux.states) > 1 else 0
    aux_spec = dict(height=True, ndvi=True, n_states=n_states) if cfg.aux else {}
    head = create_head(cfg.head, n_layers=len(layers), channels=signature["channels"], grid=signature["grid"],
                       zscore=zscore, aux=aux_spec, layers=layers, **cfg.head_kwargs).to(device)
    tasks = list(PRIMARY_TASKS) + (["height", "ndvi"] + (["state"] if n_states else []) if cfg.aux else [])
    uw = UncertaintyWeighting(tasks).to(device) if cfg.uw else None
    params = [p for p in head.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if uw is not None:
        groups.append({"params": list(uw.parameters()), "lr": cfg.uw_lr, "weight_decay": 0.0})
    groups += list(extra_groups)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total_steps, cfg.warmup_frac, cfg.min_lr_ratio))
    ema = copy.deepcopy(head).requires_grad_(False) if cfg.ema else None
    extra = [p for g in extra_groups for p in g["params"]]
    return Member(name, cfg, head, ema, uw, opt, sched, [layers_read.index(l) for l in layers],
                  torch.Generator().manual_seed(seed), zscore, n_states, extra,
                  [p.detach().clone() for p in extra] if cfg.ema else None)


@torch.no_grad()
def ema_update(ema: Sequence[torch.Tensor], live: Sequence[torch.Tensor], decay: float, step: int) -> None:
    """EMA with a warmup (decay grows as (1+t)/(10+t)) so early weights do not linger in short runs."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema, live):
        if e.dtype.is_floating_point:
            e.lerp_(p, 1 - d)
        else:
            e.copy_(p)


@contextmanager
def ema_weights(m: Member) -> Iterator[None]:
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


def backward(m: Member, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
    """Gradients of the step: primary-anchored PCGrad on the head (with auxiliary tasks), else plain backward.
    The UW log-variances and the extra parameters (adapters) always get the plain gradient."""
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


def train_step(m: Member, batch: dict, tokens: torch.Tensor,
               sync: Callable[[list[torch.nn.Parameter]], None] | None = None) -> float | None:
    """Mixup -> forward -> task losses -> UW -> (PCGrad) backward -> sync -> clip -> AdamW -> EMA.

    Returns the loss, or None for a skipped step (non-finite loss). `sync(params)` averages the gradients across
    ranks (torchrun); a rank with a non-finite loss then contributes a zero gradient so every rank still steps
    alike.
    """
    cfg = m.cfg
    b = dict(batch, tokens=tokens[:, m.layer_idx])
    if cfg.mixup:
        b = manifold_mixup(b, alpha=cfg.mixup_alpha, prob=cfg.mixup_prob, generator=m.gen, n_states=m.n_states)
    m.head.train()
    losses = task_losses(m.head(b["tokens"]), b, m.zscore)
    loss, terms = combine_losses(losses, m.uw)
    m.opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if finite:
        m.bad_in_a_row = 0
        backward(m, loss, terms)
    else:
        m.skipped += 1
        m.bad_in_a_row += 1
        if m.bad_in_a_row >= cfg.max_nonfinite:
            raise FloatingPointError(
                f"head {m.name}: {m.bad_in_a_row} non-finite losses in a row (step {m.step}; "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
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
        ema_update([*m.ema.state_dict().values(), *m.ema_extra], [*m.head.state_dict().values(), *m.extra_params],
                   cfg.ema_decay, m.step)
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


def train_fold(
    members: list[Member],
    train_loader,
    val_loader,
    val_truth: np.ndarray | None,
    tokens_fn: Callable[[dict], torch.Tensor],
    epochs: int,
    desc: str,
    extra: torch.nn.Module | None = None,
    baseline_grams: np.ndarray | None = None,
    sync: Callable[[list[torch.nn.Parameter]], None] | None = None,
) -> list[dict]:
    """Train all members on the same batches; after each epoch score each (EMA) member on the validation set.

    Returns the history rows. `val_loader` may be None (training on all data); `baseline_grams`: see `scores`;
    `extra`: the token source's trainable module (train mode while training); `sync`: see `train_step`.
    """
    history, vals = [], {}
    bar = tqdm(total=epochs * len(train_loader), desc=desc, unit="step", dynamic_ncols=True)
    for epoch in range(epochs):
        t0 = time.time()
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)
        sums = {m.name: [0.0, 0] for m in members}
        if extra is not None:
            extra.train()
        for batch in train_loader:
            tokens = tokens_fn(batch)  # read once, shared by every member
            batch = {k: v.to(tokens.device) for k, v in batch.items() if k in LABEL_KEYS}
            for m in members:
                loss = train_step(m, batch, tokens, sync)
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
            row = {"epoch": epoch + 1, "head": m.name, "lr": m.sched.get_last_lr()[0],
                   "train_loss": sums[m.name][0] / max(sums[m.name][1], 1), "skipped_steps": m.skipped,
                   "seconds": time.time() - t0}
            if val_loader is not None:
                with ema_weights(m):
                    pred = runs.components_to_grams(runs.predict_components(m.eval_head, val_loader, tokens_fn))
                s = scores(val_truth, pred, baseline_grams)
                row.update(val_competition_r2=s["competition_r2"], val_log_r2=s["log_r2"])
                vals[m.name] = s["competition_r2"]
            history.append(row)
    bar.close()
    return history


# ------------------------------------------------------------------------------- cross-validation and run folder
def fit_zscore(table: pd.DataFrame, rows: np.ndarray) -> ZScore:
    """Areal-density statistics of the training rows (plus height, which scales the height loss, when known)."""
    x, names = to_density(table[list(TARGETS)].to_numpy(float)[rows]), TARGETS
    if HEIGHT_NAME in table and np.isfinite(table[HEIGHT_NAME].to_numpy(float)[rows]).sum() > 1:
        x, names = np.column_stack([x, table[HEIGHT_NAME].to_numpy(float)[rows]]), (*TARGETS, HEIGHT_NAME)
    return ZScore.fit(x, names)


def fold_assignment(table: pd.DataFrame, out: Path, n_folds: int, seed: int, folds_csv: Path | None,
                    strict: bool) -> np.ndarray:
    """Folds from --folds-csv, else from the run folder's folds.csv, else new grouped folds; saved in the run.

    A reused file sets the number of folds; with `strict` (--folds given) it must have exactly `n_folds`.
    """
    source = folds_csv or (out / "folds.csv" if (out / "folds.csv").is_file() else None)
    if source is not None:
        folds = read_folds(source, table)
        found = sorted(set(folds.tolist()))
        if found != list(range(len(found))) or len(found) < 2 or (strict and len(found) != n_folds):
            raise DataError(f"{source}: has folds {found}; expected 0..K-1 with K >= 2"
                            + (f" and K = --folds {n_folds}" if strict else ""))
        tqdm.write(f"using the {len(found)} folds of {source}")
    else:
        folds = grouped_folds(table, n_splits=n_folds, seed=seed)
    write_folds(out / "folds.csv", table, folds)
    return folds


def _table_text(rows: list[tuple[str, dict]]) -> str:
    cols = ["competition_r2", "log_r2"] + [f"R2 {t.removesuffix('_g')}" for t in TARGETS]
    lines = [f"{'':<18}" + "".join(f"{c:>15}" for c in cols)]
    for label, s in rows:
        vals = [s["competition_r2"], s["log_r2"], *(s["per_target_r2"][t] for t in TARGETS)]
        lines.append(f"{label:<18}" + "".join(f"{v:>15.4f}" if v is not None else f"{'-':>15}" for v in vals))
    return "\n".join(lines)


def _no_barrier() -> None:
    """One process: nothing to wait for."""


@dataclass
class TokenSource:
    """Where a run's tokens come from: a token cache (`cache_source`) or a live adapted backbone (lora.py).

    The loader factories take (table rows, fold seed, aux encoding) / (rows, aux) and yield batches of the
    contract's labels plus whatever `tokens_fn(batch) -> (B, L, T, C)` reads; `predict(head, meta, rows)` gives a
    trained head's OOF grams (its `meta["tta"]` views); `save(json_path, head, meta)` writes its checkpoint.
    `extra` is a module whose trainable parameters train with the head (LoRA adapters): `extra.reset(seed)`
    re-initialises them for a fold, `extra.param_groups()` gives their optimizer groups. Under torchrun, `rank`,
    `barrier` and `sync` (gradient averaging, see `train_step`) come from the caller; only rank 0 writes files.
    """

    layers: list[int]  # block indices of the tokens `tokens_fn` returns
    signature: dict  # {"channels": C, "grid": [rows, cols]}
    fingerprint: dict  # what determined the tokens (checked when a checkpoint meets a cache)
    config: dict  # config.json's description of the source (cache or LoRA settings, data, device)
    device: torch.device
    train_loader: Callable[[np.ndarray, int, AuxSpec], Iterable[dict]]
    val_loader: Callable[[np.ndarray, AuxSpec], Iterable[dict]]
    tokens_fn: Callable[[dict], torch.Tensor]
    predict: Callable[[torch.nn.Module, dict, np.ndarray], np.ndarray]
    save: Callable[[Path, torch.nn.Module, dict], None] = runs.save_head
    extra: torch.nn.Module | None = None
    rank: int = 0
    barrier: Callable[[], None] = _no_barrier
    sync: Callable[[list[torch.nn.Parameter]], None] | None = None


def cache_source(store, table: pd.DataFrame, cfg: TrainConfig, members_cfg: dict[str, TrainConfig],
                 extract: dict | None = None) -> TokenSource:
    """Tokens read from a token store (the layers every member asks for), moved to the device per batch."""
    from biomass_cache.extract import stored_weights_path

    layers = sorted({l for m in members_cfg.values() for l in (m.layers or store.layers)})
    device = pick_device(cfg.device)
    bad_tta = [n for n, m in members_cfg.items() if m.tta != "all" and not 0 <= m.tta < store.n_views]
    if bad_tta:
        raise DataError(f"tta of {bad_tta} must be 'all' or a view index below {store.n_views} (views of "
                        f"{store.path})")
    signature = {"channels": store.channels, "grid": list(store.grid)}

    def train_loader(rows: np.ndarray, seed: int, aux: AuxSpec):
        ds = TokenDataset(store, table, rows, layers, train=True, seed=seed, preload=cfg.preload, aux=aux)
        return make_loader(ds, cfg.batch_size, shuffle=True, seed=seed, workers=cfg.workers)

    def val_loader(rows: np.ndarray, aux: AuxSpec):
        ds = TokenDataset(store, table, rows, layers, train=False, seed=0, preload=cfg.preload, view=0, aux=aux)
        return make_loader(ds, cfg.eval_batch_size, shuffle=False, seed=0, workers=cfg.workers)

    def predict(head: torch.nn.Module, meta: dict, rows: np.ndarray) -> np.ndarray:
        views = list(range(store.n_views)) if meta["tta"] == "all" else [meta["tta"]]
        idx = store_rows(store, list(table["image_id"].iloc[rows]), views)
        return runs.predict_store(head, meta, store, idx, views=meta["tta"], batch_size=cfg.eval_batch_size,
                                  device=str(device))

    config = {"extract": extract or {},
              "cache": {"path": str(store.path), "fingerprint": store.fingerprint, "layers": store.layers,
                        **signature, "n_views": store.n_views, "storage_dtype": store.storage_dtype,
                        "random_weights": store.random_weights, "weights_path": stored_weights_path(store)},
              "device": str(device)}
    return TokenSource(layers, signature, store.fingerprint, config, device, train_loader, val_loader,
                       lambda b: b["tokens"].to(device, non_blocking=True), predict)


def cross_validate(source: TokenSource, table: pd.DataFrame, data: Path, out: Path, cfg: TrainConfig,
                   members_cfg: dict[str, TrainConfig], folds_csv: Path | None = None,
                   strict_folds: bool = False) -> dict:
    """Cross-validate (or train on all data) every member on `source`'s tokens; write the run folder (rank 0);
    return metrics.json's content. `strict_folds`: a reused folds file must have exactly `cfg.folds` folds."""
    if source.extra is not None and len(members_cfg) != 1:
        raise DataError(f"a token source with trainable parameters (LoRA) trains one head, got {list(members_cfg)}")
    writer = source.rank == 0
    truth = table[list(TARGETS)].to_numpy(float)
    baseline = np.nanmean(truth, axis=0)  # log R^2 baseline of the fold scores
    out = Path(out)
    if cfg.full:
        plan = [("full", -1, np.arange(len(table)), None)]
    else:
        if writer:
            out.mkdir(parents=True, exist_ok=True)
            folds = fold_assignment(table, out, cfg.folds, cfg.seed, folds_csv, strict_folds)
        source.barrier()
        if not writer:
            folds = read_folds(out / "folds.csv", table)
        cfg = replace(cfg, folds=int(folds.max()) + 1)
        members_cfg = {n: replace(m, folds=cfg.folds) for n, m in members_cfg.items()}
        plan = [(f"fold{k}", k, np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(cfg.folds)]
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_config(out, {"train": asdict(cfg), "members": {n: asdict(m) for n, m in members_cfg.items()},
                                **source.config, "data": str(data), "torch": torch.__version__})

    oof = {n: np.full((len(table), len(TARGETS)), np.nan) for n in members_cfg}
    per_fold: dict[str, dict] = {n: {} for n in members_cfg}
    history: list[dict] = []
    for fold_name, k, tr, va in plan:
        fold_seed = cfg.seed * 1000 + k + 1
        seed_everything(fold_seed)
        zscore, aux = fit_zscore(table, tr), AuxSpec.fit(table, tr)  # the fold's training images only
        if source.extra is not None:
            source.extra.reset(fold_seed)
        train_loader = source.train_loader(tr, fold_seed, aux)
        val_loader = None if va is None else source.val_loader(va, aux)
        groups = source.extra.param_groups() if source.extra is not None else ()
        members = [build_member(n, m, source.layers, source.signature, zscore, aux, cfg.epochs * len(train_loader),
                                fold_seed + 7919 * j, source.device, groups)
                   for j, (n, m) in enumerate(members_cfg.items())]
        rows = train_fold(members, train_loader, val_loader, None if va is None else truth[va], source.tokens_fn,
                          cfg.epochs, desc=fold_name if writer else f"{fold_name} rank {source.rank}",
                          extra=source.extra, baseline_grams=baseline, sync=source.sync)
        history += [{"fold": fold_name, **r} for r in rows]
        for m in members:
            meta = {"name": m.name, "fold": k, "head": m.eval_head.config, "zscore": zscore.to_dict(),
                    "aux": aux.to_dict(), "fingerprint": source.fingerprint, "layers": m.cfg.layers or source.layers,
                    **source.signature, "tta": m.cfg.tta, "train": asdict(m.cfg), "n_train": len(tr),
                    "skipped_steps": m.skipped}
            with ema_weights(m):
                if va is not None:
                    oof[m.name][va] = source.predict(m.eval_head, meta, va)
                    per_fold[m.name][fold_name] = meta["metrics"] = scores(truth[va], oof[m.name][va], baseline)
                if writer:
                    source.save(out / fold_name / f"{m.name}.json", m.eval_head.cpu(), meta)
        if writer:
            runs.write_history(out, history)  # after every fold, so a long run can be plotted while it goes
    source.barrier()

    if cfg.full:
        metrics = {"full": True, "heads": {n: {"n_train": len(table)} for n in members_cfg}}
        if writer:
            runs.write_metrics(out, metrics)
            tqdm.write(f"trained {list(members_cfg)} on all {len(table)} images -> {out}/full/")
        return metrics
    pooled = {n: scores(truth, oof[n]) for n in members_cfg}
    ranking = sorted(members_cfg, key=lambda n: -pooled[n]["competition_r2"])
    heads_metrics = {n: {**pooled[n], "folds": per_fold[n]} for n in members_cfg}
    metrics = {**heads_metrics[ranking[0]], "best": ranking[0], "ranking": ranking, "heads": heads_metrics}
    if not writer:
        return metrics
    for n in members_cfg:
        runs.write_oof(out / f"oof_{n}.csv", table["image_id"], oof[n])
    runs.write_oof(out / "oof.csv", table["image_id"], oof[ranking[0]])
    runs.write_metrics(out, metrics)
    for n in ranking:
        tqdm.write(f"\n{n}:\n" + _table_text([*per_fold[n].items(), ("pooled OOF", pooled[n])]))
    if len(ranking) > 1:
        tqdm.write("\nranking by pooled OOF competition_r2:\n" + _table_text([(n, pooled[n]) for n in ranking]))
    tqdm.write(f"\nrun folder: {out}")
    return metrics


def run_training(cache: Path, data: Path, out: Path, cfg: TrainConfig, members_cfg: dict[str, TrainConfig],
                 folds_csv: Path | None = None, extract: dict | None = None, strict_folds: bool = False) -> dict:
    """Stage two: cross-validate every member on the token cache `cache`; see `cross_validate`."""
    from biomass_cache.store import open_store

    store = open_store(cache)
    table = read_long_csv(Path(data) / "train.csv", check_images=False)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    source = cache_source(store, table, cfg, members_cfg, extract)
    if store.random_weights:
        tqdm.write("NOTE: this cache was extracted with a RANDOMLY INITIALISED backbone: scores are a demo only")
    return cross_validate(source, table, data, out, cfg, members_cfg, folds_csv, strict_folds)


# ---------------------------------------------------------------------------------------------- command line
def train_command(
    cache: Path = typer.Option(..., "--cache", help="Token store written by `biomass extract` (split train)."),
    data: Path = typer.Option(..., "--data", help="Kaggle-format data folder holding train.csv."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (a folds.csv in it is reused)."),
    head: Optional[str] = typer.Option(None, "--head", help="Head name(s), comma-separated: trained side by side."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Number of grouped folds (5)."),
    folds_csv: Optional[Path] = typer.Option(None, "--folds-csv", help="Reuse this folds.csv (image_id, fold)."),
    full: bool = typer.Option(False, "--full", help="Train on all images (no cross-validation)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (20)."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config file (see configs/default.toml)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (16)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of the heads (2e-3)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of folds, views, init and mixup (0)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N (auto)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers when streaming (2)."),
    preload: Optional[bool] = typer.Option(None, "--preload/--no-preload",
                                           help="Keep the tokens in RAM (auto: when they fit)."),
    no_mixup: bool = typer.Option(False, "--no-mixup", help="Ablation: no manifold mixup."),
    no_uw: bool = typer.Option(False, "--no-uw", help="Ablation: plain sum of task losses."),
    no_pcgrad: bool = typer.Option(False, "--no-pcgrad", help="Ablation: plain backward, no PCGrad."),
    no_ema: bool = typer.Option(False, "--no-ema", help="Ablation: evaluate/save the raw weights."),
    no_aux: bool = typer.Option(False, "--no-aux", help="Ablation: no height/NDVI/State tasks."),
) -> None:
    """Train readout heads on cached tokens with grouped K-fold CV; writes checkpoints, OOF and metrics.

    Options left out take the --config file's value, else the default shown in parentheses.
    """
    base, sweep, extract = load_config(config)
    overrides = {k: v for k, v in dict(folds=folds, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                       device=device, workers=workers, preload=preload).items() if v is not None}
    overrides |= {k: False for k, off in dict(mixup=no_mixup, uw=no_uw, pcgrad=no_pcgrad, ema=no_ema,
                                               aux=no_aux).items() if off}
    if full:
        overrides["full"] = True
    heads = [h.strip() for h in head.split(",") if h.strip()] if head else None
    cfg, members = resolve(base, sweep, overrides, heads)
    run_training(cache, data, out, cfg, members, folds_csv=folds_csv, extract=extract,
                 strict_folds=folds is not None or "folds" in base)
