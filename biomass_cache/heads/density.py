"""`density`: a per-patch MLP (a 1x1 conv) predicting non-negative component densities, averaged to the image.

Each patch predicts clover, dead and green in g/m^2 (softplus, in units of the component's training std so the
network works at O(1) scale); the image value is the patch mean, so the density map explains the prediction.
The shared features (read by the auxiliary heads) are the per-patch hidden activations, mean-pooled.

CPU cost is per token (3 layers x every patch), so the defaults are the cheapest that scored as well on the quality
bar (benchmarks/bench_heads.py; docs: Benchmarks): hidden 128 (256 scores a little more at about twice the step
time), no dropout (dropout masks on every token cost much of the step), and one LayerNorm without affine parameters over
the tokens (`input_norm`: a Linear follows, so an affine adds nothing it cannot express; without one, no gradient
flows into the tokens; a run's token bank applies it once instead of at every step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biomass_cache.heads.common import FusedHead, inverse_softplus, tokens_to_grid
from biomass_cache.heads.registry import register_head


class PatchMLP(nn.Module):
    """One layer's per-patch MLP on layer-normed tokens: `body` gives the hidden features, `out` the three raw
    densities."""

    def __init__(self, channels: int, hidden: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(channels, hidden), nn.GELU())
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 3))


@register_head("density")
class DensityHead(FusedHead):
    has_maps = True
    input_norm = True

    def __init__(self, *, hidden: int = 128, dropout: float = 0.0, **common):
        super().__init__(features=hidden, dropout=dropout, **common)
        self._set_config(hidden=int(hidden))
        self.per_layer = nn.ModuleList(PatchMLP(self.channels, hidden, self.dropout) for _ in range(self.n_layers))
        start = inverse_softplus(self.components_mean() / self.scale())  # the mean prediction at initialisation
        with torch.no_grad():
            for m in self.per_layer:
                m.out[-1].bias.copy_(start)

    def scale(self) -> torch.Tensor:
        return self.target_std[:3]

    def layer_components(
        self, tokens: torch.Tensor, return_maps: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        b, n_layers, t, _ = tokens.shape
        x = tokens.transpose(0, 1).reshape(n_layers, b * t, -1)  # (L, B*T, C): no copy when from a bank
        # every layer's MLP in one batched matmul per step of it, not one per layer: a third of the ops (and of
        # their dispatch and autograd overhead) at the same arithmetic; the weights stay per layer (checkpoints)
        act = self.per_layer[0].body[1]
        first_bias, first_weight = stacked([m.body[0] for m in self.per_layer])
        hidden = act(torch.baddbmm(first_bias, x, first_weight))  # (L, B*T, hidden)
        last_bias, last_weight = stacked([m.out[-1] for m in self.per_layer])
        raw = torch.baddbmm(last_bias, self.per_layer[0].out[0](hidden), last_weight)  # dropout, then (L, B*T, 3)
        dens = (F.softplus(raw.float()) * self.scale()).view(n_layers, b, t, 3).transpose(0, 1)  # (B, L, T, 3) g/m^2
        maps = None
        if return_maps:
            maps = tokens_to_grid(dens.flatten(0, 1), self.grid).reshape(b, n_layers, 3, *self.grid)
        features = hidden.view(n_layers, b, t, -1).mean(dim=2, dtype=torch.float32).transpose(0, 1) \
            if self.uses_features else None  # a pass over every hidden activation, worth skipping when nothing reads it
        return dens.mean(dim=2), maps, features


def stacked(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias (L, 1, out), weight (L, in, out)) of one Linear per layer, for `torch.baddbmm`."""
    return (torch.stack([m.bias for m in linears])[:, None],
            torch.stack([m.weight for m in linears]).transpose(1, 2))
