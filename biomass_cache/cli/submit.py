"""`biomass submit` (submit.py): an ensemble's predictions on the test images as a validated submission.csv."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from biomass_cache.cli.options import TEST_OPTIONS
from biomass_cache.cli.score import print_scores
from biomass_cache.common.distributed import parse_devices, resolve_device
from biomass_cache.submit.ensemble import submit
from biomass_cache.submit.spec import spec_from_options
from biomass_cache.submit.submission import score


def submit_command(
    data: Path = typer.Option(..., "--data", help="Kaggle-format data folder with test.csv and test/ images."),
    members: Optional[str] = typer.Option(None, "--members", help="Run folder(s), comma-separated: equal "
                                          "weights, each member's backbone settings from its config.json; "
                                          "RUN:HEAD picks one head of a run that trained several."),
    ensemble: Optional[Path] = typer.Option(None, "--ensemble", help="Ensemble TOML file instead of --members "
                                            "(see configs/ensemble_example.toml)."),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="The submission file to write."),
    work_dir: Optional[Path] = TEST_OPTIONS["work_dir"],
    aggregation: Optional[str] = typer.Option(None, "--aggregation", help="mean | mc_dropout | oof | stack "
                                              "[the ensemble file's, else mean]."),
    mc_samples: Optional[int] = typer.Option(None, "--mc-samples", min=1, help="MC-dropout passes per fold model."),
    weights: Optional[str] = TEST_OPTIONS["weights"],
    device: str = TEST_OPTIONS["device"],
    precision: Optional[str] = TEST_OPTIONS["precision"],
    devices: Optional[str] = TEST_OPTIONS["devices"],
    labels: Optional[Path] = typer.Option(None, "--labels", help="Score the written file against these labels "
                                          "(sample_id,target), e.g. the synthetic test_labels.csv."),
    allow_collapsed: bool = TEST_OPTIONS["allow_collapsed"],
) -> None:
    """Predict test.csv with an ensemble of trained heads and write a validated submission.csv."""
    device = str(resolve_device(device))
    spec = spec_from_options(ensemble, members, aggregation, mc_samples, weights, allow_collapsed)
    result, _ = submit(spec, data, out, work_dir, device, precision=precision, devices=parse_devices(devices))
    from biomass_cache.report.submission import write_submission_report

    typer.echo(f"report: {write_submission_report(out, result)}")
    if labels is not None:
        print_scores(score(out, labels), f"{out} vs {labels}")
