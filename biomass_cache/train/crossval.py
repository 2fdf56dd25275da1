"""Stage two's cross-validation: folds, the token source and the run folder (`biomass train` is cli/train.py).

`cross_validate` trains every member of a sweep fold by fold with train/loop.py's loop (`train_fold`), then writes the
run folder (runs.py): checkpoints, OOF predictions, metrics, history, plots. Where tokens come from is a small
`TokenSource` (loaders, `tokens_fn(batch) -> (B, L, T, C)`, how to predict and save): here a token cache
(`cache_source`, `run_training`); the LoRA path (biomass_cache.lora) passes a live adapted backbone, whose adapters
train with the head, and reuses everything else.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from biomass_cache.common.data import read_training_table
from biomass_cache.common.distributed import resolve_device
from biomass_cache.common.errors import DataError
from biomass_cache.common.folds import fold_assignment, read_folds, visit_groups
from biomass_cache.common.io import check_output_folder
from biomass_cache.common.lock import WriterLock
from biomass_cache.common.metrics import collapsed_targets
from biomass_cache.common.targets import TARGETS
from biomass_cache.heads import HEADS
from biomass_cache.store.layout import open_store
from biomass_cache.store.reduce import Reduction
from biomass_cache.train import inference, runs
from biomass_cache.train.config import TrainConfig
from biomass_cache.train.bank import DTYPES, BankPlan, TokenBank, plan_bank, training_precision
from biomass_cache.train.dataset import AuxSpec, TokenDataset, batch_tokens, make_loader, store_rows
from biomass_cache.train.loop import (OnEpoch, build_member, ema_weights, fit_zscore, scores, seed_everything,
                                      train_fold)
from biomass_cache.train.stacked import Fold, stack_reason, train_stacked

# settings only gradient training reads: a closed-form head (ridge) ignores them, and says so when they are set
GRADIENT_KEYS = ("epochs", "batch_size", "lr", "uw_lr", "weight_decay", "warmup_frac", "min_lr_ratio", "grad_clip",
                 "ema", "ema_decay", "mixup", "mixup_alpha", "mixup_prob", "uw", "pcgrad", "max_nonfinite",
                 "interval_bins", "interval_weight", "interval_blend")


# ------------------------------------------------------------------------------- cross-validation and run folder
DIVERGED_R2 = -10.0  # a pooled OOF score this far below the mean predictor's (0) is a diverged model, not a weak one


def _table_text(rows: list[tuple[str, dict]]) -> str:
    cols = ["competition_r2", "log_r2"] + [f"R2 {t.removesuffix('_g')}" for t in TARGETS]
    lines = [f"{'':<18}" + "".join(f"{c:>15}" for c in cols)]
    for label, s in rows:
        vals = [s["competition_r2"], s["log_r2"], *(s["per_target_r2"][t] for t in TARGETS)]
        lines.append(f"{label:<18}" + "".join(f"{'-':>15}" if v is None else f"{v:>15.4f}" if abs(v) < 1e6
                                              else f"{v:>15.3g}" for v in vals))  # a diverged head's -1e52 fits
    return "\n".join(lines)


def _no_barrier() -> None:
    """One process: nothing to wait for."""


@dataclass
class TokenSource:
    """Where a run's tokens come from: a token cache (`cache_source`) or a live adapted backbone (biomass_cache.lora).

    The loader factories take (table rows, fold seed, aux encoding) / (rows, aux) and yield batches of the
    contract's labels plus whatever `tokens_fn(batch) -> (B, L, T, C)` reads; `predict(head, meta, rows)` gives a
    trained head's OOF grams (its `meta["tta"]` views); `save(json_path, head, meta)` writes its checkpoint.
    `extra` is a module whose trainable parameters train with the head (LoRA adapters): `extra.reset(seed)`
    re-initialises them for a fold, `extra.param_groups()` gives their optimizer groups, `extra.side_loss(batch,
    tokens)` a loss term of its own on a training batch (or None). `fit_loader(rows, aux)`
    yields every stored view of the rows once, for closed-form heads (None: the source cannot fit them). Under
    torchrun, `rank`, `barrier` and `sync` (gradient averaging, see `train_step`) come from the caller; only rank 0
    writes files.
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
    write_artefacts: Callable[[Path], None] | None = None  # files the run folder needs beside config.json
    fit_loader: Callable[[np.ndarray, AuxSpec], Iterable[dict]] | None = None
    bank_plan: BankPlan | None = None  # how the tokens are held (bank.py); None: streamed, or not from a cache

    @property
    def normed(self) -> bool:
        """`tokens_fn` gives tokens with the heads' input LayerNorm applied (heads.run_head)."""
        return self.bank_plan is not None and self.bank_plan.normed


