"""A synthetic Kaggle-format pasture dataset: the embedded default data for the demo and every test.

Real competition images cannot be downloaded, so this writes a complete data folder in the competition's exact
formats (train.csv, test.csv, sample_submission.csv, train/*.jpg, test/*.jpg) plus test_labels.csv, the hidden
answers for local scoring. Two generators (`style`): "blades" (`synth/blades.py`, the default) and "canopy"
(`synth/canopy.py`, an independent one for transfer tests).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from tqdm import tqdm

from biomass_cache.synth.blades import paint, sample_labels
from biomass_cache.synth.canopy import paint_canopy, sample_labels_canopy
from biomass_cache.common.io import writing
from biomass_cache.common.targets import TARGETS

CSV_TARGETS = tuple(sorted(TARGETS))  # Kaggle's files list an image's targets alphabetically
STYLES = ("blades", "canopy")  # generators (`generate(style=)`)


def _image_ids(n: int, rng: np.random.Generator) -> list[str]:
    """n unique ids `ID` + 7 to 10 digits."""
    ids: list[str] = []  # a list keeps the draw order (a set's order would vary between runs)
    seen: set[str] = set()
    while len(ids) < n:
        digits = int(rng.integers(7, 11))
        new = f"ID{rng.integers(10 ** (digits - 1), 10**digits)}"
        if new not in seen:
            seen.add(new)
            ids.append(new)
    return ids


def _long_rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """Kaggle long format: one row per (image, target), sorted by image id, targets alphabetical."""
    table = table.sort_values("image_id", kind="stable")
    long = table.loc[table.index.repeat(len(CSV_TARGETS))].reset_index(drop=True)
    long["target_name"] = np.tile(CSV_TARGETS, len(table))
    long["sample_id"] = long["image_id"] + "__" + long["target_name"]
    long["image_path"] = split + "/" + long["image_id"] + ".jpg"
    long["target"] = table[list(CSV_TARGETS)].to_numpy().ravel()  # row-major: image by image, targets in order
    return long


def _write_csvs(folder: Path, train: pd.DataFrame, test: pd.DataFrame) -> None:
    """train.csv, test.csv, sample_submission.csv and test_labels.csv in the competition's columns and orders."""
    meta = ["Sampling_Date", "State", "Species", "Pre_GSHH_NDVI", "Height_Ave_cm"]
    tr, te = _long_rows(train, "train"), _long_rows(test, "test")
    tr[["sample_id", "image_path", *meta, "target_name", "target"]].to_csv(folder / "train.csv", index=False)
    te[["sample_id", "image_path", "target_name"]].to_csv(folder / "test.csv", index=False)
    te.assign(target=0.0)[["sample_id", "target"]].to_csv(folder / "sample_submission.csv", index=False)
    te[["sample_id", "target"]].to_csv(folder / "test_labels.csv", index=False)


# ================================================================ generate + command


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent stream per purpose (ids, labels of a split, one image), so every image is reproducible alone."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; use overwrite=True (--overwrite) to replace it")


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to out_dir; an existing non-empty out_dir is swapped out, then deleted."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)  # rename(2) replaces a missing or empty directory


def _style(name: str) -> tuple[Callable, Callable, tuple[int, ...]]:
    """(label sampler, painter, random-stream key prefix) of a style; the prefix keeps styles' draws independent."""
    styles = {"blades": (sample_labels, paint, ()), "canopy": (sample_labels_canopy, paint_canopy, (1,))}
    if name not in styles:
        raise ValueError(f"unknown style {name!r}; choose one of {', '.join(STYLES)}")
    return styles[name]


def generate(out_dir: Path, n_train: int = 120, n_test: int = 24, seed: int = 0, size: tuple[int, int] = (1000, 500),
             progress: bool = True, overwrite: bool = False, style: str = "blades") -> dict:
    """Write a complete synthetic Kaggle-format data folder at out_dir, atomically; return a summary.

    `style` picks the generator (STYLES): "blades" (this module) or "canopy" (`synth/canopy.py`, an independent one
    for transfer tests). Deterministic: the same arguments give byte-identical CSVs and images. The folder is built in a hidden
    sibling and renamed into place, so out_dir is either complete or untouched. The summary's images_per_s
    (painting + JPEG, one process) is wall-clock, so it is lower on a shared CPU.
    """
    out_dir = Path(out_dir)
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be at least 1, got {n_train} and {n_test}")
    width, height = size
    if min(width, height) < 16:
        raise ValueError(f"image size must be at least 16 x 16 pixels, got {width} x {height}")
    sampler, painter, key = _style(style)
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    start = time.perf_counter()
    with writing(out_dir):  # a full disk names out_dir, not the hidden folder being filled
        try:
            ids = _image_ids(n_train + n_test, _rng(seed, *key, 0))
            tables = {}
            with tqdm(total=n_train + n_test, desc="synth", unit="img", disable=not progress) as bar:
                for code, (split, split_ids) in enumerate([("train", ids[:n_train]), ("test", ids[n_train:])]):
                    table, drawn = sampler(len(split_ids), _rng(seed, *key, 1, code))
                    tables[split] = table.assign(image_id=split_ids)
                    (tmp / split).mkdir()
                    for i, image_id in enumerate(split_ids):
                        img = painter(_rng(seed, *key, 2, code, i), (width, height), drawn[i],
                                    float(table.at[i, "Height_Ave_cm"]), table.at[i, "Sampling_Date"])
                        img.save(tmp / split / f"{image_id}.jpg", format="JPEG", quality=90)
                        bar.update()
            _write_csvs(tmp, tables["train"], tables["test"])
            tmp.chmod(0o755)  # mkdtemp makes it private
            _check_out_dir(out_dir, overwrite)  # it may have appeared meanwhile
            _move_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    seconds = time.perf_counter() - start
    return {
        "out_dir": str(out_dir), "n_train": n_train, "n_test": n_test, "seed": seed, "style": style,
        "size": [width, height],
        "seconds": round(seconds, 3), "images_per_s": round((n_train + n_test) / seconds, 1),
        "files": {name: str(out_dir / name) for name in
                  ("train.csv", "test.csv", "sample_submission.csv", "test_labels.csv", "train", "test")},
    }
