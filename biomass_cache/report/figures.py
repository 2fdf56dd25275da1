"""The report's own figures (as PNG data URIs): parity and residuals per target, the best and worst photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from biomass_cache.common.photo import load_image
from biomass_cache.common.targets import TARGETS, WEIGHTS
from biomass_cache.report.html import figure_uri, plt

N_GALLERY = 3


def _short(target: str) -> str:
    return target.removesuffix("_g").replace("Dry_", "")


def parity_and_residuals(truth: np.ndarray, pred: np.ndarray, head: str) -> str:
    """Predicted against true grams (the diagonal is perfect) and residuals against predicted, per target."""
    fig, axes = plt.subplots(2, len(TARGETS), figsize=(3.2 * len(TARGETS), 6.2), squeeze=False)
    for j, target in enumerate(TARGETS):
        t, p = truth[:, j], pred[:, j]
        top, bottom = axes[0, j], axes[1, j]
        top.scatter(t, p, s=8, alpha=0.6)
        hi = max(float(t.max()), float(p.max()), 1e-6)
        top.plot([0, hi], [0, hi], color="grey", lw=1)
        top.set(title=_short(target), xlabel="true g", ylabel="predicted g" if j == 0 else None)
        bottom.scatter(p, t - p, s=8, alpha=0.6, color="tab:orange")
        bottom.axhline(0, color="grey", lw=1)
        bottom.set(xlabel="predicted g", ylabel="true - predicted g" if j == 0 else None)
    fig.suptitle(f"out-of-fold predictions of head '{head}'")
    fig.tight_layout()
    return figure_uri(fig)


def best_and_worst(truth: np.ndarray, pred: np.ndarray) -> dict[str, list[int]]:
    """Rows of the images with the smallest and largest weighted squared error (their share of the metric's
    residual sum), N_GALLERY each."""
    error = (np.asarray(WEIGHTS) * (truth - pred) ** 2).sum(axis=1)
    order = np.argsort(error, kind="stable")
    return {"best": order[:N_GALLERY].tolist(), "worst": order[::-1][:N_GALLERY].tolist()}


def gallery(table: pd.DataFrame, data_dir: Path, truth: np.ndarray, pred: np.ndarray,
            images: dict[str, list[int]]) -> str:
    """The photos of `images` (rows of `table`), best row first, each titled with its true and predicted total."""
    fig, axes = plt.subplots(2, N_GALLERY, figsize=(5 * N_GALLERY, 6), squeeze=False)
    for row, (label, rows) in zip(axes, images.items()):
        for ax, r in zip(row, rows):
            photo = load_image(data_dir / table["image_path"].iloc[r], at_least=(600, 300))
            photo.thumbnail((600, 300))
            ax.imshow(photo)
            ax.set_title(f"{label}: {table['image_id'].iloc[r]} ({table['State'].iloc[r]})\ntotal "
                         f"{truth[r, 4]:.1f} g true, {pred[r, 4]:.1f} g predicted", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return figure_uri(fig)
