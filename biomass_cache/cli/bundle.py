"""`biomass bundle`: an offline submission folder for a Kaggle notebook (submit/bundle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.submit.bundle import STOCK_KAGGLE, make_bundle


def bundle_command(
    members: Optional[str] = typer.Option(None, "--members", help="Run folder(s), comma-separated, equal weights; RUN:HEAD "
                                          "picks one head of a run that trained several."),
    ensemble: Optional[Path] = typer.Option(None, "--ensemble", help="Ensemble TOML file instead of --members."),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write (upload it as a Kaggle dataset)."),
    stock: Optional[str] = typer.Option(None, "--stock", help="Packages the notebook image ships, comma-separated "
                                        f"(they and their dependencies are not bundled) [{','.join(STOCK_KAGGLE)}]."),
    test_images: Optional[int] = typer.Option(None, "--test-images", help="Number of test images, for the time "
                                              "estimate."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing bundle folder."),
) -> None:
    """Pack an ensemble for an offline notebook: wheels, checkpoints, run_submission.py, checksums."""
    stock_list = [s.strip() for s in stock.split(",") if s.strip()] if stock else STOCK_KAGGLE
    manifest = make_bundle(ensemble, members, out, stock_list, test_images, overwrite)
    typer.echo(f"bundle: {out} ({manifest['bytes'] / 1e6:.1f} MB; {len(manifest['wheels'])} wheels, "
               f"{len(manifest['members'])} member(s))")
    typer.echo("bundled packages: " + ", ".join(f"{n}=={v}" for n, v in manifest["packages"].items()))
    for line in manifest["estimate"]:
        typer.echo(f"test-time estimate: {line}")
