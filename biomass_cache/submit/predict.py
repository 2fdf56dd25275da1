"""Predictions for any folder of quadrat photos (no CSV): grams and g/m^2 per photo, optional density-map PNGs.

The photos are described by a temporary Kaggle-like test.csv (image_id = file stem, the photos linked in beside it), so
the very same ensemble machinery as `biomass submit` runs on them: test caches per backbone (reused), member
predictions (cached), aggregation in component space.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from biomass_cache.common.data import SEP
from biomass_cache.common.photo import check_photos, list_photos, report_skipped
from biomass_cache.common.errors import DataError
from biomass_cache.common.io import check_output_file, write_csv, writing
from biomass_cache.common.maps import maps_folder, save_map_png
from biomass_cache.common.conformal import calibrate
from biomass_cache.common.targets import PLOT_AREA_M2, TARGETS, prediction_frame
from biomass_cache.submit.ensemble import EnsembleResult, run_ensemble
from biomass_cache.submit.members import draws_maps, load_checked_heads, resolve_member, store_positions
from biomass_cache.submit.shift import ensemble_shift, warning_text
from biomass_cache.submit.spec import FITTED, EnsembleSpec
from biomass_cache.train import inference

def input_sizes(spec: EnsembleSpec) -> set[tuple[int, int]]:
    """The (W, H) model inputs of the ensemble's members (those whose run records one)."""
    found = (resolve_member(m, spec.weights_files).extract.get("size") for m in spec.members)
    return {(int(s[0]), int(s[1])) for s in found if s}


def write_photo_table(photos: list[Path], data_dir: Path) -> Path:
    """A Kaggle-format test.csv for the photos in `data_dir`, each photo linked in as photos/NAME (copied where
    links are not allowed), since a data folder's image paths stay inside it; returns its path."""
    (data_dir / "photos").mkdir()
    for p in photos:
        try:
            (data_dir / "photos" / p.name).symlink_to(p.resolve())
        except OSError:
            shutil.copyfile(p, data_dir / "photos" / p.name)
    rows = [(f"{p.stem}{SEP}{t}", f"photos/{p.name}", t) for p in photos for t in sorted(TARGETS)]
    path = data_dir / "test.csv"
    write_csv(path, pd.DataFrame(rows, columns=["sample_id", "image_path", "target_name"]))
    return path


def predictions_table(result: EnsembleResult, photos: list[Path]) -> pd.DataFrame:
    """One row per photo: the 5 targets in grams and as areal densities (g/m^2 of the 70 x 30 cm quadrat)."""
    return prediction_frame(result.image_ids, [str(p) for p in photos], result.grams)


def density_maps(result: EnsembleResult, device: str = "cpu") -> np.ndarray | None:
    """(N, 3, rows, cols) g/m^2 maps on the clean view, averaged over the fold models of the members whose heads
    draw maps (`has_maps`).

    None when no member has a head that gives maps. Members on different patch grids cannot be averaged.
    """
    maps = []
    for rm, store in zip(result.resolved, result.stores):
        if store is None:
            continue
        rows = store_positions(store, result.image_ids)
        for head, meta in load_checked_heads(rm, store):
            if not head.has_maps:
                break
            maps.append(inference.predict_store(head, meta, store, rows, views=0, device=device, ignore=rm.ignore,
                                                maps=True).maps)
    if not maps:
        return None
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise DataError(f"density maps of the members have different shapes {sorted(shapes)}; use --maps with "
                        f"members on one patch grid")
    return np.mean(maps, axis=0)


def recorded_train_csv(spec: EnsembleSpec) -> Path | None:
    """The train.csv the first run-folder member recorded in its config.json (None: none recorded or gone)."""
    for m in spec.members:
        config = m.path / "config.json" if m.path.is_dir() else None
        if config is not None and config.is_file():
            data = json.loads(config.read_text()).get("data")
            if data and (Path(data) / "train.csv").is_file():
                return Path(data) / "train.csv"
    return None


def predict_photos(photo_dir: str | Path, spec: EnsembleSpec, out: str | Path, work_dir: str | Path,
                   maps: bool = False, device: str = "cpu", progress: bool = True,
                   train_csv: str | Path | None = None, skip_bad: bool = False, precision: str | None = None,
                   devices: list[str] | None = None, interval: float | None = None) -> pd.DataFrame:
    """Predict every photo of `photo_dir`; writes `out` (CSV) and with `maps` `<out stem>_maps/<id>.png`.

    With `skip_bad`, unreadable photos are left out and listed at the end (see `check_photos`). With `interval`
    (a level such as 0.9), every target gets `_low` and `_high` columns: split-conformal bounds calibrated on the
    ensemble's out-of-fold residuals (common/conformal.py)."""
    photo_dir, out, work_dir = Path(photo_dir), Path(out), Path(work_dir)
    check_output_file(out, "--out")
    folder = maps_folder(out) if maps else None
    if maps and not any(draws_maps(resolve_member(m, spec.weights_files)) for m in spec.members):
        raise DataError("--maps needs at least one member whose head draws density maps (head 'density'); "
                        f"none of {[m.name for m in spec.members]} has one")
    if interval is not None and not 0 < interval < 1:
        raise DataError(f"--interval {interval}: the level must be between 0 and 1, e.g. 0.9")
    if train_csv is None and (interval is not None or spec.aggregation in FITTED):
        train_csv = recorded_train_csv(spec)  # the labels of the OOF predictions: the members' training data
    photos, bad = check_photos(list_photos(photo_dir), input_sizes(spec), skip_bad)
    with tempfile.TemporaryDirectory(prefix="biomass-photos-") as tmp, writing(out, also=tmp):
        write_photo_table(photos, Path(tmp))
        result = run_ensemble(spec, tmp, work_dir, device=device, progress=progress, train_csv=train_csv,
                              precision=precision, devices=devices,
                              require_oof="--interval" if interval is not None else None)
    dmaps = density_maps(result, device) if maps else None  # before any output: a failure leaves none
    table = predictions_table(result, photos)
    if interval is not None:
        try:
            conformal = calibrate(result.oof.labels, result.oof.grams, level=interval)
        except ValueError as e:
            raise DataError(f"--interval {interval}: {e}") from None
        low, high = conformal.bounds(result.grams)
        for j, t in enumerate(TARGETS):
            table.insert(table.columns.get_loc(t) + 1, f"{t}_low", low[:, j])
            table.insert(table.columns.get_loc(t) + 2, f"{t}_high", high[:, j])
        print(f"{interval:.0%} prediction intervals: split-conformal on {conformal.n} out-of-fold residuals "
              "(columns <target>_low, <target>_high, grams)")
    shift = ensemble_shift(result)
    if shift is not None:  # how far each photo is from the training photos (1 = the calibrated threshold)
        table["shift_distance"], table["unusual"] = shift["shift_distance"].to_numpy(), shift["unusual"].to_numpy()
    write_csv(out, table)
    if shift is not None and (warning := warning_text(shift)):
        print(warning, file=sys.stderr)
    if dmaps is not None:
        for k, photo in enumerate(tqdm(photos, desc="density maps", disable=not progress)):
            save_map_png(folder / f"{photo.stem}.png", photo, dmaps[k], result.grams[k])
        print(f"density maps: {folder}/ ({len(photos)} PNG)")
    print(f"predictions for {len(photos)} photos: {out} (grams and g/m^2; quadrat area {PLOT_AREA_M2} m^2)")
    report_skipped(bad)
    return table
