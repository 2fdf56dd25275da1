"""`biomass train` (train_heads.py): the command line of stage two over train/ (config.py: the settings, loop.py: the
loop, crossval.py: folds, token sources, run folder); its options shared with `biomass lora` are declared once in
cli/options.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.cli.options import TRAIN_OPTIONS, cli_overrides, with_default
from biomass_cache.common.config import MAX_SEED
from biomass_cache.common.errors import DataError
from biomass_cache.train.config import TrainConfig, load_config, resolve
from biomass_cache.train.crossval import run_training, seed_dir


def train_command(
    cache: Path = TRAIN_OPTIONS["cache"],
    data: Path = TRAIN_OPTIONS["data"],
    out: Path = typer.Option(..., "--out", help="Run folder to write (a folds.csv in it is reused)."),
    head: Optional[str] = typer.Option(None, "--head", help="Head name(s), comma-separated: trained side by side "
                                       f"({TrainConfig.head})."),
    folds: Optional[int] = TRAIN_OPTIONS["folds"],
    folds_csv: Optional[Path] = TRAIN_OPTIONS["folds_csv"],
    full: bool = TRAIN_OPTIONS["full"],
    epochs: Optional[int] = TRAIN_OPTIONS["epochs"],
    eval_every: Optional[int] = TRAIN_OPTIONS["eval_every"],
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config file (see configs/cpu_demo.toml)."),
    batch_size: Optional[int] = TRAIN_OPTIONS["batch_size"],
    lr: Optional[float] = TRAIN_OPTIONS["lr"],
    seed: Optional[int] = TRAIN_OPTIONS["seed"],
    seeds: Optional[str] = typer.Option(None, "--seeds", help="A seed ensemble, e.g. 0,1,2: one run folder per seed, "
                                        "OUT/seedS, on the first seed's folds (stacked with the folds where they "
                                        "stack, --stack-folds)."),
    device: Optional[str] = TRAIN_OPTIONS["device"],
    workers: Optional[int] = TRAIN_OPTIONS["workers"],
    preload: Optional[bool] = typer.Option(None, "--preload/--no-preload",
                                           help="Hold the tokens on the device or in RAM (auto: when they fit)."),
    precision: Optional[str] = typer.Option(None, "--precision", help=with_default(
        "Compute precision of the heads: auto (bf16 where the GPU or CPU computes it natively) | bf16 | fp32",
        TrainConfig, "precision")),
    stack_folds: Optional[bool] = typer.Option(None, "--stack-folds/--no-stack-folds", help=with_default(
        "Train the folds as one stacked model (auto: on a GPU)", TrainConfig, "stack_folds")),
    mixup: Optional[bool] = TRAIN_OPTIONS["mixup"],
    uw: Optional[bool] = TRAIN_OPTIONS["uw"],
    pcgrad: Optional[bool] = TRAIN_OPTIONS["pcgrad"],
    ema: Optional[bool] = TRAIN_OPTIONS["ema"],
    aux: Optional[bool] = TRAIN_OPTIONS["aux"],
    interval_bins: Optional[int] = TRAIN_OPTIONS["interval_bins"],
    stratify: Optional[bool] = TRAIN_OPTIONS["stratify"],
    no_plots: bool = TRAIN_OPTIONS["no_plots"],
    overwrite: bool = TRAIN_OPTIONS["overwrite"],
) -> None:
    """Train readout heads on cached tokens with grouped K-fold CV; writes checkpoints, OOF and metrics.

    Options left out take the --config file's value, else the default shown in parentheses.
    """
    base, sweep, extract = load_config(config)
    overrides = cli_overrides(dict(folds=folds, epochs=epochs, eval_every=eval_every, batch_size=batch_size, lr=lr,
                                   seed=seed, device=device, workers=workers, preload=preload,
                                   precision=precision, stack_folds=stack_folds, mixup=mixup, uw=uw, pcgrad=pcgrad, ema=ema,
                                   aux=aux, interval_bins=interval_bins, stratify=stratify), full, no_plots)
    heads = [h.strip() for h in head.split(",") if h.strip()] if head else None
    cfg, members = resolve(base, sweep, overrides, heads)
    seed_list = parse_seeds(seeds, seed)
    metrics = run_training(cache, data, out, cfg, members, folds_csv=folds_csv, extract=extract,
                           strict_folds=folds is not None or "folds" in base, overwrite=overwrite, seeds=seed_list)
    by_run = {seed_dir(out, s): metrics[s] for s in seed_list} if seed_list else {out: metrics}
    for run, m in by_run.items():
        if cfg.plots and m.get("heads") and not m.get("full"):  # --no-plots: neither figures nor report
            from biomass_cache.report.run import write_run_report

            try:
                typer.echo(f"report: {write_run_report(run, data_dir=data)}")
            except (DataError, OSError) as e:  # the run is finished and kept: `biomass report` can write it later
                typer.echo(f"warning: the report was not written ({e}); the run is complete", err=True)


def parse_seeds(text: str | None, seed: int | None) -> list[int] | None:
    """--seeds 0,1,2 -> [0, 1, 2] (distinct seeds as --seed takes them); None without --seeds."""
    if text is None:
        return None
    if seed is not None:
        raise DataError("--seed and --seeds: give one of them (--seeds 0,1,2 trains a run per seed)")
    parts = [s.strip() for s in text.split(",")]
    seeds = [int(s) for s in parts] if all(s.isdigit() and s.isascii() for s in parts) else []
    if not seeds or max(seeds) > MAX_SEED or len(set(seeds)) != len(seeds):
        raise DataError(f"--seeds {text!r}: give distinct integers from 0 to {MAX_SEED} separated by commas, e.g. "
                        "--seeds 0,1,2")
    return seeds
