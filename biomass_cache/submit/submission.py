"""The last step: a validated, atomically written submission.csv, and local scoring of such a file.

A submission is checked completely before a byte is written (one row per test.csv sample_id, in test.csv's order,
finite, non-negative, GDM = clover + green and Total = clover + dead + green per image), so a file that exists is
a file Kaggle accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from biomass_cache.common.data import MAX_LISTED, SEP, read_long_csv, to_long
from biomass_cache.common.errors import DataError, SubmissionError
from biomass_cache.common.io import write_csv
from biomass_cache.common.metrics import score_table
from biomass_cache.common.targets import TARGETS

COLUMNS = ["sample_id", "target"]
IDENTITY_RTOL = 1e-6  # written floats round-trip exactly; this only absorbs the sums' last-bit rounding


def _some(items: Sequence) -> str:
    items = list(items)
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{items[:MAX_LISTED]}{more}"


def expected_sample_ids(test_csv: str | Path) -> list[str]:
    """test.csv's sample_ids in file order (the order a submission must follow), after checking the file."""
    read_long_csv(test_csv, check_images=False)
    return pd.read_csv(test_csv, dtype=str, keep_default_na=False)["sample_id"].tolist()


def check_every_target(test_csv: str | Path) -> None:
    """Refuse, before any prediction, a test.csv that asks for some targets of an image but not all five: the
    submission's identities (GDM = clover + green, total = the three) are checked on whole images."""
    parts = split_sample_ids(pd.Series(expected_sample_ids(test_csv)), str(test_csv))
    listed = parts.groupby("image_id", sort=False)["target_name"].agg(set)
    partial = listed[listed.map(len) < len(TARGETS)]
    if len(partial):
        first = partial.index[0]
        raise DataError(f"{test_csv}: {len(partial)} image(s) lack a row for some of the five targets, e.g. {first} "
                        f"has no {sorted(set(TARGETS) - partial.iloc[0])}; list all five targets of every image (the "
                        "competition's test.csv does)")


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


MAX_GRAMS = 1e5  # 100 kg of dry matter on 0.21 m^2: far above any pasture (the real maximum is a few hundred g)


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
    absurd = ids[values > MAX_GRAMS]
    if len(absurd):
        problems.append(f"{len(absurd)} target(s) above {MAX_GRAMS:g} g, no plant mass of a 70 x 30 cm quadrat (a "
                        f"diverged model? retrain with a lower --lr): {_some(absurd)}, up to {np.nanmax(values):.3g} g")
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
        df = pd.read_csv(path, dtype={"sample_id": str, "target": str}, keep_default_na=False)  # text to quote
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SubmissionError(f"{path}: not a readable CSV ({e}); expected a header sample_id,target and one row "
                              "per sample") from None
    if not set(COLUMNS) <= set(df.columns):
        raise SubmissionError(f"{path}: needs columns {COLUMNS}, found {list(df.columns)}")
    dup = df["sample_id"][df["sample_id"].duplicated()].unique()
    if len(dup):
        raise SubmissionError(f"{path}: duplicated sample_id(s) {_some(dup)}")
    values = pd.to_numeric(df["target"], errors="coerce")
    bad = ~np.isfinite(values.to_numpy(float))  # NaN where not a number, inf where 1e400 overflowed
    if bad.any():
        rows = np.flatnonzero(bad)
        raise SubmissionError(f"{path}: non-numeric or non-finite target for {_some(df['sample_id'].iloc[rows])} "
                              f"(line {rows[0] + 2}: {df['target'].iloc[rows[0]]!r}); every target must be a finite "
                              "number of grams")
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
    with np.errstate(over="ignore"):
        scores = score_table(y_true.to_numpy(), y_pred.to_numpy())
    if not np.isfinite(scores["competition_r2"]):  # finite values whose squared errors overflow (1e300 g)
        r = int(np.argmax(np.abs(sub["target"].to_numpy())))
        raise SubmissionError(f"{submission}: the errors overflow, so no score exists: line {r + 2} predicts "
                              f"{sub['target'].iloc[r]:g} g for {sub['sample_id'].iloc[r]}; targets are grams of one "
                              "quadrat")
    return scores
