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


@register_head("density")
class DensityHead(FusedHead):
    """Every layer's weights are held stacked over the layers (`weight1` (L, hidden, C), `bias1` (L, hidden),
    `weight2` (L, 3, hidden), `bias2` (L, 3): nn.Linear's layout and initialisation), so a step runs one batched
    matmul per stage of the MLP for all layers, without stacking per-layer weights first. Checkpoints with one
    `per_layer.{l}` module per layer load into them."""

    has_maps = True
    input_norm = True

    def __init__(self, *, hidden: int = 128, dropout: float = 0.0, **common):
        super().__init__(features=hidden, dropout=dropout, **common)
        self._set_config(hidden=int(hidden))
        self.hidden = int(hidden)
        layers = [(nn.Linear(self.channels, hidden), nn.Linear(hidden, 3)) for _ in range(self.n_layers)]  # init
        self.weight1, self.bias1, self.weight2, self.bias2 = (
            nn.Parameter(torch.stack([getattr(pair[k], name).detach() for pair in layers]))
            for k in (0, 1) for name in ("weight", "bias"))
        self.drop = nn.Dropout(self.dropout)
        with torch.no_grad():
            self.bias2.copy_(inverse_softplus(self.components_mean() / self.scale()))  # the mean at initialisation
        self.register_load_state_dict_pre_hook(_stack_per_layer_keys)

    def scale(self) -> torch.Tensor:
        return self.target_std[:3]

    def layer_components(
        self, tokens: torch.Tensor, return_maps: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        b, n_layers, t, _ = tokens.shape
        x = tokens.transpose(0, 1).reshape(n_layers, b * t, -1)  # (L, B*T, C): no copy when from a bank
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        keep = None  # the dropout mask, scaled: drawn by dropout itself, which vmap (stacked folds) draws per fold
        if self.drop.training and self.drop.p > 0:
            keep = self.drop(torch.ones((n_layers, b * t, self.hidden), dtype=dtype, device=x.device))
        weights = [w.to(dtype) for w in (self.weight1, self.bias1, self.weight2, self.bias2)]
        with torch.autocast(x.device.type, enabled=False):
            raw, hidden, _ = PatchMLPFunction.apply(x.to(dtype), *weights, keep)  # (L, B*T, 3), (L, B*T, H)
        dens = (F.softplus(raw.float()) * self.scale()).view(n_layers, b, t, 3).transpose(0, 1)  # (B, L, T, 3) g/m^2
        maps = None
        if return_maps:
            maps = tokens_to_grid(dens.flatten(0, 1), self.grid).reshape(b, n_layers, 3, *self.grid)
        features = hidden.view(n_layers, b, t, -1).mean(dim=2, dtype=torch.float32).transpose(0, 1) \
            if self.uses_features else None  # a pass over every hidden activation, worth skipping when nothing reads it
        return dens.mean(dim=2), maps, features


def _stack_per_layer_keys(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """A checkpoint with one module per layer (`per_layer.{l}.body.0` / `.out.1` weight and bias) -> the stacked
    parameters, in place."""
    old = {"weight1": "body.0.weight", "bias1": "body.0.bias", "weight2": "out.1.weight", "bias2": "out.1.bias"}
    keys = {name: [f"{prefix}per_layer.{l}.{key}" for l in range(module.n_layers)] for name, key in old.items()}
    if not all(k in state_dict for ks in keys.values() for k in ks):
        return  # not that layout, or another layer count: left to the strict load to name what does not fit
    for name, ks in keys.items():
        state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in ks])


class PatchMLPFunction(torch.autograd.Function):
    """Every layer's per-patch MLP, (L, N, C) tokens -> raw densities (L, N, 3) and hidden activations (L, N, H), as
    batched matmuls over the layers, with weights in nn.Linear's layout ((L, out, in), biases (L, out)).

    Written out, not left to autograd, for the CPU's sake (benchmarks/bench_stage2.py): the weight gradients come
    out as g^T @ input, already in the weights' layout (autograd's baddbmm backward computes input^T @ g, a
    transposed operand and a transposed result, 1.5-2.5x slower at these shapes); the 128 -> 3 readout's input
    gradient multiplies by the weight as stored; the first layer's input gradient is computed only when the tokens
    need one (a LoRA run). `keep`: the dropout mask on the hidden activations, already scaled by 1 / (1 - p)."""

    generate_vmap_rule = True  # stacked folds (train/stacked.py) run it under torch.func.vmap

    @staticmethod
    def forward(x, w1, b1, w2, b2, keep):
        pre = torch.baddbmm(b1[:, None], x, w1.transpose(1, 2))
        hidden = F.gelu(pre)
        dropped = hidden if keep is None else hidden * keep
        return torch.baddbmm(b2[:, None], dropped, w2.transpose(1, 2)), hidden, pre

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w1, _, w2, _, keep = inputs
        _, hidden, pre = output
        ctx.save_for_backward(x, w1, w2, pre, hidden, keep)
        ctx.mark_non_differentiable(pre)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_raw, g_hidden, *_):
        x, w1, w2, pre, hidden, keep = ctx.saved_tensors
        grads = [None] * 6
        if g_raw is None and g_hidden is None:
            return tuple(grads)
        g = g_hidden  # the hidden activations' gradient: from the features (aux heads), then through the readout
        if g_raw is not None:
            through = torch.bmm(g_raw, w2) if keep is None else torch.bmm(g_raw, w2) * keep
            g = through if g is None else through + g
        g = torch.ops.aten.gelu_backward(g, pre)
        if g_raw is not None:
            dropped = hidden if keep is None else hidden * keep
            grads[3], grads[4] = torch.bmm(g_raw.transpose(1, 2), dropped), g_raw.sum(1)
        grads[1], grads[2] = torch.bmm(g.transpose(1, 2), x), g.sum(1)
        if ctx.needs_input_grad[0]:
            grads[0] = torch.bmm(g, w1)
        return tuple(grads)
