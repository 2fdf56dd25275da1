"""`biomass synth OUT_DIR`: a synthetic Kaggle-format dataset (synth/)."""

from __future__ import annotations

from pathlib import Path

import typer

from biomass_cache.common.config import MAX_SEED
from biomass_cache.synth.generate import STYLES, generate


def parse_photo_size(text: str) -> tuple[int, int]:
    """'1000x500' -> (1000, 500); anything else is a clear error."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or min(int(p) for p in parts) < 16:
        raise ValueError(f"--size must be WIDTHxHEIGHT with whole numbers of at least 16 pixels, e.g. 1000x500; "
                         f"got {text!r}")
    return int(parts[0]), int(parts[1])


def synth_command(
    out_dir: Path = typer.Argument(..., help="Folder to create (train.csv, test.csv, train/, test/, ...)."),
    n_train: int = typer.Option(120, "--n-train", min=1, help="Number of training images."),
    n_test: int = typer.Option(24, "--n-test", min=1, help="Number of test images."),
    seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="Random seed; the same seed gives byte-identical "
                             "files."),
    size: str = typer.Option("1000x500", "--size", help="Image size WxH in pixels (real photos are 2:1)."),
    style: str = typer.Option("blades", "--style", help="Generator: blades (the default data) or canopy (an "
                              "independent one, to test whether settings transfer)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace out_dir if it exists and is not empty."),
) -> None:
    """Write a synthetic Kaggle-format pasture dataset (images + CSVs + hidden test labels)."""
    try:
        wh = parse_photo_size(size)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--size'") from e
    if style not in STYLES:
        raise typer.BadParameter(f"unknown style {style!r}; choose one of {', '.join(STYLES)}", param_hint="'--style'")
    try:
        summary = generate(out_dir, n_train=n_train, n_test=n_test, seed=seed, size=wh, overwrite=overwrite,
                           style=style)
    except FileExistsError as e:
        raise typer.BadParameter(str(e), param_hint="'OUT_DIR'") from e
    typer.echo(f"synth: {n_train} train + {n_test} test images, {wh[0]}x{wh[1]}, {style} style, seed {seed}, "
               f"{summary['images_per_s']} images/s -> {out_dir}")
