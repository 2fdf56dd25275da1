"""Pseudo-labelling (test-time training): heads trained on the training images plus the test images, whose targets
are an ensemble's predictions, as in the competition's 1st and 7th places.

The test images are predicted by `biomass submit`'s path (`ensemble.run_ensemble`: test caches and member
predictions cached and reused), then the first member's training settings are cross-validated again on its
training cache with its folds, every fold's training part extended by the test images of the first member's test
cache (`pseudo_source`: two stores, one training set). Each test image weighs `weight` times a labelled image in
the losses. The test images are never validated: OOF predictions and scores are over the training images only.

Fold k's pseudo-labels come from the members' fold-k models alone when every member is a run folder with the first
member's folds ("per-fold"): no validation image of fold k then reaches fold k's model through the labels.
Otherwise (a --full member, a single checkpoint, other folds) every fold gets the whole ensemble's labels
("ensemble"), which leaks: recorded in metrics.json and warned about. Each further round labels the test images
with the previous round's run (its fold-k models for fold k) and trains again.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from biomass_cache.common.data import read_training_table
from biomass_cache.common.errors import DataError, EnsembleError
from biomass_cache.common.folds import read_folds
from biomass_cache.common.targets import TARGETS
from biomass_cache.store.fingerprint import diff as fingerprint_diff
from biomass_cache.store.layout import open_store
from biomass_cache.submit.ensemble import OofSet, run_ensemble
from biomass_cache.submit.members import ResolvedMember, resolve_member
from biomass_cache.submit.spec import EnsembleSpec, Member
from biomass_cache.train import runs
from biomass_cache.train.bank import TokenBank, plan_bank
from biomass_cache.train.config import TrainConfig
from biomass_cache.train.crossval import TokenSource, cache_source, cross_validate
from biomass_cache.train.dataset import ConcatTokens, TokenDataset, make_loader, store_rows

DEFAULT_WEIGHT = 0.5
TEST_VIEW_SEED = 1_000_003  # the test images draw their training views apart from the training images'
NOTES = {
    "per-fold": "OOF scores are over the training images only; the test images are in every fold's training part "
                "and never validated. Fold k's pseudo-labels come from the members' fold-k models only, so no "
                "validation image of fold k reaches fold k's model through them (choices made on the members' OOF "
                "scores, e.g. which members to use, can still flatter this score).",
    "ensemble": "LEAK: every fold's pseudo-labels come from the members' whole ensemble, whose models were trained "
                "on fold k's validation images, so fold k's model learns from labels derived from its own "
                "validation images and the OOF score is optimistic. OOF scores are over the training images only; "
                "the test images are in every fold's training part and never validated.",
}


@dataclass
class PseudoLabels:
    """The test images' pseudo-labels (grams) for every fold, and the test tokens the first member reads."""

    image_ids: list[str]
    by_fold: list[np.ndarray]  # fold k -> (N, 5) grams
    mode: str  # "per-fold" (fold k from the members' fold-k models) or "ensemble" (the same labels for every fold)
    store: object  # the first member's test TokenStore (reduced like its training cache)
    oof: OofSet | None = None  # the ensemble's out-of-fold predictions, when every member has them

    def frame(self, fold: int) -> pd.DataFrame:
        return pd.DataFrame({"image_id": self.image_ids, **dict(zip(TARGETS, self.by_fold[fold].T))})


def has_folds(rm: ResolvedMember, table: pd.DataFrame, folds: np.ndarray) -> bool:
    """True when the member is a run folder whose checkpoints are fold0..K-1 of exactly these folds."""
    n = int(folds.max()) + 1
    if not rm.member.path.is_dir() or [p.parent.name for p in rm.checkpoints] != [f"fold{k}" for k in range(n)]:
        return False
    try:
        return bool(np.array_equal(read_folds(rm.run_dir / "folds.csv", table), folds))
    except (DataError, OSError):
        return False