def cache_source(store, table: pd.DataFrame, cfg: TrainConfig, members_cfg: dict[str, TrainConfig],
                 extract: dict | None = None) -> TokenSource:
    """Tokens read from a token store (the layers every member asks for), held in a bank (bank.py) where they fit
    (`preload` true or "auto"), else streamed from the store and moved to the device per batch."""
    layers = sorted({l for m in members_cfg.values() for l in (m.layers or store.layers)})
    if not set(layers) <= set(store.layers):
        raise DataError(f"layers {sorted(set(layers) - set(store.layers))} are not in the token store {store.path} "
                        f"(it has {store.layers}); fix [train] layers or re-extract with them")
    device = resolve_device(cfg.device)
    bad_tta = [n for n, m in members_cfg.items() if m.tta != "all" and not 0 <= m.tta < store.n_views]
    if bad_tta:
        raise DataError(f"tta of {bad_tta} must be 'all' or a view index below {store.n_views} (views of "
                        f"{store.path})")
    signature = {"channels": store.channels, "grid": list(store.grid)}
    views = list(range(store.n_views))
    every = store_rows(store, list(table["image_id"]), views)
    precision, plan = token_plan(store, len(every), len(views), len(layers), device, cfg, members_cfg)
    dtype = DTYPES[precision]

    @functools.cache
    def shared() -> TokenBank | None:
        """The run's tokens, loaded at the first fold's first use (not for a run refused before it) and shared by
        every fold."""
        return None if plan is None else TokenBank.load(store, every, views, layers, plan)

    def train_loader(rows: np.ndarray, seed: int, aux: AuxSpec):
        ds = TokenDataset(store, table, rows, layers, train=True, seed=seed, aux=aux, bank=shared())
        return make_loader(ds, cfg.batch_size, shuffle=True, seed=seed, workers=cfg.workers)

    def val_loader(rows: np.ndarray, aux: AuxSpec, view: int = 0):
        ds = TokenDataset(store, table, rows, layers, train=False, seed=0, view=view, aux=aux, bank=shared())
        return make_loader(ds, cfg.eval_batch_size, shuffle=False, seed=0, workers=cfg.workers)

    def fit_loader(rows: np.ndarray, aux: AuxSpec) -> Iterable[dict]:
        """Every view of the rows, batch by batch; iterable again for each closed-form member of a sweep."""
        return Chain([val_loader(rows, aux, v) for v in views])

    def predict(head: torch.nn.Module, meta: dict, rows: np.ndarray) -> np.ndarray:
        """OOF grams exactly as `biomass predict` gives them (fp32 on the stored tokens): from the bank unless it
        holds bf16 values, which the stored tokens are not."""
        bank = None if plan is None or plan.dtype == torch.bfloat16 else shared()
        return inference.predict_store(head, meta, store, every[rows], views=meta["tta"],
                                       batch_size=cfg.eval_batch_size,
                                       device=str(device), bank=bank).grams  # no workers: their start costs more

    config = {"extract": extract or {},
              # paths absolute: a run is used from other folders (export, predict, submit)
              "cache": {"path": str(Path(store.path).resolve()), "fingerprint": store.fingerprint,
                        "layers": store.layers, **signature, "n_views": store.n_views,
                        "storage_dtype": store.storage_dtype, "random_weights": store.random_weights,
                        "weights_path": store.weights_path},
              "device": str(device), "precision": precision,
              "tokens": "streamed from the store" if plan is None else plan.describe()}
    reduction = Reduction.of_store(store)  # the run carries its projection, so test stores are reduced alike
    return TokenSource(layers, signature, store.fingerprint, config, device, train_loader, val_loader,
                       lambda b: batch_tokens(b, shared(), device, dtype), predict,
                       write_artefacts=None if reduction is None else lambda out: reduction.save(out / "reduction"),
                       fit_loader=fit_loader, bank_plan=plan)


