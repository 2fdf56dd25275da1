"""The Kaggle data layer: long CSV (one row per image and target) <-> image table (one row per image).

Every problem in an input file is reported with the file, the CSV line and what is wrong; nothing is dropped
silently. CSV line numbers count the header as line 1, so the first data row is line 2.
"""

from __future__ import annotations

import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Sequence

import numpy as np
import pandas as pd

from biomass_cache.common.errors import DataError
from biomass_cache.common.targets import TARGETS

REQUIRED = ("sample_id", "image_path", "target_name")
METADATA = ("Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm")
NUMERIC_METADATA = ("Pre_GSHH_NDVI", "Height_Ave_cm")
SEP = "__"
MAX_LISTED = 5  # how many offending rows an error message names


def _lines(rows: Sequence[int] | pd.Index) -> str:
    rows = [int(r) + 2 for r in rows]
    more = f" and {len(rows) - MAX_LISTED} more" if len(rows) > MAX_LISTED else ""
    return ", ".join(map(str, rows[:MAX_LISTED])) + more


def read_long_csv(path: str | Path, check_images: bool = True) -> pd.DataFrame:
    """Read train.csv or test.csv into one row per image.

    Columns: `image_id`, `image_path` (relative to the CSV's folder), the metadata columns present in the file,
    and, when the file has a `target` column, one float column per target in TARGETS order (NaN where that
    image has no row for the target). Images keep the order of their first appearance.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV ({e})") from e

    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; found {list(raw.columns)}")
    if raw.empty:
        raise DataError(f"{path}: no data rows")
    for col in REQUIRED:
        empty = raw.index[raw[col].str.strip() == ""]
        if len(empty):
            raise DataError(f"{path}: empty {col} on line(s) {_lines(empty)}")

    outside = raw.index[raw["image_path"].map(_leaves_folder)]
    if len(outside):
        r = outside[0]
        raise DataError(f"{path}: image_path leaves the CSV's folder on line(s) {_lines(outside)} (line {r + 2}: "
                        f"{raw.at[r, 'image_path']!r}); image paths are relative to {path.parent} and stay inside "
                        "it: move or link the photos into that folder")

    unknown = raw.index[~raw["target_name"].isin(TARGETS)]
    if len(unknown):
        names = sorted(set(raw.loc[unknown, "target_name"]))
        raise DataError(
            f"{path}: unknown target_name {names} on line(s) {_lines(unknown)}; expected one of {list(TARGETS)}"
        )

    image_id = raw["image_path"].map(lambda p: Path(p).stem)
    bad_sid = raw.index[raw["sample_id"] != image_id + SEP + raw["target_name"]]
    if len(bad_sid):
        r = bad_sid[0]
        raise DataError(
            f"{path}: sample_id does not match <image_id>{SEP}<target_name> on line(s) {_lines(bad_sid)} "
            f"(line {r + 2}: sample_id {raw.at[r, 'sample_id']!r}, image_path {raw.at[r, 'image_path']!r}, "
            f"target_name {raw.at[r, 'target_name']!r})"
        )

    dup = raw.index[raw.duplicated(["image_path", "target_name"], keep=False)]
    if len(dup):
        raise DataError(f"{path}: duplicated (image, target) rows on line(s) {_lines(dup)}")
    ambiguous = raw.groupby(image_id)["image_path"].nunique()
    if (ambiguous > 1).any():
        ids = list(ambiguous.index[ambiguous > 1])[:MAX_LISTED]
        raise DataError(f"{path}: image id(s) {ids} appear with different image_path values")

    raw = raw.assign(image_id=image_id)
    table = raw.drop_duplicates("image_id")[["image_id", "image_path"]].reset_index(drop=True)

    meta_cols = [c for c in METADATA if c in raw.columns]
    for col in meta_cols:
        per_image = raw.groupby("image_id", sort=False)[col].nunique()
        if (per_image > 1).any():
            iid = per_image.index[per_image > 1][0]
            values = sorted(set(raw.loc[raw["image_id"] == iid, col]))
            raise DataError(f"{path}: conflicting {col} for image {iid}: {values}")
    if meta_cols:
        first = raw.drop_duplicates("image_id")  # the rows of an image agree (checked above): its first speaks
        table = table.join(first.set_index("image_id")[meta_cols], on="image_id")
        for col in (c for c in NUMERIC_METADATA if c in meta_cols):
            table[col] = _numeric(first[col], f"{path}: column {col}", allow_missing=True).to_numpy()
        if "Sampling_Date" in meta_cols:
            parsed = pd.to_datetime(table["Sampling_Date"], format="%Y/%m/%d", errors="coerce")
            bad = table.index[parsed.isna() & (table["Sampling_Date"] != "")]
            if len(bad):
                raise DataError(
                    f"{path}: Sampling_Date {table.at[bad[0], 'Sampling_Date']!r} of image "
                    f"{table.at[bad[0], 'image_id']} is not a YYYY/M/D date"
                )

    if "target" in raw.columns:
        values = _numeric(raw["target"], f"{path}: column target", allow_missing=False)
        negative = raw.index[values < 0]
        if len(negative):
            raise DataError(f"{path}: negative target on line(s) {_lines(negative)}")
        wide = pd.DataFrame({"image_id": raw["image_id"], "t": raw["target_name"], "v": values})
        wide = wide.pivot(index="image_id", columns="t", values="v").reindex(columns=list(TARGETS))
        table = table.join(wide, on="image_id")
        incomplete = table.index[table[list(TARGETS)].isna().any(axis=1)]
        if len(incomplete):
            warnings.warn(
                f"{path}: {len(incomplete)} image(s) lack some target rows (kept, those targets are masked): "
                f"{list(table.loc[incomplete[:MAX_LISTED], 'image_id'])}",
                stacklevel=2,
            )

    if check_images:
        missing_files = [p for p in table["image_path"] if not (path.parent / p).is_file()]
        if missing_files:
            raise DataError(
                f"{path}: {len(missing_files)} image file(s) do not exist under {path.parent}: "
                f"{missing_files[:MAX_LISTED]}"
            )
    return table


def _leaves_folder(image_path: str) -> bool:
    """An absolute path, a drive, or a `..` step: the photo would be read from outside the data folder."""
    posix = PurePosixPath(image_path.replace("\\", "/"))
    return posix.is_absolute() or ".." in posix.parts or bool(PureWindowsPath(image_path).drive)


def read_training_table(path: str | Path, check_images: bool = True) -> pd.DataFrame:
    """`read_long_csv` of a file to train on: it must carry the labels (a `target` column)."""
    table = read_long_csv(path, check_images=check_images)
    if TARGETS[0] not in table.columns:
        raise DataError(f"{path}: no `target` column: training needs the labels (one row per image and target_name "
                        f"with its target value in grams); is this a test.csv?")
    return table


def _numeric(col: pd.Series, where: str, allow_missing: bool) -> pd.Series:
    """Strings (a column of the CSV, its index = data row) -> floats; anything non-numeric or non-finite is an
    error naming the CSV line(s)."""
    blank = col.str.strip() == ""
    values = pd.to_numeric(col.where(~blank), errors="coerce")
    bad = col.index[(values.isna() & ~blank) | np.isinf(values.to_numpy(dtype=float, na_value=0.0))]
    if not allow_missing:
        bad = bad.union(col.index[blank])
    if len(bad):
        raise DataError(f"{where}: non-numeric, empty or non-finite value {col[bad[0]]!r} at line(s) {_lines(bad)}")
    return values.astype(float)


def to_long(table: pd.DataFrame, sample_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Image table (image_id + target columns) -> submission rows `sample_id,target`.

    With `sample_ids` (e.g. test.csv's column) the rows follow that order exactly and every id must be
    answerable; otherwise images keep their order and targets are alphabetical, as in Kaggle's files.
    """
    missing_cols = [c for c in ("image_id", *TARGETS) if c not in table.columns]
    if missing_cols:
        raise DataError(f"prediction table lacks columns {missing_cols}")
    long = table.melt(id_vars="image_id", value_vars=list(TARGETS), var_name="target_name", value_name="target")
    long["sample_id"] = long["image_id"] + SEP + long["target_name"]
    if sample_ids is None:
        order = {iid: k for k, iid in enumerate(table["image_id"])}
        long = long.assign(_o=long["image_id"].map(order)).sort_values(["_o", "target_name"], kind="stable")
        return long[["sample_id", "target"]].reset_index(drop=True)
    indexed = long.set_index("sample_id")["target"]
    unknown = [s for s in sample_ids if s not in indexed.index]
    if unknown:
        raise DataError(f"no prediction for {len(unknown)} sample_id(s): {unknown[:MAX_LISTED]}")
    return pd.DataFrame({"sample_id": list(sample_ids), "target": indexed.loc[list(sample_ids)].to_numpy()})
