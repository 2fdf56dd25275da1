"""Interval classification: each of the five targets cut into K quantile bins, classified from a head's shared
features as an auxiliary task, and optionally blended into the regression through the expected value over bins.

The bin edges are quantiles of the fold's training targets (g/m^2), so every bin holds about as many training
images; they and the bin centres (the mean training value in each bin) live in buffers, so a checkpoint carries the
exact bins its classifier was trained on and predicting needs nothing else.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from biomass_cache.common.targets import COMPONENTS, TARGETS


def normalise_interval(interval: Mapping[str, Any] | None) -> dict | None:
    """Validated interval switches {"bins": K >= 2, "blend": a in [0, 1]}, or None when off (bins 0 / no table)."""
    interval = dict(interval or {})
    unknown = sorted(set(interval) - {"bins", "blend"})
    if unknown:
        raise ValueError(f"unknown interval option(s) {unknown}; expected a subset of ['bins', 'blend']")
    bins, blend = int(interval.get("bins", 0) or 0), float(interval.get("blend", 0.0))
    if bins == 0:
        return None
    if bins < 2:
        raise ValueError(f"interval bins must be 0 (off) or at least 2, got {bins}")
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"interval blend must be in [0, 1], got {blend}")
    return {"bins": bins, "blend": blend}


def assign_bins(y: Any, edges: Any) -> Any:
    """Bin index of each value: the number of edges <= y, so bin j is [edges[j-1], edges[j]).

    y (..., 5) and edges (5, K-1), numpy or torch alike; values tied with repeated edges go to the highest bin.
    """
    return (y[..., None] >= edges).sum(-1)


def fit_bins(y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges (5, K-1), centres (5, K)) of training targets `y` (N, 5) g/m^2, NaN where unknown.

    Edges are the j/K quantiles of each target's known values; a centre is the mean of the values in its bin, or the
    middle of the bin's range (clipped to the data's range) when ties leave it empty. A target without known
    values gets zero edges and centres (it supervises nothing).
    """
    if bins < 2:
        raise ValueError(f"interval bins must be at least 2, got {bins}")
    y = np.asarray(y, dtype=float)
    if y.ndim != 2 or y.shape[1] != len(TARGETS):
        raise ValueError(f"interval bins are fitted on (N, {len(TARGETS)}) targets, got shape {y.shape}")
    edges, centres = np.zeros((len(TARGETS), bins - 1)), np.zeros((len(TARGETS), bins))
    for t in range(len(TARGETS)):
        v = y[np.isfinite(y[:, t]), t]
        if v.size == 0:
            continue
        edges[t] = np.quantile(v, np.arange(1, bins) / bins)
        which = assign_bins(v[:, None], edges[t][None])[:, 0]
        bounds = np.concatenate([[v.min()], edges[t], [v.max()]])
        for j in range(bins):
            inside = v[which == j]
            centres[t, j] = inside.mean() if inside.size else (bounds[j] + bounds[j + 1]) / 2
    return edges, centres


class IntervalHead(nn.Module):
    """Bin logits (B, 5, K) of the five targets from the shared features of every layer (B, L, D), like AuxHeads;
    `expected` is the probability-weighted mean of the bin centres (B, 5) g/m^2."""

    def __init__(self, n_layers: int, features: int, bins: int, dropout: float):
        super().__init__()
        self.bins = bins
        self.body = nn.Sequential(nn.LayerNorm(n_layers * features), nn.Dropout(dropout))
        self.out = nn.Linear(n_layers * features, len(TARGETS) * bins)
        self.register_buffer("edges", torch.zeros(len(TARGETS), bins - 1))
        self.register_buffer("centres", torch.zeros(len(TARGETS), bins))

    def set_bins(self, edges: np.ndarray, centres: np.ndarray) -> None:
        """Install the fold's bins (from `fit_bins`)."""
        with torch.no_grad():
            self.edges.copy_(torch.as_tensor(edges))
            self.centres.copy_(torch.as_tensor(centres))

    def labels(self, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        """(B, 5) bin index of each target, -1 where the target is unknown."""
        return torch.where(y_mask.bool(), assign_bins(y, self.edges), torch.full_like(y, -1, dtype=torch.long))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features.flatten(1))).view(-1, len(TARGETS), self.bins)

    def expected(self, logits: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(logits, dim=-1) * self.centres).sum(-1)


def blend_components(components: torch.Tensor, expected: torch.Tensor, blend: float) -> torch.Tensor:
    """(1 - blend) * regression + blend * expected value, on the three components only (B, 3), so the targets
    rebuilt from them keep GDM = clover + green and Total = clover + dead + green."""
    return (1 - blend) * components + blend * expected[:, : len(COMPONENTS)]
