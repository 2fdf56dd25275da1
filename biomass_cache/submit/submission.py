"""The last step: a validated, atomically written submission.csv, and local scoring of such a file.

A submission is checked completely before a byte is written (one row per test.csv sample_id, in test.csv's order,
finite, non-negative, GDM = clover + green and Total = clover + dead + green per image), so a file that exists is
a file Kaggle accepts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import typer

from biomass_cache.common.data import MAX_LISTED, SEP, DataError, read_long_csv, to_long
from biomass_cache.common.io import write_csv
from biomass_cache.common.metrics import score_table
from biomass_cache.cli.options import TEST_OPTIONS
from biomass_cache.common.targets import TARGETS

COLUMNS = ["sample_id", "target"]
IDENTITY_RTOL = 1e-6  # written floats round-trip exactly; this only absorbs the sums' last-bit rounding


class SubmissionError(DataError):
    """A submission (or labels file) that must not be written or scored, with every reason found."""


def _some(items: Sequence) -> str:
    items = list(items)
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{items[:MAX_LISTED]}{more}"


def expected_sample_ids(test_csv: str | Path) -> list[str]:
    """test.csv's sample_ids in file order (the order a submission must follow), after checking the file."""
    read_long_csv(test_csv, check_images=False)
    return pd.read_csv(test_csv, dtype=str, keep_default_na=False)["sample_id"].tolist()


