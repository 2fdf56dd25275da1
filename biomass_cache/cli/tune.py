"""`biomass tune`: Optuna's search over training settings (train/tune.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.cli.options import TRAIN_OPTIONS
from biomass_cache.train.config import TrainConfig
from biomass_cache.train.tune import Settings, tune


def tune_command(
    cache: Path = TRAIN_OPTIONS["cache"],
    data: Path = TRAIN_OPTIONS["data"],
    space: Path = typer.Option(..., "--space", help="TOML search space: a space table of searched keys, a fixed "
                               "table of shared values (configs/tune_example.toml)."),
    trials: int = typer.Option(..., "--trials", help="The study's total of finished (completed or pruned) trials, "
                               "counted over every process sharing the storage."),
    out: Path = typer.Option(..., "--out", help="Study folder: folds.csv, trials/, plots/, best.toml."),
    storage: Optional[str] = typer.Option(None, "--storage", help="sqlite:///PATH, journal:PATH (a journal file on a "
                                          "shared filesystem) or a database URL (default: sqlite in --out)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name in the storage (default: --out's name)."),
    pruner: str = typer.Option("median", "--pruner", help="median | halving | none: stop bad trials early."),
    prune_after: int = typer.Option(5, "--prune-after", help="Median pruner: trials finished before any is pruned."),
    top_k: int = typer.Option(3, "--top-k", help="Second stage: how many of the best trials are re-run."),
    seeds: int = typer.Option(3, "--seeds", help="Second stage: fresh seeds per re-run trial (0: none)."),
    keep: str = typer.Option("all", "--keep", help="all | top: keep every trial's run folder, or the top K only."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Grouped folds of a new study (default: the space "
                                        f"file's fixed folds, else {TrainConfig.folds})."),
    folds_csv: Optional[Path] = typer.Option(None, "--folds-csv", help="A new study's folds (image_id, fold)."),
    parallel: int = typer.Option(1, "--parallel", help="Trials trained side by side, in one pass over the tokens "
                                 "(the space may then search only keys that do not define the batches)."),
) -> None:
    """Search training settings with Optuna on a token cache; re-check the best with several seeds; write best.toml.

    Re-running continues the study; several processes (or machines, with a shared --storage) share its trials.
    """
    settings = Settings(trials, storage, study, pruner, prune_after, top_k, seeds, keep, folds, folds_csv, parallel)
    summary = tune(cache, data, space, out, settings)
    if summary.get("rows") is not None:  # the second stage ran: the study is complete
        from biomass_cache.report.study import write_study_report

        typer.echo(f"report: {write_study_report(out)}")
