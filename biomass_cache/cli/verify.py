"""`biomass verify STORE`: read a store back and report (or, with --repair, reset) what is missing or corrupt."""

from __future__ import annotations

from pathlib import Path

import typer

from biomass_cache.store.verify import VerifyReport, repair, verify


def verify_command(
    store: Path = typer.Argument(..., help="Path of the token store (a .zarr folder) to check."),
    repair_: bool = typer.Option(False, "--repair", help="Clear the done flags of images with corrupt chunks "
                                 "and delete their shards and leftover temp files, so that re-running the same "
                                 "`biomass extract` re-extracts them."),
) -> None:
    """Read back every chunk of a token store; report corrupt chunks and samples not extracted.

    Exit status: 0 when every sample is extracted and every chunk reads back, or when --repair left no corrupt
    chunk (the repaired images then only need extracting again); 1 when a sample is missing or a chunk corrupt;
    2 when there is no readable store.
    """
    report = verify(store)
    print_report(report)
    if not (repair_ and (report.broken_images or report.stray)):
        typer.echo("OK" if report.ok else "FAILED")
        if not report.ok:
            raise typer.Exit(1)
        return
    repair(report)
    after = verify(report.path)  # what the repair left: no corruption, only samples to extract
    typer.echo(f"repaired: {len(report.broken_images)} image(s) reset {report.broken_images[:5]}, "
               f"{len(report.stray)} temp file(s) deleted; now {after.n_done}/{after.n_samples} samples done, "
               f"{len(after.corrupt)} corrupt chunk(s)")
    if after.corrupt:
        print_report(after)
        typer.echo("FAILED")
        raise typer.Exit(1)
    if after.missing:
        typer.echo(f"re-run the same `biomass extract` command to extract the {len(after.missing)} missing "
                   "sample(s)")
    typer.echo("REPAIRED")


def print_report(report: VerifyReport) -> None:
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