def split_sample_ids(sample_ids: pd.Series, where: str) -> pd.DataFrame:
    """`<image_id>__<target_name>` -> columns image_id, target_name; unknown targets are an error."""
    parts = sample_ids.str.rsplit(SEP, n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any():
        bad = sample_ids[parts[1].isna()] if parts.shape[1] == 2 else sample_ids
        raise SubmissionError(f"{where}: sample_id(s) not of the form <image_id>{SEP}<target>: {_some(bad)}")
    unknown = sorted(set(parts[1]) - set(TARGETS))
    if unknown:
        raise SubmissionError(f"{where}: unknown target name(s) in sample_id: {unknown}")
    return pd.DataFrame({"image_id": parts[0], "target_name": parts[1]})


def validate_submission(sub: pd.DataFrame, sample_ids: Sequence[str], where: str = "submission") -> None:
    """Raise SubmissionError listing everything wrong with `sub` against the expected `sample_ids`."""
    if list(sub.columns) != COLUMNS:
        raise SubmissionError(f"{where}: columns must be exactly {COLUMNS}, got {list(sub.columns)}")
    problems = []
    ids = sub["sample_id"].astype(str)
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        problems.append(f"duplicated sample_id(s) {_some(dup)}")
    expected = set(sample_ids)
    missing = [s for s in sample_ids if s not in set(ids)]
    if missing:
        problems.append(f"{len(missing)} sample_id(s) of test.csv have no row: {_some(missing)}")
    extra = ids[~ids.isin(expected)]
    if len(extra):
        problems.append(f"{len(extra)} sample_id(s) not in test.csv: {_some(extra)}")
    if not (problems or ids.tolist() == list(sample_ids)):
        problems.append("rows are not in test.csv's order")
    values = pd.to_numeric(sub["target"], errors="coerce").to_numpy(dtype=float)
    nonfinite = ids[~np.isfinite(values)]
    if len(nonfinite):
        problems.append(f"{len(nonfinite)} non-finite or non-numeric target(s): {_some(nonfinite)}")
    negative = ids[values < 0]
    if len(negative):
        problems.append(f"{len(negative)} negative target(s): {_some(negative)}")
    if not problems:
        problems += _identity_problems(ids, values, where)
    if problems:
        raise SubmissionError(f"{where} is not valid, nothing written:\n  - " + "\n  - ".join(problems))


def _identity_problems(ids: pd.Series, values: np.ndarray, where: str) -> list[str]:
    """GDM = clover + green and Total = clover + dead + green, image by image."""
    parts = split_sample_ids(ids, where).assign(target=values)
    wide = parts.pivot(index="image_id", columns="target_name", values="target")
    absent = [t for t in TARGETS if t not in wide.columns]
    if absent or wide.isna().any().any():
        return [f"some images lack a row for one of the targets {list(TARGETS)}"]
    c, d, g = (wide[t].to_numpy() for t in ("Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g"))
    out = []
    for name, lhs, rhs in (("GDM_g", wide["GDM_g"].to_numpy(), c + g), ("Dry_Total_g", wide["Dry_Total_g"], c + d + g)):
        bad = wide.index[~np.isclose(lhs, rhs, rtol=IDENTITY_RTOL, atol=IDENTITY_RTOL)]
        if len(bad):
            out.append(f"{name} does not equal the sum of its components for image(s) {_some(bad)}")
    return out


def make_submission(predictions: pd.DataFrame, sample_ids: Sequence[str]) -> pd.DataFrame:
    """Per-image predictions (image_id + the 5 targets in grams) -> the long `sample_id,target` frame."""
    dup = predictions["image_id"][predictions["image_id"].duplicated()].unique()
    if len(dup):
        raise SubmissionError(f"predictions list image(s) more than once: {_some(dup)}; nothing written")
    try:
        return to_long(predictions, sample_ids=sample_ids)
    except DataError as e:
        raise SubmissionError(f"{e}; nothing written") from e


def write_submission(path: str | Path, predictions: pd.DataFrame, test_csv: str | Path) -> pd.DataFrame:
    """Build, validate, then atomically write submission.csv; returns the frame written."""
    ids = expected_sample_ids(test_csv)
    sub = make_submission(predictions, ids)
    validate_submission(sub, ids, where=f"submission for {test_csv}")
    write_csv(path, sub)
    return sub


def read_long_file(path: str | Path) -> pd.DataFrame:
    """A `sample_id,target` file (submission or labels) with numeric targets."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    try:
        df = pd.read_csv(path, dtype={"sample_id": str})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV ({e}); expected a header sample_id,target and one row "
                              "per sample") from None
    if not set(COLUMNS) <= set(df.columns):
        raise SubmissionError(f"{path}: needs columns {COLUMNS}, found {list(df.columns)}")
    dup = df["sample_id"][df["sample_id"].duplicated()].unique()
    if len(dup):
        raise SubmissionError(f"{path}: duplicated sample_id(s) {_some(dup)}")
    values = pd.to_numeric(df["target"], errors="coerce")
    if values.isna().any() or not np.isfinite(values).all():
        raise SubmissionError(f"{path}: non-numeric or non-finite target for {_some(df['sample_id'][values.isna()])}")
    return df[COLUMNS].assign(target=values.astype(float))


def long_to_wide(df: pd.DataFrame, where: str) -> pd.DataFrame:
    """Long rows -> one row per image (index image_id, first-appearance order), columns TARGETS."""
    parts = split_sample_ids(df["sample_id"], where).assign(target=df["target"].to_numpy())
    order = parts["image_id"].drop_duplicates()
    wide = parts.pivot(index="image_id", columns="target_name", values="target").reindex(index=order)
    wide = wide.reindex(columns=list(TARGETS))
    incomplete = wide.index[wide.isna().any(axis=1)]
    if len(incomplete):
        raise SubmissionError(f"{where}: image(s) without a row for every target: {_some(incomplete)}")
    return wide


def score(submission: str | Path, labels: str | Path) -> dict:
    """competition_r2, log_r2 and per-target R^2 of a submission against a labels file with the same ids."""
    sub, lab = read_long_file(submission), read_long_file(labels)
    only_sub = sorted(set(sub["sample_id"]) - set(lab["sample_id"]))
    only_lab = sorted(set(lab["sample_id"]) - set(sub["sample_id"]))
    if only_sub or only_lab:
        raise SubmissionError(
            f"sample ids differ between {submission} and {labels}: {len(only_lab)} only in the labels "
            f"{_some(only_lab)}, {len(only_sub)} only in the submission {_some(only_sub)}"
        )
    y_true = long_to_wide(lab, str(labels))
    y_pred = long_to_wide(sub, str(submission)).reindex(index=y_true.index)
    return score_table(y_true.to_numpy(), y_pred.to_numpy())


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
    scores = score(submission, labels)
    print_scores(scores, str(submission))
    if json_out is not None:
        from biomass_cache.common.io import write_json

        write_json(json_out, scores)
        typer.echo(f"scores written to {json_out}")
    else:
        typer.echo(json.dumps({k: scores[k] for k in ("competition_r2", "log_r2")}))


def report_path(out: str | Path) -> Path:
    """Where submit writes the ensemble's report (weights, OOF scores) beside the submission: NAME.report.json."""
    return Path(out).with_suffix(".report.json")


def submit(spec, data: str | Path, out: str | Path, work_dir: str | Path | None = None, device: str = "cpu",
           progress: bool = True, precision: str | None = None, devices: Sequence[str] | None = None):
    """Run the ensemble on data/test.csv, write the validated submission and its report JSON beside it; returns
    (EnsembleResult, frame)."""
    from biomass_cache.submit.ensemble import report_text, run_ensemble
    from biomass_cache.common.io import write_json

    data, out = Path(data), Path(out)
    result = run_ensemble(spec, data, Path(work_dir) if work_dir else out.parent, device=device, progress=progress,
                          precision=precision, devices=devices)
    sub = write_submission(out, result.frame(), data / "test.csv")
    write_json(report_path(out), {**result.report, "submission": str(out)})
    typer.echo(report_text(result))
    typer.echo(f"submission: {out} ({len(sub)} rows, validated); report: {report_path(out)}")
    return result, sub


def parse_devices(text: str | None) -> list[str] | None:
    """`--devices cuda:0,cuda:1` as a list (None: one device)."""
    return [d.strip() for d in text.split(",") if d.strip()] if text else None


def submit_command(
    data: Path = typer.Option(..., "--data", help="Kaggle-format data folder with test.csv and test/ images."),
    members: Optional[str] = typer.Option(None, "--members", help="Run folder(s), comma-separated: equal "
                                          "weights, each member's backbone settings from its config.json."),
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
    from biomass_cache.submit.spec import spec_from_options
    from biomass_cache.common.distributed import resolve_device

    device = str(resolve_device(device))
    spec = spec_from_options(ensemble, members, aggregation, mc_samples, weights, allow_collapsed)
    submit(spec, data, out, work_dir, device, precision=precision, devices=parse_devices(devices))
    if labels is not None:
        print_scores(score(out, labels), f"{out} vs {labels}")
