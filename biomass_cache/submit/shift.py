"""Test photos unlike every training photo, found from the cached tokens before anyone trusts their predictions.

Each image is summarised by its clean view's tokens averaged over the patch grid, per cached layer (the "pooled
tokens"), standardised with the training images' statistics. An image's distance to the training set is the mean
distance to its K nearest training images. The threshold is calibrated on the training images themselves: each
one's distance to the training images of *other* visits (its own visit's photos are near-duplicates, and a test
photo never has them), and the threshold is the 99th percentile of those. A test photo beyond it is further from
the training set than 99 % of the training photos are from the rest: `submit` and `predict` list it, never predict
it silently as if it were in distribution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from biomass_cache.common.data import read_long_csv
from biomass_cache.common.folds import visit_groups
from biomass_cache.store.handle import TokenStore
from biomass_cache.store.layout import open_store
from biomass_cache.submit.members import store_positions

NEIGHBOURS = 5
QUANTILE = 0.99


def pooled_tokens(store: TokenStore, rows: Sequence[int]) -> np.ndarray:
    """(N, layers x channels): view 0's tokens averaged over the patch grid, per layer."""
    return np.stack([store.read(int(i), 0).mean(axis=1).ravel() for i in rows]).astype(np.float64)


def _knn_mean(d: np.ndarray, k: int) -> np.ndarray:
    """Mean of each row's k smallest finite distances (inf: a pair that does not count); NaN for a row with none."""
    nearest = np.sort(d, axis=1)[:, :min(k, d.shape[1])]
    finite = np.isfinite(nearest)
    with np.errstate(invalid="ignore"):
        return np.where(finite, nearest, 0).sum(axis=1) / finite.sum(axis=1)


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


@dataclass(frozen=True)
class ShiftModel:
    mean: np.ndarray
    std: np.ndarray
    train: np.ndarray  # standardised training features
    threshold: float
    calibration: np.ndarray  # each training image's distance to the other visits

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Each image's mean distance to its NEIGHBOURS nearest training images, over the threshold (1 = at it)."""
        z = (features - self.mean) / self.std
        return _knn_mean(_distances(z, self.train), NEIGHBOURS) / self.threshold


def fit_shift(features: np.ndarray, groups: Sequence[str], quantile: float = QUANTILE) -> ShiftModel:
    groups = np.asarray(groups).astype(str)
    if len(np.unique(groups)) < 2:
        raise ValueError("calibrating the shift threshold needs training images from at least two visits")
    mean, std = features.mean(0), features.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    z = (features - mean) / std
    d = _distances(z, z)
    d[groups[:, None] == groups[None, :]] = np.inf  # a visit's own photos do not count
    calibration = _knn_mean(d, NEIGHBOURS)
    calibration = calibration[np.isfinite(calibration)]
    return ShiftModel(mean, std, z, float(np.quantile(calibration, quantile)), calibration)


def shift_table(rm, test_store: TokenStore, image_ids: Sequence[str], test_rows: Sequence[int]) -> pd.DataFrame | None:
    """image_id, shift_distance (1 = the threshold) and unusual per test image, for a member trained on a token
    cache whose training store and train.csv are still where its run recorded them; None otherwise."""
    config = rm.run_dir / "config.json"
    if rm.kind != "cache" or not config.is_file():
        return None
    recorded = json.loads(config.read_text())
    cache, data = (recorded.get("cache") or {}).get("path"), recorded.get("data")
    if not cache or not Path(cache).exists() or not data or not (Path(data) / "train.csv").is_file():
        return None
    train_store = open_store(cache)
    table = read_long_csv(Path(data) / "train.csv", check_images=False)
    position = {iid: k for k, iid in enumerate(train_store.image_ids)}
    done = train_store.done()[:, 0]
    keep = [k for k, iid in enumerate(table["image_id"]) if iid in position and done[position[iid]]
            and iid not in train_store.bad_ids]
    table = table.iloc[keep]
    model = fit_shift(pooled_tokens(train_store, [position[i] for i in table["image_id"]]),
                      visit_groups(table).to_numpy())
    ratio = model.distance(pooled_tokens(test_store, test_rows))
    return pd.DataFrame({"image_id": list(image_ids), "shift_distance": ratio, "unusual": ratio > 1})


def warning_text(table: pd.DataFrame) -> str | None:
    unusual = table.loc[table["unusual"]].sort_values("shift_distance", ascending=False)
    if unusual.empty:
        return None
    shown = ", ".join(f"{i} ({d:.2f})" for i, d in zip(unusual["image_id"][:10], unusual["shift_distance"][:10]))
    return (f"WARNING: {len(unusual)} of {len(table)} test photo(s) look unlike every training photo (their cached "
            f"tokens are further from the training set than {QUANTILE:.0%} of the training photos are from the other "
            f"visits; distance / threshold): {shown}{' ...' if len(unusual) > 10 else ''}. Their predictions are "
            "extrapolations: check them.")


def ensemble_shift(result) -> pd.DataFrame | None:
    """`shift_table` of the ensemble's first member trained on a token cache (an EnsembleResult), or None."""
    for rm, store in zip(result.resolved, result.stores):
        if store is not None:
            table = shift_table(rm, store, result.image_ids, store_positions(store, result.image_ids))
            if table is not None:
                return table
    return None
