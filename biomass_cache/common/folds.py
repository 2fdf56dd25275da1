"""Grouped k-fold: photos from one (Sampling_Date, State) visit are near-duplicates in light, season and
pasture, so a visit never spans two folds. The split is written next to a run and reused by every later stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from biomass_cache.common.errors import DataError
from biomass_cache.common.io import write_csv

GROUP_COLUMNS = ("Sampling_Date", "State")


def visit_groups(table: pd.DataFrame) -> pd.Series:
    """The (Sampling_Date, State) group label of every image row."""
    missing = [c for c in GROUP_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"grouped folds need columns {list(GROUP_COLUMNS)} (the photos of one visit must stay in one "
                        f"fold); the table lacks {missing}: add them, or give --folds-csv with a fold per image")
    empty = table.index[(table["Sampling_Date"].astype(str) == "") | (table["State"].astype(str) == "")]
    if len(empty):
        raise DataError(f"images {list(table.loc[empty[:5], 'image_id'])} have no Sampling_Date or State")
    return table["Sampling_Date"].astype(str) + "|" + table["State"].astype(str)


def grouped_folds(table: pd.DataFrame, n_splits: int = 5, seed: int = 0, stratify: bool = False) -> np.ndarray:
    """Fold id (0..n_splits-1) per image row; no group spans two folds.

    Without stratification the folds are balanced in size (sklearn's GroupKFold greedy assignment, largest
    group first); the seed relabels the groups, which changes the tie-breaks and the fold order. With
    `stratify`, StratifiedGroupKFold also spreads each State over the folds.
    """
    groups = visit_groups(table)
    names = groups.unique()
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    if n_splits > len(names):
        raise DataError(f"cannot make {n_splits} grouped folds from {len(names)} (Sampling_Date, State) groups; "
                        f"use --folds {len(names)} or fewer")
    rng = np.random.default_rng(seed)
    codes = groups.map(dict(zip(names, rng.permutation(len(names))))).to_numpy()
    X = np.zeros((len(table), 1))
    if stratify:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = splitter.split(X, table["State"].astype(str), groups=codes)
    else:
        splits = GroupKFold(n_splits=n_splits).split(X, groups=codes)
    folds = np.full(len(table), -1, dtype=np.int64)
    for fold, (_, test) in zip(rng.permutation(n_splits), splits):
        folds[test] = fold
    return folds


def write_folds(path: str | Path, table: pd.DataFrame, folds: np.ndarray) -> None:
    """The split beside a run; its `group` column is for reading only (blank parts where the table lacks a group
    column, as it may with --folds-csv)."""
    date, state = (table[c].astype(str) if c in table else pd.Series("", index=table.index) for c in GROUP_COLUMNS)
    write_csv(path, pd.DataFrame({"image_id": table["image_id"], "group": date + "|" + state, "fold": folds}))


def read_folds(path: str | Path, table: pd.DataFrame) -> np.ndarray:
    """Fold ids aligned with `table`'s rows; every image must be in the file exactly once."""
    df = pd.read_csv(path, dtype={"image_id": str})
    if not {"image_id", "fold"} <= set(df.columns):
        raise DataError(f"{path}: a folds file needs columns image_id and fold, found {list(df.columns)}")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise DataError(f"{path}: image ids listed twice: {list(dup[:5])}")
    fold_of = df.set_index("image_id")["fold"]
    missing = [i for i in table["image_id"] if i not in fold_of.index]
    if missing:
        raise DataError(f"{path}: {len(missing)} image(s) of the data table have no fold: {missing[:5]}")
    return fold_of.loc[table["image_id"]].to_numpy(dtype=np.int64)


def fold_assignment(table: pd.DataFrame, out: Path, n_folds: int, seed: int, folds_csv: Path | None,
                    strict: bool, stratify: bool = False, csv: Path | None = None) -> np.ndarray:
    """Folds from --folds-csv, else from the run folder's folds.csv, else new grouped folds (`stratify`: each State
    spread over the folds) of the table read from `csv`; saved in the run (created here, once the split is valid).

    A reused file sets the number of folds; with `strict` (--folds given) it must have exactly `n_folds`.
    """
    source = folds_csv or (out / "folds.csv" if (out / "folds.csv").is_file() else None)
    if source is not None:
        folds = read_folds(source, table)
        found = sorted(set(folds.tolist()))
        if found != list(range(len(found))) or len(found) < 2 or (strict and len(found) != n_folds):
            raise DataError(f"{source}: has folds {found}; expected 0..K-1 with K >= 2"
                            + (f" and K = --folds {n_folds}" if strict else "")
                            + ("; a run folder keeps its folds: remove the file, or write to another --out, for new "
                               "ones" if source == out / "folds.csv" else ""))
        print(f"using the {len(found)} folds of {source}")
    else:
        try:
            folds = grouped_folds(table, n_splits=n_folds, seed=seed, stratify=stratify)
        except DataError as e:
            raise DataError(f"{csv}: {e}" if csv else str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    write_folds(out / "folds.csv", table, folds)
    return folds
