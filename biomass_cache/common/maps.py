"""Density maps drawn over their photo: shared by `biomass predict --maps` and the torch-free exported model's
`predict --model --maps` (export/runtime.py), so this module imports matplotlib and Pillow only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from biomass_cache.common.io import atomic_path, check_output_folder
from biomass_cache.common.photo import load_image


def maps_folder(out: Path) -> Path:
    """Where `predict --maps` writes its PNGs beside the CSV `out` (OUT_maps/), refused before any work when a file
    holds that name."""
    folder = Path(out).with_name(f"{Path(out).stem}_maps")
    check_output_folder(folder, "--maps")
    return folder


def save_map_png(path: Path, photo: Path, density_map: np.ndarray, grams: np.ndarray) -> None:
    """The photo with the predicted total density (clover + dead + green, g/m^2) overlaid, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = load_image(photo)
    total = density_map.sum(axis=0)
    fig, ax = plt.subplots(figsize=(8, 8 * image.height / image.width + 0.8), dpi=100)
    ax.imshow(image)
    overlay = ax.imshow(total, cmap="magma", alpha=0.55, extent=(0, image.width, image.height, 0),
                        interpolation="bilinear")
    fig.colorbar(overlay, ax=ax, fraction=0.03, pad=0.01, label="predicted dry biomass, g/m$^2$")
    clover, dead, green, _, total_g = grams
    ax.set_title(f"{photo.stem}: total {total_g:.1f} g (clover {clover:.1f}, dead {dead:.1f}, green {green:.1f})",
                 fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