@dataclass(frozen=True)
class Chain:
    """Loaders one after the other, each time it is iterated."""

    loaders: list

    def __iter__(self):
        return itertools.chain.from_iterable(self.loaders)


def token_plan(store, n_rows: int, n_views: int, n_layers: int, device: torch.device, cfg: TrainConfig,
               members_cfg: dict[str, TrainConfig]) -> tuple[str, BankPlan | None]:
    """(compute precision, where the run's tokens are held: None = streamed from the store).

    bf16 only where every member trains by gradients (a closed-form head solves in fp32); the LayerNorm applied
    once where every member's head starts with it and none mixes raw tokens (mixup). `preload` false streams;
    "auto" streams what does not fit, saying so; true refuses it.
    """
    heads = [HEADS[m.head] for m in members_cfg.values()]
    precision = training_precision(cfg.precision, device)
    if any(getattr(h, "closed_form", False) for h in heads):
        precision = "fp32"
    if cfg.preload is False:
        return precision, None
    norm = all(h.input_norm for h in heads) and not any(m.mixup for m in members_cfg.values())
    plan, refused = plan_bank(store, n_rows, n_views, n_layers, device, precision, norm)
    if plan is None:
        advice = "`biomass reduce` the store (about 30x smaller), or train on a device with more memory"
        if cfg.preload is True:
            raise DataError(f"the tokens of {store.path} do not fit: {'; '.join(refused)}; {advice}, or set "
                            "preload false (stream them from the store, far slower)")
        tqdm.write(f"note: the tokens of {store.path} do not fit ({'; '.join(refused)}): streaming them from the "
                   f"store at every epoch, far slower; {advice}")
    return precision, plan


def cross_validate(source: TokenSource, table: pd.DataFrame, data: Path, out: Path, cfg: TrainConfig,
                   members_cfg: dict[str, TrainConfig], folds_csv: Path | None = None,
                   strict_folds: bool = False, on_epoch: OnEpoch | None = None) -> dict:
    """Cross-validate (or train on all data) every member on `source`'s tokens; write the run folder (rank 0);
    return metrics.json's content. `strict_folds`: a reused folds file must have exactly `cfg.folds` folds.
    The caller holds `out` (runs.claim_run_dir) from before its expensive start; `on_epoch(rows)`: each epoch's
    history rows (with their fold), see `train_fold`; the members it stops are left out of the run's scores, files
    and models, and listed under metrics.json's `stopped`."""
    run = CrossValidation(source, table, data, out, cfg, members_cfg, folds_csv, strict_folds)
    if stack_folds(source, cfg, members_cfg, tuning=on_epoch is not None):
        train_stacked_runs([run])
    else:
        run.train_fold_by_fold(on_epoch)
    return run.summarize()


def cross_validate_seeds(source: TokenSource, table: pd.DataFrame, data: Path, out: Path, cfg: TrainConfig,
                         members_cfg: dict[str, TrainConfig], seeds: list[int], folds_csv: Path | None = None,
                         strict_folds: bool = False, finished: Callable[[int], None] = lambda seed: None
                         ) -> dict[int, dict]:
    """`cross_validate` once per seed into `out`/seed{S} (`biomass train --seeds`), all on the same folds
    (`ensemble_folds`): the runs differ by their training randomness alone (initial weights, batch order, views),
    and each is an ordinary run folder (an ensemble member). Where the folds stack (`stack_folds`: a GPU by
    default), every fold of every seed trains as one stacked model, one pass of seeds x folds work; elsewhere the
    seeds train one after another, each run's files written (and `finished(seed)` called) as soon as it ends, so a
    stop keeps the seeds already trained. Returns each seed's metrics.json content."""
    if all(getattr(HEADS[m.head], "closed_form", False) for m in members_cfg.values()):
        tqdm.write(f"note: {', '.join(members_cfg)} fitted in closed form, without randomness: every seed gives the "
                   "same run")
    reused = None if folds_csv or cfg.full else ensemble_folds(out, seeds)
    shared = folds_csv or reused
    runs_ = []
    for s in seeds:
        try:
            runs_.append(CrossValidation(source, table, data, seed_dir(out, s), replace(cfg, seed=s),
                                         {n: replace(m, seed=s) for n, m in members_cfg.items()}, shared, strict_folds))
        except DataError as e:
            if reused is None:
                raise
            raise DataError(f"{e}; a seed ensemble keeps the folds already in {out} (its folds.csv and "
                            f"seed*/folds.csv): remove them all, or write to another --out, for new ones") from None
        if shared is None and not cfg.full:
            shared = runs_[0].out / "folds.csv"  # the first seed made them: the others take them
    if stack_folds(source, cfg, members_cfg, tuning=False):
        train_stacked_runs(runs_)
        return {s: run.summarize() for s, run in zip(seeds, runs_)}
    metrics = {}
    for s, run in zip(seeds, runs_):
        run.train_fold_by_fold(None)
        metrics[s] = run.summarize()
        finished(s)
    return metrics


