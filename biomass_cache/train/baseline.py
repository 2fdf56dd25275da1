"""The colour-statistics baseline: the floor a head must beat - ridge on 33 colour statistics of each photo.

It exists because a score means nothing alone: a head that does not beat it has learned nothing a colour histogram
does not already know. bench_heads.py stands it beside every quality row, and the synthetic-data tests use its
statistics to check that the painted photos carry the labels. The statistics are per-channel mean, std and
10 / 50 / 90 % quantiles in RGB and HSV (0-255 scale), and the excess-green index ExG = 2g - r - b on chromatic
coordinates (mean, std, share of pixels above 0.1). The ridge penalty is chosen by an inner cross-validation over
the training folds' own fold labels (grouped, like the outer folds), scored with competition_r2, so the baseline
sees exactly the folds the heads see. It imports only biomass_cache.common, numpy, PIL and sklearn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.linear_model import Ridge
from sklearn.metrics import make_scorer
from sklearn.model_selection import GridSearchCV, PredefinedSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from biomass_cache.common.metrics import competition_r2

ALPHAS = np.logspace(-3, 5, 17)
QUANTILES = (0.1, 0.5, 0.9)
EXG_THRESHOLD = 0.1
STAT_NAMES = ([f"{space}_{ch}_{stat}" for space in ("rgb", "hsv") for ch in range(3)
               for stat in ("mean", "std", *(f"q{round(100 * q)}" for q in QUANTILES))]
              + ["exg_mean", "exg_std", f"exg_share_above_{EXG_THRESHOLD}"])


def colour_stats(image: Image.Image) -> np.ndarray:
    """The len(STAT_NAMES) colour statistics of one photo, in STAT_NAMES order."""
    rgb = np.asarray(image.convert("RGB"), np.float64).reshape(-1, 3)
    hsv = np.asarray(image.convert("RGB").convert("HSV"), np.float64).reshape(-1, 3)
    per_channel = [np.concatenate([[c.mean(), c.std()], np.quantile(c, QUANTILES)]) for a in (rgb, hsv) for c in a.T]
    chroma = rgb / np.maximum(rgb.sum(axis=1, keepdims=True), 1e-9)
    exg = 2 * chroma[:, 1] - chroma[:, 0] - chroma[:, 2]
    return np.concatenate([*per_channel, [exg.mean(), exg.std(), (exg > EXG_THRESHOLD).mean()]])


def colour_stats_of(paths: list[Path]) -> np.ndarray:
    """(N, len(STAT_NAMES)) statistics of the photos at `paths`."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(colour_stats(im))
    return np.stack(out)


def ridge_inner_cv_oof(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Out-of-fold grams (N, 5) of standardised features -> ridge, and the alpha chosen for each outer fold.

    For outer fold k the alpha maximises competition_r2 over an inner CV whose splits are the other folds' labels,
    so images of one (date, State) group are never split between an inner training and validation part.
    """
    oof, alphas = np.zeros_like(y, dtype=np.float64), []
    for k in np.unique(folds):
        tr, va = folds != k, folds == k
        search = GridSearchCV(make_pipeline(StandardScaler(), Ridge()), {"ridge__alpha": ALPHAS},
                              scoring=make_scorer(competition_r2), cv=PredefinedSplit(folds[tr]))
        search.fit(x[tr], y[tr])
        alphas.append(float(search.best_params_["ridge__alpha"]))
        oof[va] = np.clip(search.predict(x[va]), 0, None)  # masses are non-negative
    return oof, alphas
