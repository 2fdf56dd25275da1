"""`biomass score SUBMISSION --labels LABELS`: competition_r2 and log_r2 of a submission (submit/submission.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from biomass_cache.common.io import check_output_file, write_json
from biomass_cache.submit.submission import score


def print_scores(scores: dict, title: str) -> None:
    typer.echo(f"{title}: competition_r2 = {scores['competition_r2']:.4f}   log_r2 = {scores['log_r2']:.4f}   "
               f"({scores['n_images']} images)")
    typer.echo("  per-target R^2 (grams): " + "  ".join(f"{k} {v:.3f}" for k, v in scores["per_target_r2"].items()))


def score_command(
    submission: Path = typer.Argument(..., help="submission.csv to score (sample_id,target)."),
    labels: Path = typer.Option(..., "--labels", help="True labels in the same long format, e.g. the synthetic "
                                "generator's test_labels.csv."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the scores to this JSON file."),
) -> None:
    """Score a submission locally: the leaderboard's weighted R^2 (competition_r2) and the log-scale R^2."""
    if json_out is not None:
        check_output_file(json_out, "--json")
    scores = score(submission, labels)
    print_scores(scores, str(submission))
    if json_out is not None:
        write_json(json_out, scores)
        typer.echo(f"scores written to {json_out}")
    else:
        typer.echo(json.dumps({k: scores[k] for k in ("competition_r2", "log_r2")}))
