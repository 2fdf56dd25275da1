"""`biomass report PATH` and `biomass compare RUN RUN ...`: the HTML report of a run, and paired comparisons
(report/)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.common.errors import DataError
from biomass_cache.common.io import check_output_file

DATA = typer.Option(None, "--data", help="The data folder the run trained on (default: the one its config.json "
                    "records).")
RESAMPLES = typer.Option(2000, "--resamples", min=100, help="Bootstrap resamples of the visits.")


def report_command(
    path: Path = typer.Argument(..., help="A run folder (`biomass train`), a submission (NAME.csv, `biomass "
                                "submit`) or a study folder (`biomass tune`)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The HTML file to write (default: PATH/report.html)."),
    data: Optional[Path] = DATA,
    resamples: int = RESAMPLES,
) -> None:
    """Write the self-contained HTML report of a run (scores with intervals beside baselines, tables, figures), a
    submission (members, scores, the ensemble against its best member, unusual photos) or a tuning study."""
    from biomass_cache.report.run import write_run_report
    from biomass_cache.report.study import is_study, write_study_report
    from biomass_cache.report.submission import write_submission_report

    if out is not None:
        check_output_file(out, "--out")
    if path.is_file() and path.suffix == ".csv":
        typer.echo(f"report written to {write_submission_report(path, html=out)}")
    elif is_study(path):
        typer.echo(f"report written to {write_study_report(path, out)}")
    elif (path / "metrics.json").is_file() and (path / "config.json").is_file():
        typer.echo(f"report written to {write_run_report(path, out, data, resamples)}")
    else:
        seeds = sorted(p.parent for p in path.glob("seed*/metrics.json"))
        raise DataError(f"{path}: neither a run folder (config.json and metrics.json, written by `biomass train`), "
                        "a submission (NAME.csv with NAME.report.json, `biomass submit`) nor a study folder "
                        "(stage2.json or study.db, `biomass tune`)" + (
                            f"; it holds the runs of a seed ensemble (train --seeds): report one, e.g. {seeds[0]}, "
                            f"or compare them: biomass compare {' '.join(map(str, seeds))}" if seeds else ""))


def compare_command(
    runs: list[str] = typer.Argument(..., help="Two or more run folders, or RUN:HEAD for one head of a run (its "
                                     "best otherwise), trained on the same images and folds."),
    data: Optional[Path] = DATA,
    resamples: int = RESAMPLES,
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the comparison as an HTML report."),
) -> None:
    """Paired grouped-bootstrap differences of runs' out-of-fold scores: which run is better, and how sure."""
    from biomass_cache.report.compare import compare, text
    from biomass_cache.report.html import render

    if out is not None:
        check_output_file(out, "--out")
    result = compare(runs, data, resamples)
    typer.echo(text(result))
    if out is not None:
        render("compare.html.j2", out, title="Comparison of " + ", ".join(e.label for e in result.entries),
               comparison=result, zip=zip, resamples=resamples)
        typer.echo(f"report written to {out}")
