"""`mlp`: pooled patch tokens (mean, optionally max and GeM) per layer -> MLP -> total z + ratio logits.

The shared features (read by the auxiliary heads) are the MLP's hidden layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from biomass_cache.heads.common import FusedHead
from biomass_cache.heads.registry import register_head

POOLS = ("mean", "max", "gem")


class GeM(nn.Module):
    """Generalised mean over tokens with a learned exponent (features clamped positive first)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, C)
        p = self.p.clamp_min(1.0)
        return x.clamp_min(self.eps).pow(p).mean(dim=1).pow(1.0 / p)


class PooledMLP(nn.Module):
    def __init__(self, channels: int, pools: Sequence[str], hidden: int, dropout: float):
        super().__init__()
        self.pools = list(pools)
        self.gem = GeM() if "gem" in self.pools else None
        width = channels * len(self.pools)
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, hidden), nn.GELU())
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 4))

    def pool(self, tokens: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "mean":
            return tokens.mean(dim=1)
        return tokens.amax(dim=1) if kind == "max" else self.gem(tokens)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T, C) -> (B, 4), (B, hidden)
        hidden = self.body(torch.cat([self.pool(tokens, p) for p in self.pools], dim=-1))
        return self.out(hidden), hidden


@register_head("mlp")
class MLPHead(FusedHead):
    """The simplest readout: a separate pooled-token MLP per layer, fused in component space."""

    legacy_config = {"total_scale": "g/m^2"}

    def __init__(self, *, pools: Sequence[str] = ("mean", "max"), hidden: int = 512, total_scale: str = "std",
                 **common):
        super().__init__(features=hidden, **common)
        bad = [p for p in pools if p not in POOLS]
        if not pools or bad or len(set(pools)) != len(pools):
            raise ValueError(f"mlp head: pools must be distinct names from {list(POOLS)}, got {list(pools)}")
        self._set_config(pools=list(pools), hidden=int(hidden))
        self.set_total_scale(total_scale)
        self.per_layer = nn.ModuleList(
            PooledMLP(self.channels, pools, hidden, self.dropout) for _ in range(self.n_layers)
        )
        for m in self.per_layer:
            self.init_total_ratio_readout(m.out[-1])

    def lr_scales(self) -> dict[int, float]:
        return self.fan_in_lr_scales()

    def layer_components(self, tokens: torch.Tensor, return_maps: bool) -> tuple[torch.Tensor, None, torch.Tensor]:
        return self.total_ratio_layers([m(tokens[:, l]) for l, m in enumerate(self.per_layer)])