def predict_labels(spec: EnsembleSpec, table: pd.DataFrame, folds: np.ndarray, data: Path, work_dir: Path,
                   device: str, precision: str | None, devices: list[str] | None,
                   progress: bool = True) -> PseudoLabels:
    """Every fold's pseudo-labels of data/test.csv's images, predicted as `biomass submit` predicts (work_dir's
    test caches and member predictions reused); per fold when every member has exactly `folds`. The first member
    must be heads on a token cache (its test cache is the one returned)."""
    resolved = [resolve_member(m, spec.weights_files) for m in spec.members]
    run = functools.partial(run_ensemble, data_dir=data, out_dir=work_dir, device=device, progress=progress,
                            precision=precision, devices=devices)
    n_folds = int(folds.max()) + 1
    if all(has_folds(rm, table, folds) for rm in resolved):
        results = [run(replace(spec, members=tuple(Member(rm.checkpoints[k], m.weight)
                                                   for rm, m in zip(resolved, spec.members))))
                   for k in range(n_folds)]
        by_fold, mode = [r.grams for r in results], "per-fold"
    else:
        lacking = [rm.member.name for rm in resolved if not has_folds(rm, table, folds)]
        print(f"WARNING: members {lacking} are not run folders with the folds of {resolved[0].run_dir}/"
              "folds.csv: every fold is pseudo-labelled by the whole ensemble, whose models saw that fold's "
              "validation images (the OOF score is optimistic; recorded in metrics.json `pseudo`)", file=sys.stderr)
        results = [run(spec)]
        by_fold, mode = [results[0].grams] * n_folds, "ensemble"
    return PseudoLabels(results[0].image_ids, by_fold, mode, results[0].stores[0], results[0].oof)


def pseudo_source(base: TokenSource, labels: PseudoLabels, folds: np.ndarray, weight: float,
                  cfg: TrainConfig) -> TokenSource:
    """`base` (the training cache's source) whose training loaders also yield every test image with the pseudo-labels
    of the fold the training rows leave out, each sample weighing `weight`; validation and OOF stay `base`'s."""
    store, n_test = labels.store, len(labels.image_ids)
    views = list(range(store.n_views))

    @functools.cache
    def shared() -> TokenBank | None:
        """The test tokens held like the training tokens (`base.bank_plan`), read once and shared by every fold."""
        held = base.bank_plan
        if held is None:
            return None
        plan, refused = plan_bank(store, n_test, len(views), len(base.layers), base.device,
                                  "bf16" if held.dtype == torch.bfloat16 else "fp32", held.normed)
        if plan is None or (plan.dtype, plan.normed) != (held.dtype, held.normed):
            raise DataError(f"the test tokens of {store.path} do not fit beside the training tokens ({held.describe()}"
                            f"; {'; '.join(refused)}): pseudo-label with preload = false in the first member's "
                            "training settings, or `biomass reduce` both stores")
        return TokenBank.load(store, store_rows(store, labels.image_ids, views), views, base.layers, plan)

    def train_loader(rows: np.ndarray, seed: int, aux):
        left_out = sorted(set(range(len(labels.by_fold))) - set(folds[rows].tolist()))
        if len(left_out) != 1:
            raise ValueError(f"training rows leave out folds {left_out}; pseudo-labels need exactly one")
        test = TokenDataset(store, labels.frame(left_out[0]), range(n_test), base.layers, train=True,
                            seed=seed + TEST_VIEW_SEED, aux=aux, bank=shared(), weight=weight)
        both = ConcatTokens([base.train_loader(rows, seed, aux).dataset, test])
        return make_loader(both, cfg.batch_size, shuffle=True, seed=seed, workers=cfg.workers)

    return replace(base, train_loader=train_loader)


