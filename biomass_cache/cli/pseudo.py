"""`biomass pseudo`: pseudo-label the test images with an ensemble, then train on train + test tokens
(submit/pseudo.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.cli.options import TEST_OPTIONS, TRAIN_OPTIONS
from biomass_cache.common.distributed import parse_devices, resolve_device
from biomass_cache.submit.pseudo import DEFAULT_WEIGHT, pseudo_train
from biomass_cache.submit.spec import spec_from_options


def pseudo_command(
    data: Path = typer.Option(..., "--data", help="Kaggle-format data folder with train.csv, test.csv and test/."),
    members: str = typer.Option(..., "--members", help="Run folder(s), comma-separated, whose ensemble labels the "
                                "test images; the first gives the heads' settings, training cache and folds; "
                                "RUN:HEAD picks one head of a run that trained several."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (a `biomass submit --members` member)."),
    rounds: int = typer.Option(1, "--rounds", help="Label-and-train rounds; each later round labels the test "
                               "images with the previous round's run."),
    weight: float = typer.Option(DEFAULT_WEIGHT, "--weight", help="Loss weight of a pseudo-labelled test image "
                                 "relative to a labelled training image."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="The first member's training token store [the path "
                                         "its config.json records]."),
    work_dir: Optional[Path] = TEST_OPTIONS["work_dir"],
    weights: Optional[str] = TEST_OPTIONS["weights"],
    device: str = TEST_OPTIONS["device"],
    precision: Optional[str] = TEST_OPTIONS["precision"],
    devices: Optional[str] = TEST_OPTIONS["devices"],
    allow_collapsed: bool = TEST_OPTIONS["allow_collapsed"],
    overwrite: bool = TRAIN_OPTIONS["overwrite"],
) -> None:
    """Pseudo-label the test images with an ensemble and train heads on train + test tokens (test-time training).

    OOF scores are over the training images only; see docs (Ensembles, submission) for the folds and the leak.
    """
    device = str(resolve_device(device))
    spec = spec_from_options(None, members, weights=weights, allow_collapsed=allow_collapsed)
    pseudo_train(spec, data, out, rounds, weight, work_dir, device, precision, parse_devices(devices), cache,
                 overwrite)
