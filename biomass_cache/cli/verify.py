"""`biomass verify STORE`: read a store back and report (or, with --repair, reset) what is missing or corrupt."""

from __future__ import annotations

from pathlib import Path

import typer

from biomass_cache.store.verify import repair, verify


def verify_command(
    store: Path = typer.Argument(..., help="Path of the token store (a .zarr folder) to check."),
    repair_: bool = typer.Option(False, "--repair", help="Clear the done flags of images with corrupt chunks "
                                 "and delete their shards and leftover temp files, so that re-running the same "
                                 "`biomass extract` re-extracts them."),
) -> None:
    """Read back every chunk of a token store; report corrupt chunks and samples not extracted.

    Exits with status 1 when any sample is missing or any chunk is corrupt (also after --repair: the repaired
    images still need extracting; 2: no readable store there).
    """
    report = verify(store)
    if repair_ and (report.broken_images or report.stray):
        repair(report)
    typer.echo(f"{report.path}: {report.n_done}/{report.n_samples} samples done, {len(report.missing)} missing, "
               f"{len(report.corrupt)} corrupt chunk(s), {len(report.bad)} image(s) marked bad")
    for iid, v in report.missing[:20]:
        typer.echo(f"  missing: image {iid!r} view {v}")
    for key, err in report.corrupt[:20]:
        typer.echo(f"  corrupt: {key}: {err}")
    for iid, reason in list(report.bad.items())[:20]:
        typer.echo(f"  bad: image {iid!r}: {reason}")
    if report.stray:
        typer.echo(f"  {len(report.stray)} leftover temp file(s) of interrupted writes (harmless), e.g. "
                   f"{report.stray[0]}")
    if repair_ and report.broken_images:
        typer.echo(f"repaired: {len(report.broken_images)} image(s) reset {report.broken_images[:5]}; re-run the "
                   "same `biomass extract` command to re-extract them")
    typer.echo("OK" if report.ok else "FAILED")
    if not report.ok:
        raise typer.Exit(1)