def training_config(rm: ResolvedMember, device: str) -> tuple[dict, TrainConfig, dict[str, TrainConfig]]:
    """(config.json, base settings, {head: settings}) of the first member's run, on `device`."""
    if rm.kind != "cache":
        raise EnsembleError(f"member {rm.member.name}: the first member gives the training tokens and settings of "
                            "the pseudo-labelled run; it must be heads on a token cache, not LoRA")
    path = rm.run_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EnsembleError(f"{path}: not a readable JSON file ({e})") from e
    head = rm.checkpoints[0].stem
    try:
        cfg = TrainConfig(**config["train"])
        member = TrainConfig(**config["members"][head])
    except (KeyError, TypeError) as e:
        raise EnsembleError(f"{path}: lacks the training settings of head {head!r} ({e}); the first member must be "
                            "a run folder written by `biomass train` or `biomass pseudo`") from None
    if cfg.full:
        raise EnsembleError(f"member {rm.member.name}: trained with --full (no folds); the first member of "
                            "`biomass pseudo` gives the folds: use a cross-validated run")
    return config, replace(cfg, device=device), {head: replace(member, device=device)}


def open_training_cache(config: dict, cache: Path | None, where: Path):
    """The first member's training token store (`cache` if given), refused unless it holds the same tokens."""
    path = Path(cache or config["cache"]["path"])
    if not path.exists():
        raise DataError(f"{path}: the training token cache of {where} not found; give its path with --cache")
    store = open_store(path)
    diff = fingerprint_diff(config["cache"]["fingerprint"], store.fingerprint)
    if diff:
        raise DataError(f"{path}: not the token cache {where} was trained on ({'; '.join(diff)}); give that one "
                        "with --cache")
    return store


def pseudo_train(spec: EnsembleSpec, data: Path, out: Path, rounds: int = 1, weight: float = DEFAULT_WEIGHT,
                 work_dir: Path | None = None, device: str = "cpu", precision: str | None = None,
                 devices: list[str] | None = None, cache: Path | None = None, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Label the test images with `spec`'s ensemble, train the first member's heads on train + test tokens with
    its folds, `rounds` times (rounds before the last under out/rounds/roundR); returns the last metrics."""
    if rounds < 1 or not (math.isfinite(weight) and weight > 0):
        raise DataError(f"--rounds must be >= 1 and --weight a number > 0, got {rounds} and {weight}")
    data, out = Path(data), Path(out)
    work_dir = Path(work_dir) if work_dir else out.parent
    first = resolve_member(spec.members[0], spec.weights_files)
    config, cfg, members_cfg = training_config(first, device)
    store = open_training_cache(config, cache, first.run_dir)
    table = read_training_table(data / "train.csv", check_images=False)
    folds_csv = first.run_dir / "folds.csv"
    folds = read_folds(folds_csv, table)
    dirs = [out / "rounds" / f"round{r}" for r in range(1, rounds)] + [out]
    with ExitStack() as held:
        for d in reversed(dirs):  # every round's folder held (refused, or cleared with --overwrite) before any
            held.enter_context(runs.claim_run_dir(d, overwrite))  # training; `out` first, as it holds the rounds
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        labellers, metrics = spec, {}
        for r, run_dir in enumerate(dirs, start=1):
            labels = predict_labels(labellers, table, folds, data, work_dir, device, precision, devices, progress)
            info = {"round": r, "rounds": rounds, "weight": weight, "n_test": len(labels.image_ids),
                    "n_train": len(table), "labels": labels.mode, "labelled_by": [m.name for m in labellers.members],
                    "note": NOTES[labels.mode]}
            base = cache_source(store, table, cfg, members_cfg, config.get("extract"))
            base.config["pseudo"] = info
            metrics = cross_validate(pseudo_source(base, labels, folds, weight, cfg), table, data, run_dir, cfg,
                                     members_cfg, folds_csv=folds_csv)
            metrics["pseudo"] = info
            runs.write_metrics(run_dir, metrics)
            tqdm.write(f"round {r}/{rounds}: pooled OOF competition_r2 {metrics['competition_r2']:.4f} on the "
                       f"{len(table)} training images ({labels.mode} pseudo-labels of {len(labels.image_ids)} test "
                       f"images, weight {weight}) -> {run_dir}")
            labellers = EnsembleSpec((Member(run_dir),), spec.weights_files, allow_collapsed=spec.allow_collapsed)
        return metrics