def ensemble_folds(out: Path, seeds: list[int]) -> Path | None:
    """The folds a seed ensemble in `out` reuses without --folds-csv: those of a run trained in `out` itself, else
    of one of its seed folders (an ensemble grown by more seeds stays on its folds); None: the first seed makes
    them."""
    found = [out / "folds.csv", *(seed_dir(out, s) / "folds.csv" for s in seeds), *sorted(out.glob("seed*/folds.csv"))]
    return next((p for p in found if p.is_file()), None)


def seed_dir(out: Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


def train_stacked_runs(runs_: list["CrossValidation"]) -> None:
    """Every fold of every run (same settings but the seed) trained as one stacked model (stacked.py)."""
    folds = [(run, run.start(*p)) for run in runs_ for p in run.plan]
    first = runs_[0]
    trained = train_stacked([Fold(f.name if len(runs_) == 1 else f"seed{run.cfg.seed} {f.name}", f.members[0],
                                  f.train_loader, f.val_loader, run.truth[f.va]) for run, f in folds],
                            first.source.tokens_fn, first.cfg.epochs, first.cfg.eval_every, first.source.normed,
                            first.baseline)
    for (run, f), rows in zip(folds, trained):
        run.finish(f, rows)


class CrossValidation:
    """One run folder's cross-validation: its folds (`plan`), then each fold started (statistics, loaders,
    members), trained by a loop and finished (OOF, scores, checkpoints), then the run's scores and files."""

    def __init__(self, source: TokenSource, table: pd.DataFrame, data: Path, out: Path, cfg: TrainConfig,
                 members_cfg: dict[str, TrainConfig], folds_csv: Path | None, strict_folds: bool):
        if source.extra is not None and len(members_cfg) != 1:
            raise DataError(f"a token source with trainable parameters (LoRA) trains one head, got "
                            f"{list(members_cfg)}")
        self.source, self.table, self.data, self.out = source, table, Path(data), Path(out)
        self.writer = source.rank == 0
        check_heads(source, table, members_cfg)
        self.truth = table[list(TARGETS)].to_numpy(float)
        self.baseline = np.nanmean(self.truth, axis=0)  # log R^2 baseline of the fold scores
        self.inner = inner_groups(table)  # closed-form heads: groups of their inner CV
        if cfg.full:
            self.plan = [("full", -1, np.arange(len(table)), None)]
        else:
            if self.writer:
                folds = fold_assignment(table, self.out, cfg.folds, cfg.seed, folds_csv, strict_folds, cfg.stratify,
                                        self.data / "train.csv")
            source.barrier()
            if not self.writer:
                folds = read_folds(self.out / "folds.csv", table)
            cfg = replace(cfg, folds=int(folds.max()) + 1)
            members_cfg = {n: replace(m, folds=cfg.folds) for n, m in members_cfg.items()}
            self.plan = [(f"fold{k}", k, np.flatnonzero(folds != k), np.flatnonzero(folds == k))
                         for k in range(cfg.folds)]
        self.cfg, self.members_cfg = cfg, members_cfg
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            runs.write_config(self.out, {"train": asdict(cfg), "members": {n: asdict(m) for n, m in
                                                                          members_cfg.items()},
                                         **source.config, "data": str(Path(data).resolve()),
                                         "torch": torch.__version__})
            if source.write_artefacts is not None:
                source.write_artefacts(self.out)
        self.oof = {n: np.full((len(table), len(TARGETS)), np.nan) for n in members_cfg}
        self.per_fold: dict[str, dict] = {n: {} for n in members_cfg}
        self.history: list[dict] = []
        self.stopped: dict[str, str] = {}  # members stopped by `on_epoch` (pruned trials): name -> fold and reason

    def start(self, fold_name: str, k: int, tr: np.ndarray, va: np.ndarray | None) -> SimpleNamespace:
        """A fold's statistics (its training images only), loaders and members, seeded as the fold's own."""
        source, cfg = self.source, self.cfg
        fold_seed = cfg.seed * 1000 + k + 1
        seed_everything(fold_seed)
        zscore, aux = fit_zscore(self.table, tr), AuxSpec.fit(self.table, tr)
        if source.extra is not None:
            source.extra.reset(fold_seed)
        train_loader = source.train_loader(tr, fold_seed, aux)
        groups = source.extra.param_groups() if source.extra is not None else ()
        members = [build_member(n, m, source.layers, source.signature, zscore, aux, cfg.epochs * len(train_loader),
                                fold_seed + 7919 * j, source.device, groups, self.truth[tr])
                   for j, (n, m) in enumerate(self.members_cfg.items()) if n not in self.stopped]
        return SimpleNamespace(name=fold_name, k=k, tr=tr, va=va, zscore=zscore, aux=aux, train_loader=train_loader,
                               val_loader=None if va is None else source.val_loader(va, aux), members=members)

    def finish(self, f: SimpleNamespace, rows: list[dict]) -> None:
        """A trained fold's history, OOF predictions, scores and checkpoints."""
        source = self.source
        self.history.extend({"fold": f.name, **r} for r in rows)
        self.stopped.update({m.name: f"{f.name}: {m.stopped}" for m in f.members if m.stopped is not None})
        for m in (m for m in f.members if m.stopped is None):
            meta = {"name": m.name, "fold": f.k, "head": m.eval_head.config, "zscore": f.zscore.to_dict(),
                    "aux": f.aux.to_dict(), "fingerprint": source.fingerprint, "layers": m.cfg.layers or source.layers,
                    **source.signature, "tta": m.cfg.tta, "train": asdict(m.cfg), "n_train": len(f.tr),
                    "skipped_steps": m.skipped}
            with ema_weights(m):
                if f.va is not None:
                    self.oof[m.name][f.va] = source.predict(m.eval_head, meta, f.va)
                    self.per_fold[m.name][f.name] = meta["metrics"] = scores(self.truth[f.va], self.oof[m.name][f.va],
                                                                             self.baseline)
                if self.writer:
                    source.save(self.out / f.name / f"{m.name}.json", m.eval_head.cpu(), meta)
        if self.writer:
            runs.write_history(self.out, self.history)  # after every fold: a long run can be plotted while it goes

    def train_fold_by_fold(self, on_epoch: OnEpoch | None) -> None:
        source, cfg = self.source, self.cfg
        for fold_name, k, tr, va in self.plan:
            if len(self.stopped) == len(self.members_cfg):
                break
            f = self.start(fold_name, k, tr, va)
            self.finish(f, train_fold(f.members, f.train_loader, f.val_loader, None if va is None else self.truth[va],
                                      source.tokens_fn, cfg.epochs,
                                      desc=fold_name if self.writer else f"{fold_name} rank {source.rank}",
                                      extra=source.extra, baseline_grams=self.baseline, sync=source.sync,
                                      on_epoch=None if on_epoch is None else _with_fold(on_epoch, fold_name),
                                      fit_loader=None if source.fit_loader is None else source.fit_loader(tr, f.aux),
                                      groups=self.inner, eval_every=cfg.eval_every, normed=source.normed))

    def summarize(self) -> dict:
        """The run's scores and files, once every fold has finished; metrics.json's content."""
        source, cfg, out, data, truth, writer = self.source, self.cfg, self.out, self.data, self.truth, self.writer
        members_cfg, stopped, oof, per_fold, plan, table = (self.members_cfg, self.stopped, self.oof, self.per_fold,
                                                           self.plan, self.table)
        source.barrier()
        if stopped:
            if writer:
                for path in (p for n in stopped for p in out.glob(f"fold*/{n}.*")):
                    path.unlink()  # a stopped member's models of its finished folds: not a model of every fold
            members_cfg = {n: m for n, m in members_cfg.items() if n not in stopped}
            if not members_cfg:
                metrics = {"stopped": stopped, "heads": {}}
                if writer:
                    runs.write_metrics(out, metrics)
                return metrics

        if cfg.full:
            metrics = {"full": True, "heads": {n: {"n_train": len(table)} for n in members_cfg}}
            if writer:
                runs.write_metrics(out, metrics)
                tqdm.write(f"trained {list(members_cfg)} on all {len(table)} images -> {out}/full/")
                write_plots(out, data, cfg)
            return metrics
        pooled = {n: scores(truth, oof[n]) for n in members_cfg}
        ranking = sorted(members_cfg, key=lambda n: -pooled[n]["competition_r2"])
        collapsed = {n: collapsed_folds(truth, oof[n], plan) for n in members_cfg}
        heads_metrics = {n: {**pooled[n], "folds": per_fold[n], "collapsed": collapsed[n]} for n in members_cfg}
        metrics = {**heads_metrics[ranking[0]], "best": ranking[0], "ranking": ranking, "heads": heads_metrics,
                   **({"stopped": stopped} if stopped else {})}
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
        sizes = sorted({len(va) for _, _, _, va in plan})
        tqdm.write(f"(each fold scores {sizes[0]}{f'-{sizes[-1]}' if len(sizes) > 1 else ''} images: per-fold R^2 is "
                   "noisy. Below 0: worse than that fold's mean; a target that barely varies within a fold divides by "
                   "a tiny variance and can read -10 or -100; '-': constant in the fold. Compare runs by the pooled "
                   "OOF row.)")
        warn_collapsed(collapsed)
        for n in (n for n in ranking if pooled[n]["competition_r2"] < DIVERGED_R2):
            print(f"\nWARNING: head {n} DIVERGED (pooled OOF competition_r2 {pooled[n]['competition_r2']:.3g}): its "
                  "predictions are far off any plant mass; retrain it with a lower --lr", file=sys.stderr)
        write_plots(out, data, cfg)
        tqdm.write(f"\nrun folder: {out}")
        return metrics


def stack_folds(source: TokenSource, cfg: TrainConfig, members_cfg: dict[str, TrainConfig], tuning: bool) -> bool:
    """Whether the folds train as one stacked model (stacked.py): `stack_folds` true, or "auto" on a GPU, for a run
    it covers (else fold by fold, saying why when it was asked for)."""
    wanted = cfg.stack_folds is True or (cfg.stack_folds == "auto" and source.device.type == "cuda")
    reason = "torchrun" if source.sync is not None else stack_reason(cfg, members_cfg, source.extra is not None, tuning)
    if wanted and reason and cfg.stack_folds is True:
        tqdm.write(f"note: the folds train one by one, not stacked: stacking does not cover {reason}")
    return wanted and reason is None


def _with_fold(on_epoch: OnEpoch, fold_name: str) -> OnEpoch:
    return lambda rows: on_epoch([{"fold": fold_name, **r} for r in rows])


def check_heads(source: TokenSource, table: pd.DataFrame, members_cfg: dict[str, TrainConfig]) -> None:
    """Build every member's head once, so a head setting it refuses (head_kwargs) stops the run before anything
    is written, naming the member. A closed-form head needs a source that can fit it; the gradient-training
    settings it ignores are listed when they differ from the defaults."""
    every = np.arange(len(table))
    zscore, aux = fit_zscore(table, every), AuxSpec.fit(table, every)
    for name, m in members_cfg.items():
        try:
            member = build_member(name, m, source.layers, source.signature, zscore, aux, 1, 0, torch.device("cpu"),
                                  train_grams=table[list(TARGETS)].to_numpy(float))
        except (TypeError, ValueError) as e:
            raise DataError(f"member {name!r}: head {m.head!r} with head_kwargs {m.head_kwargs} and layers "
                            f"{m.layers or source.layers}: {e}") from None
        if not member.closed_form:
            continue
        if source.fit_loader is None:
            raise DataError(f"member {name!r}: head {m.head!r} is fitted in closed form on stored token views; this "
                            "token source (a live backbone trained by gradients) cannot fit it: use another head")
        ignored = [f"{k}={getattr(m, k)}" for k in GRADIENT_KEYS if getattr(m, k) != getattr(TrainConfig(), k)]
        if ignored:
            tqdm.write(f"note: member {name!r} (head {m.head}) is fitted in closed form and ignores the gradient-"
                       f"training settings {', '.join(ignored)}")


def inner_groups(table: pd.DataFrame) -> np.ndarray:
    """Group code per table row for a closed-form head's inner CV: the (Sampling_Date, State) visit, like the
    outer folds; the image itself where the table has no visit (folds from --folds-csv)."""
    try:
        return pd.factorize(visit_groups(table))[0]
    except DataError:
        return np.arange(len(table))


def collapsed_folds(truth: np.ndarray, oof: np.ndarray, plan: list) -> list[dict]:
    """[{"fold": "fold3", "targets": [...]}] for every fold whose OOF predictions are constant where the truth
    varies (a dead model: `biomass submit` refuses such a member unless told otherwise)."""
    found = [(name, collapsed_targets(truth[va], oof[va])) for name, _, _, va in plan if va is not None]
    return [{"fold": name, "targets": targets} for name, targets in found if targets]


def warn_collapsed(collapsed: dict[str, list[dict]]) -> None:
    """The loud part of the run summary: which head's folds predict a constant."""
    for head, folds in collapsed.items():
        for c in folds:
            print(f"\nWARNING: head {head} {c['fold']} predicts a CONSTANT for {', '.join(c['targets'])} "
                  "(the model collapsed; recorded as `collapsed` in metrics.json). `biomass submit` refuses "
                  "this member unless given --allow-collapsed; retrain it (another seed or a lower --lr).",
                  file=sys.stderr)


def write_plots(out: Path, data: Path, cfg: TrainConfig) -> None:
    """The run's figures; one that cannot be drawn (e.g. a photo missing for the density maps) is a warning, not a
    failure: the run they describe is finished and kept."""
    if cfg.plots:
        from biomass_cache.train.plots import plot_run  # matplotlib (and its Agg backend) only when plots are drawn

        try:
            tqdm.write("plots: " + ", ".join(str(p) for p in plot_run(out, data)))
        except (DataError, OSError) as e:
            print(f"warning: the plots were not drawn ({e}); the run is complete (`biomass report` reads it; "
                  "--no-plots skips them)", file=sys.stderr)


def run_training(cache: Path, data: Path, out: Path, cfg: TrainConfig, members_cfg: dict[str, TrainConfig],
                 folds_csv: Path | None = None, extract: dict | None = None, strict_folds: bool = False,
                 overwrite: bool = False, on_epoch: OnEpoch | None = None,
                 stops: tuple[type[BaseException], ...] = (), seeds: list[int] | None = None) -> dict:
    """Stage two: cross-validate every member on the token cache `cache` into the run folder `out`, held from
    the start (runs.claim_run_dir, where `stops` are explained); see `cross_validate`. `seeds`: one run per seed,
    `out`/seed{S} (`cross_validate_seeds`); returns {seed: metrics} then."""
    store = open_store(cache)
    table = read_training_table(Path(data) / "train.csv", check_images=False)
    out = Path(out)
    check_output_folder(out, "--out")
    made = not out.exists()
    if seeds and out.is_dir():  # a killed seed ensemble set aside the earlier run of every seed it held: all go
        for seed_run in sorted({out / p.name[1:].rpartition(".replaced-")[0] for p in out.glob(".seed*.replaced-*")}):
            with WriterLock(seed_run, "two runs would mix their models in one folder"):  # back, not only those of
                runs.put_back_killed(seed_run)  # the seeds this run claims; one held by a live run is refused
    try:
        with contextlib.ExitStack() as held:
            claims = {}
            for s in seeds or [None]:  # each run held on its own: a seed that ends is let go at once
                claims[s] = held.enter_context(contextlib.ExitStack())
                claims[s].enter_context(runs.claim_run_dir(out if s is None else seed_dir(out, s), overwrite,
                                                           stops=stops))
            if cfg.threads > 0:
                torch.set_num_threads(cfg.threads)
            source = cache_source(store, table, cfg, members_cfg, extract)
            if store.random_weights:
                tqdm.write("NOTE: this cache was extracted with a RANDOMLY INITIALISED backbone: scores are a demo "
                           "only")
            if seeds:
                return cross_validate_seeds(source, table, data, out, cfg, members_cfg, seeds, folds_csv,
                                            strict_folds, finished=lambda s: claims[s].close())
            return cross_validate(source, table, data, out, cfg, members_cfg, folds_csv, strict_folds, on_epoch)
    finally:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # the parent a refused seed ensemble made
