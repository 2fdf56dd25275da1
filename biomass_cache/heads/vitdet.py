"""`vitdet`: a ViTDet-style simple feature pyramid on the patch grid, pooled to a scalar readout.

Levels at scales 2, 1, 1/2, 1/4 of the patch grid (transposed conv up, identity, max-pool down once and twice),
each projected to `dim` channels (1x1 conv, channel LayerNorm, 3x3 conv, channel LayerNorm) and average-pooled;
the 4*dim concatenation goes through a wide SiLU bottleneck with strong dropout to total z + ratio logits.
The shared features (read by the auxiliary heads) are that bottleneck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biomass_cache.heads.common import FusedHead, LayerNorm2d, tokens_to_grid
from biomass_cache.heads.registry import register_head

SCALES = (2.0, 1.0, 0.5, 0.25)


def projection(c_in: int, dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, dim, kernel_size=1, bias=False), LayerNorm2d(dim),
        nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False), LayerNorm2d(dim),
    )


def max_pool(x: torch.Tensor, times: int) -> torch.Tensor:
    """Halve the grid `times` times; ceil mode keeps at least one cell on small grids."""
    for _ in range(times):
        x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
    return x


class SimplePyramid(nn.Module):
    def __init__(self, channels: int, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)
        self.proj = nn.ModuleList(
            [projection(channels // 2, dim)] + [projection(channels, dim) for _ in SCALES[1:]]
        )
        self.bottleneck = nn.Sequential(nn.Dropout(dropout), nn.Linear(len(SCALES) * dim, hidden), nn.SiLU())
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 4))

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # -> (B, 4), bottleneck (B, hidden)
        levels = [self.up(grid), grid, max_pool(grid, 1), max_pool(grid, 2)]
        pooled = [proj(x).mean(dim=(2, 3)) for proj, x in zip(self.proj, levels)]
        hidden = self.bottleneck(torch.cat(pooled, dim=-1))
        return self.out(hidden), hidden


@register_head("vitdet")
class ViTDetHead(FusedHead):
    legacy_config = {"total_scale": "g/m^2"}

    def __init__(self, *, dim: int = 512, hidden: int = 4096, dropout: float = 0.5, total_scale: str = "std",
                 **common):
        super().__init__(features=hidden, dropout=dropout, **common)
        if self.channels < 2:
            raise ValueError(f"vitdet head needs at least 2 token channels, got {self.channels}")
        self._set_config(dim=int(dim), hidden=int(hidden))
        self.set_total_scale(total_scale)
        self.per_layer = nn.ModuleList(
            SimplePyramid(self.channels, dim, hidden, self.dropout) for _ in range(self.n_layers)
        )
        for m in self.per_layer:
            self.init_total_ratio_readout(m.out[-1])

    def lr_scales(self) -> dict[int, float]:
        return self.fan_in_lr_scales()

    def layer_components(self, tokens: torch.Tensor, return_maps: bool) -> tuple[torch.Tensor, None, torch.Tensor]:
        return self.total_ratio_layers([m(tokens_to_grid(tokens[:, l], self.grid))
                                        for l, m in enumerate(self.per_layer)])
