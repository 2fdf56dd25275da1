"""The five targets, their weights, and the transforms every stage shares.

Heads predict a total and a composition on the simplex, so the identities GDM = clover + green and
Total = clover + dead + green hold by construction; the functions here move between that parameterisation,
the five competition targets, grams and areal density (g/m^2). They accept numpy arrays or torch tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from biomass_cache.common.io import write_json

TARGETS = ("Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g", "GDM_g", "Dry_Total_g")
WEIGHTS = (0.1, 0.1, 0.1, 0.2, 0.5)
COMPONENTS = ("Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g")
TOTAL = TARGETS.index("Dry_Total_g")
HEIGHT_NAME = "Height_Ave_cm"
HEIGHT_FALLBACK = (0.0, 10.0)  # height in cm / 10 when the z-score carries no height statistics
PLOT_AREA_M2 = 0.7 * 0.3  # the 70 x 30 cm quadrat

CLOVER, DEAD, GREEN, GDM, TOTAL = range(5)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _stack(parts: Sequence[Any], like: Any) -> Any:
    if _is_torch(like):
        import torch

        return torch.stack(list(parts), dim=-1)
    return np.stack(parts, axis=-1)


def to_density(grams: Any, area: float = PLOT_AREA_M2) -> Any:
    """Grams in the quadrat -> areal density in g/m^2 (comparable across quadrat sizes)."""
    return grams / area


def to_grams(density: Any, area: float = PLOT_AREA_M2) -> Any:
    return density * area


def components_to_targets(c: Any) -> Any:
    """(..., 3) clover, dead, green -> (..., 5) in TARGETS order, identities exact."""
    clover, dead, green = c[..., 0], c[..., 1], c[..., 2]
    gdm = clover + green
    return _stack([clover, dead, green, gdm, gdm + dead], like=c)


def target_mask(y: Any) -> Any:
    """Per-dimension supervision mask: a target is supervised where it is finite."""
    if _is_torch(y):
        import torch

        return torch.isfinite(y)
    return np.isfinite(y)


def targets_to_total_ratio(y: Any) -> tuple[Any, Any, Any]:
    """(..., 5) targets -> (total, ratio over (clover, dead, green), ratio_mask).

    The ratio is supervised only where the three components and the total are finite and the total is
    positive; elsewhere it is 0 and masked out.
    """
    finite = target_mask(y)
    comps = y[..., [CLOVER, DEAD, GREEN]]
    total = y[..., TOTAL]
    ok = finite[..., CLOVER] & finite[..., DEAD] & finite[..., GREEN] & finite[..., TOTAL]
    ok = ok & (total > 0)  # NaN compares False, so a missing total is never supervised
    if _is_torch(y):
        import torch

        safe_total = torch.where(ok, total, torch.ones_like(total))
        ratio = torch.where(ok[..., None], comps / safe_total[..., None], torch.zeros_like(comps))
    else:
        safe_total = np.where(ok, total, 1.0)
        with np.errstate(invalid="ignore"):
            ratio = np.where(ok[..., None], comps / safe_total[..., None], 0.0)
    return total, ratio, ok


@dataclass(frozen=True)
class ZScore:
    """Per-target standardisation, fitted on a training split only and saved with every model."""

    mean: np.ndarray
    std: np.ndarray
    names: tuple[str, ...] = TARGETS

    @classmethod
    def fit(cls, x: np.ndarray, names: Sequence[str] = TARGETS) -> "ZScore":
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(names):
            raise ValueError(f"ZScore.fit expects (N, {len(names)}) values for {list(names)}, got {x.shape}")
        counts = np.isfinite(x).sum(axis=0)
        empty = [n for n, c in zip(names, counts) if c < 2]
        if empty:
            raise ValueError(f"ZScore.fit needs at least 2 finite values per column; too few for {empty}")
        mean = np.nanmean(x, axis=0)
        std = np.nanstd(x, axis=0)
        std = np.where(std > 1e-8, std, 1.0)  # a constant column stays centred, never divided by zero
        return cls(mean=mean, std=std, names=tuple(names))

    def _cast(self, a: np.ndarray, like: Any) -> Any:
        if _is_torch(like):
            import torch

            return torch.as_tensor(a, dtype=like.dtype, device=like.device)
        return a

    def transform(self, x: Any) -> Any:
        return (x - self._cast(self.mean, x)) / self._cast(self.std, x)

    def inverse(self, z: Any) -> Any:
        return z * self._cast(self.std, z) + self._cast(self.mean, z)

    def column(self, name: str) -> "ZScore":
        i = self.names.index(name)
        return ZScore(mean=self.mean[i : i + 1], std=self.std[i : i + 1], names=(name,))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ZScore":
        missing = {"names", "mean", "std"} - set(d)
        if missing:
            raise ValueError(f"z-score statistics lack keys {sorted(missing)}")
        mean, std = np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64)
        if not (len(d["names"]) == len(mean) == len(std)):
            raise ValueError("z-score statistics: names, mean and std differ in length")
        return cls(mean=mean, std=std, names=tuple(d["names"]))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ZScore":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def target_stats(zscore: ZScore) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the five targets in TARGETS order (the z-score may hold extra columns)."""
    if not isinstance(zscore, ZScore):
        raise TypeError(f"expected the training ZScore of the five targets, got {type(zscore).__name__}")
    missing = [t for t in TARGETS if t not in zscore.names]
    if missing:
        raise ValueError(f"the z-score lacks statistics for targets {missing} (it has {list(zscore.names)})")
    idx = [zscore.names.index(t) for t in TARGETS]
    return np.asarray(zscore.mean, np.float64)[idx], np.asarray(zscore.std, np.float64)[idx]


def height_stats(zscore: ZScore | None) -> tuple[float, float]:
    """Scale of the height target: its z-score when the statistics hold it, else cm / 10."""
    if zscore is not None and HEIGHT_NAME in zscore.names:
        i = zscore.names.index(HEIGHT_NAME)
        return float(zscore.mean[i]), float(zscore.std[i])
    return HEIGHT_FALLBACK


def prediction_frame(image_ids: Sequence[str], files: Sequence[str], grams: np.ndarray):
    """The predictions CSV of `biomass predict`: one row per photo, the 5 targets in grams and as g/m^2."""
    import pandas as pd

    density = to_density(grams)
    return pd.DataFrame({"image_id": list(image_ids), "file": list(files),
                         **{t: grams[:, j] for j, t in enumerate(TARGETS)},
                         **{f"{t}_per_m2": density[:, j] for j, t in enumerate(TARGETS)}})
