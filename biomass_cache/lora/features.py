"""Feature distillation on the live path: the student's tokens, through a learned projection per layer, match a
teacher's cached tokens of the same view.

The teacher's token store fixes the views: the student trains on the store's views (its augmentation seed and
policy, at the student's own size: every random parameter of a view is drawn independently of the size, so the
same view index is the same crop, flip and affine at any size of the same aspect ratio). The photo is decoded and
resized as the student's validation and export do it (the default policy's filter and decode scale). Both token
grids are average-pooled to the smaller one; the teacher's tokens are standardised per layer and channel (mean and
standard deviation over view 0 of up to STAT_IMAGES images), so every channel counts alike whether the store holds full
tokens or a PCA reduction. The loss is the mean squared error over layers, tokens and channels, on the samples the
store holds (unlabelled photos have no teacher tokens), times `weight`. The projection trains with the head and
is dropped afterwards: checkpoints and exports hold the student alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biomass_cache.backbone.views import ViewPolicy
from biomass_cache.common.errors import DataError
from biomass_cache.store.fingerprint import root
from biomass_cache.store.layout import open_store

STAT_IMAGES = 32


def pool_grid(tokens: torch.Tensor, grid: tuple[int, int], to: tuple[int, int]) -> torch.Tensor:
    """(..., rows x cols, C) tokens on `grid` -> (..., to rows x to cols, C), each the mean of its cell."""
    if tuple(grid) == tuple(to):
        return tokens
    *lead, t, c = tokens.shape
    x = tokens.reshape(-1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, to).permute(0, 2, 3, 1)
    return x.reshape(*lead, to[0] * to[1], c)


@dataclass
class TeacherTokens:
    """Standardised teacher tokens on the common grid, by (image id, view): the images the store holds whole."""

    store_path: str
    rows: dict[str, int]  # image id -> the store's row
    grid: tuple[int, int]  # the common grid
    mean: np.ndarray  # (L, C) on the common grid, view 0
    std: np.ndarray
    n_views: int
    view_seed: int
    policy: ViewPolicy
    split: str
    _store: object = field(default=None, repr=False)

    def item(self, image_id: str, view: int) -> tuple[np.ndarray, bool]:
        """An image's tokens (L, T, C) float32 in `view`, and whether the store has them (else zeros)."""
        if image_id not in self.rows:
            return np.zeros((len(self.mean), self.grid[0] * self.grid[1], self.mean.shape[1]), np.float32), False
        if self._store is None:  # opened lazily: a DataLoader worker opens its own
            self._store = open_store(self.store_path)
        store = self._store
        tokens = pool_grid(torch.from_numpy(store.read(self.rows[image_id], view)), store.grid, self.grid).numpy()
        return ((tokens - self.mean[:, None]) / self.std[:, None]).astype(np.float32), True

    @property
    def channels(self) -> int:
        return int(self.mean.shape[1])

    def describe(self) -> dict:
        """config.json's record of the teacher's tokens."""
        return {"store": self.store_path, "grid": list(self.grid), "views": self.n_views, "images": len(self.rows),
                "channels": self.channels, "view_seed": self.view_seed, "policy": self.policy.to_dict()}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}


def teacher_tokens(path: Path, image_ids: list[str], student_size: tuple[int, int], student_grid: tuple[int, int],
                   n_layers: int) -> TeacherTokens:
    """The teacher store at `path`, checked against the student (same aspect ratio, as many layers) and the
    training images `image_ids` (at least one extracted there), with its statistics."""
    try:
        store = open_store(path)
    except DataError as e:
        raise DataError(f"--teacher-tokens {path}: not a token store ({e})") from None
    fp = root(store.fingerprint)
    size = fp.get("size")
    if fp.get("split") != "train" or size is None or fp.get("policy") is None:
        raise DataError(f"--teacher-tokens {path}: not a training-split token store (extracted with "
                        "`biomass extract --split train`)")
    if student_size[0] * size[1] != size[0] * student_size[1]:
        raise DataError(f"--teacher-tokens {path}: its views are {size[0]}x{size[1]}, the student's "
                        f"{student_size[0]}x{student_size[1]}: a view is the same picture at another size only for "
                        f"the same aspect ratio (--size)")
    if len(store.layers) != n_layers:
        raise DataError(f"--teacher-tokens {path} holds {len(store.layers)} layers {store.layers}, the student reads "
                        f"{n_layers}: each student layer matches the teacher's layer at the same position (--layers)")
    done = store.done().all(axis=1)
    rows = {iid: r for r, iid in enumerate(store.image_ids) if done[r]}
    if not set(image_ids) & set(rows):
        raise DataError(f"--teacher-tokens {path}: none of the training images is extracted there")
    grid = (min(store.grid[0], student_grid[0]), min(store.grid[1], student_grid[1]))
    sample = [pool_grid(torch.from_numpy(store.read(r, 0)), store.grid, grid)
              for r in list(rows.values())[:STAT_IMAGES]]
    x = torch.cat(sample, dim=1).double()  # (L, images x T, C)
    mean, std = x.mean(dim=1), x.std(dim=1).clamp_min(1e-6)
    try:  # the views' geometry and colours are the teacher's; decoding and resizing stay the student's own, as
        policy = replace(ViewPolicy.from_dict(fp["policy"]), resample=ViewPolicy().resample,  # at validation
                         decode_oversample=ViewPolicy().decode_oversample)
    except ValueError as e:
        raise DataError(f"--teacher-tokens {path}: its view policy is not one this version reads ({e})") from None
    return TeacherTokens(str(path), rows, grid, mean.float().numpy(), std.float().numpy(), store.n_views,
                         int(fp.get("seed") or 0), policy, "train")


class FeatureMatch(nn.Module):
    """One linear projection per layer from the student's channels to the teacher's, and the weighted loss."""

    def __init__(self, n_layers: int, channels: int, teacher_channels: int, grid: tuple[int, int],
                 to: tuple[int, int], weight: float):
        super().__init__()
        self.grid, self.common, self.weight = tuple(grid), tuple(to), float(weight)
        self.proj = nn.ModuleList(nn.Linear(channels, teacher_channels) for _ in range(n_layers))

    def reset(self, seed: int) -> None:
        """nn.Linear's initialisation, drawn from `seed` (a fold's projection is a pure function of it)."""
        gen = torch.Generator().manual_seed(seed + 7919)
        with torch.no_grad():
            for lin in self.proj:
                bound = 1 / math.sqrt(lin.in_features)
                lin.weight.copy_(torch.empty(lin.weight.shape).uniform_(-bound, bound, generator=gen))
                lin.bias.copy_(torch.empty(lin.bias.shape).uniform_(-bound, bound, generator=gen))

    def forward(self, tokens: torch.Tensor, teacher: torch.Tensor, has: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, T, C) of the student, teacher (B, L, T', C') standardised, has (B,) bool -> the loss."""
        x = pool_grid(tokens, self.grid, self.common)
        pred = torch.stack([p(x[:, l]) for l, p in enumerate(self.proj)], dim=1)
        per_sample = ((pred - teacher.to(pred.dtype)) ** 2).mean(dim=(1, 2, 3))
        has = has.to(per_sample.dtype)
        return self.weight * (per_sample * has).sum() / has.sum().clamp_min(1)
