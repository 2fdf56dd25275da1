"""Command-line options several commands share, declared once.

`TRAIN_OPTIONS`: what `biomass train` and `biomass lora` (and, for --cache/--data/--overwrite, `tune` and `pseudo`)
share; their None = not given: the --config file's value stands, else the default in parentheses, which is read
from TrainConfig so the help cannot drift from the code. `TEST_OPTIONS`: the commands that predict the test images
with an ensemble (submit, pseudo).
"""

from __future__ import annotations

from dataclasses import MISSING, fields

import typer

from biomass_cache.train.config import TrainConfig


def default_of(cls: type, name: str) -> object:
    """A dataclass field's default (a default_factory is called)."""
    f = next(f for f in fields(cls) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def shown(value: object) -> str:
    """A default as the help states it: on/off, lists comma-separated, sizes WxH."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


def with_default(text: str, cls: type, name: str, note: str = "") -> str:
    """`text (default)` or `text (default; note)`, the default read from `cls`."""
    return f"{text} ({shown(default_of(cls, name))}{'; ' + note if note else ''})."


def _train(flags: str, text: str, name: str, note: str = "") -> typer.models.OptionInfo:
    return typer.Option(None, flags, help=with_default(text, TrainConfig, name, note))


TRAIN_OPTIONS = {
    "cache": typer.Option(..., "--cache", help="Token store written by `biomass extract` (split train)."),
    "data": typer.Option(..., "--data", help="Kaggle-format data folder holding train.csv."),
    "folds": _train("--folds", "Number of grouped folds", "folds"),
    "folds_csv": typer.Option(None, "--folds-csv", help="Reuse this folds.csv (image_id, fold)."),
    "full": typer.Option(False, "--full", help="Train on all images (no cross-validation)."),
    "epochs": _train("--epochs", "Epochs", "epochs"),
    "eval_every": _train("--eval-every", "Validate every N epochs (and the last); training is the same whatever N",
                         "eval_every"),
    "batch_size": _train("--batch-size", "Batch size", "batch_size", "lora under torchrun: the global batch"),
    "lr": _train("--lr", "Peak learning rate of the heads", "lr"),
    "seed": _train("--seed", "Seed of folds, views, init and mixup", "seed"),
    "device": _train("--device", "auto | cpu | cuda | cuda:N", "device", "lora under torchrun: each process's own GPU"),
    "workers": _train("--workers", "DataLoader workers: streaming tokens from disk (train), decoding and "
                      "augmenting photos (lora)", "workers"),
    "mixup": _train("--mixup/--no-mixup", "Token-level manifold mixup", "mixup"),
    "uw": _train("--uw/--no-uw", "Uncertainty weighting of the task losses", "uw"),
    "pcgrad": _train("--pcgrad/--no-pcgrad", "PCGrad of the auxiliary gradients", "pcgrad", "needs --aux"),
    "ema": _train("--ema/--no-ema", "Evaluate and save an EMA of the weights", "ema"),
    "aux": _train("--aux/--no-aux", "Auxiliary height/NDVI/State tasks", "aux"),
    "interval_bins": _train("--interval-bins", "Auxiliary interval classification: K quantile bins per target, 0 = "
                            "off", "interval_bins"),
    "stratify": _train("--stratify/--no-stratify", "Grouped folds that also spread each State over the folds",
                       "stratify"),
    "no_plots": typer.Option(False, "--no-plots", help="Do not write RUN/plots/*.png (nor RUN/report.html)."),
    "overwrite": typer.Option(False, "--overwrite", help="Delete an earlier run's results in --out first "
                              "(checkpoints, OOF, metrics, plots; folds.csv is kept) instead of refusing."),
}


def cli_overrides(values: dict, full: bool, no_plots: bool) -> dict:
    """TrainConfig overrides from a command line: the values given (None = not given: the config's stands)."""
    overrides = {k: v for k, v in values.items() if v is not None}
    if full:
        overrides["full"] = True
    if no_plots:
        overrides["plots"] = False
    return overrides


TEST_OPTIONS = {
    "work_dir": typer.Option(None, "--work-dir", help="Where test caches (cache/) and member predictions "
                             "(members/) are kept and reused [the folder of --out]."),
    "weights": typer.Option(None, "--weights", help="Weights file per backbone for the test caches, "
                            "BACKBONE=PATH[,...] (needed for real weights unless the run's config or the ensemble "
                            "file names them)."),
    "device": typer.Option("cpu", "--device", help="cpu | cuda[:N] for the heads."),
    "precision": typer.Option(None, "--precision", help="Backbone precision of the test caches: "
                              "auto | bf16 | fp16 | fp32 [each training cache's]."),
    "devices": typer.Option(None, "--devices", help="Split the backbone over devices, e.g. cuda:0,cuda:1 "
                            "[one device]."),
    "allow_collapsed": typer.Option(False, "--allow-collapsed", help="Use members with a fold model that "
                                    "predicts a constant (metrics.json `collapsed`); refused otherwise."),
}
