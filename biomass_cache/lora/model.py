"""The live token source: timm's Eva forward split at the first adapted block, wrapped as stage two's `tokens_fn`.

`run_blocks` and `embed` follow timm's Eva.forward_intermediates, so the full forward equals the backbone's own
tokens and the suffix forward (from a prefix cache's hidden state) equals the full one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from biomass_cache.backbone.precision import autocast, resolve_precision
from biomass_cache.backbone.views import validate_tiles
from biomass_cache.backbone.vit import Backbone, resolve_layers, split_tiles, stitch_tiles
from biomass_cache.common.errors import DataError
from biomass_cache.lora.adapters import adapter_state, is_lora_layer, reset_adapters
from biomass_cache.lora.features import FeatureMatch
from biomass_cache.lora.settings import LoraSettings, adapted_blocks


def embed(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Patch embedding + prefix tokens (+ RoPE table), exactly as timm's Eva.forward_intermediates starts."""
    x, rope = model._pos_embed(model.patch_embed(pixels))
    return model.norm_pre(x), rope


def grid_rope(model: nn.Module, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor | None:
    """The RoPE table of a (rows, cols) patch grid: DINOv3's depends on the grid only, not on the pixels."""
    dummy = like.new_zeros(1, grid[0], grid[1], like.shape[-1])
    return model._pos_embed(dummy)[1]


def run_blocks(model: nn.Module, x: torch.Tensor, rope, first: int, layers: Sequence[int], norm: bool,
               n_prefix: int) -> torch.Tensor:
    """Run blocks first.. on the hidden state `x` entering block `first`; patch tokens of `layers` (B, L, T, C).

    Layer `first - 1` is `x` itself (its output). Blocks after the last layer asked for are not run.
    """
    out = {first - 1: x}
    ckpt = model.grad_checkpointing and torch.is_grad_enabled()
    for i in range(first, max(layers) + 1):
        blk = model.blocks[i]
        x = checkpoint(blk, x, rope=rope, use_reentrant=False) if ckpt else blk(x, rope=rope)
        out[i] = x
    return torch.stack([(model.norm(out[l]) if norm else out[l])[:, n_prefix:] for l in layers], dim=1)


def check_supported(model: nn.Module, name: str) -> None:
    if not getattr(model, "dynamic_img_size", False) or getattr(model, "rope_mixed", False) or \
            getattr(model, "patch_drop", None) is not None:
        raise DataError(f"{name}: the LoRA path needs a DINOv3-style Eva (dynamic image size, one RoPE table for "
                         "all blocks, no patch dropout)")


class LiveTokens(nn.Module):
    """`tokens_fn` for stage two's loop: batch -> (B, L, T, C) float32 from the adapted backbone.

    A batch carries `pixels` (full forward) or `hidden` (the prefix cache: blocks start.. only). Its parameters
    are the adapters, or the fully fine-tuned blocks' weights, and feature distillation's projection `match`. It
    is the loop's `extra`: `reset(seed)` per fold (fresh adapters, or the initial weights), `param_groups()` for the
    optimizer, EMA and clipping with the head's, `side_loss` the feature loss. `train()` toggles only the adapters'
    dropout: the frozen backbone stays in eval mode.
    """

    def __init__(self, bb: Backbone, s: LoraSettings, device: torch.device):
        super().__init__()
        self.match: FeatureMatch | None = None  # feature distillation's projection (features.py), set by run_lora
        check_supported(bb.model, bb.name)
        self.bb, self.s, self.device = bb, s, device
        self.model = bb.model.to(device)
        self.model.eval()
        self.model.set_grad_checkpointing(s.grad_checkpointing)
        self.layers = resolve_layers(s.layers, bb.depth)
        self.start = adapted_blocks(bb.depth, s.blocks)[0]
        last = max(self.layers)
        if last < bb.depth - 1:
            raise DataError(f"adapters in blocks {last + 1}..{bb.depth - 1} would never train: the head reads "
                             f"up to block {last}; read the last block or adapt fewer blocks")
        self.grid = (s.size[1] // bb.patch_size, s.size[0] // bb.patch_size)  # stitched, whatever the tiles
        self.tiles = validate_tiles(s.size, s.tiles)
        self.initial = None if s.finetune != "full" else {  # fully fine-tuned blocks: each fold starts from these
            n: p.detach().clone() for n, p in adapter_state(self.model).items()}

    def reset(self, seed: int) -> None:
        if self.match is not None:
            self.match.reset(seed)
        if self.initial is None:
            reset_adapters(self.model, seed)
            return
        with torch.no_grad():
            for n, p in adapter_state(self.model).items():
                p.copy_(self.initial[n])

    def param_groups(self) -> list[dict]:
        """One optimizer group per adapted block: lr * layer_decay ** (blocks above it), no weight decay."""
        groups: dict[int, list] = {}
        for n, p in adapter_state(self.model).items():
            groups.setdefault(int(n.split(".")[1]), []).append(p)
        top = self.bb.depth - 1
        match = [] if self.match is None else [{"params": list(self.match.parameters()), "weight_decay": 0.0}]
        return [{"params": ps, "lr": self.s.lr * self.s.layer_decay ** (top - b), "weight_decay": 0.0}
                for b, ps in sorted(groups.items())] + match  # the projection at the head's lr

    def side_loss(self, batch: dict, tokens: torch.Tensor) -> torch.Tensor | None:
        """The token source's own loss term for a training batch: feature distillation's, where it has one."""
        if self.match is None or "teacher" not in batch:
            return None
        return self.match(tokens, batch["teacher"].to(tokens.device), batch["teacher_has"].to(tokens.device))

    def train(self, mode: bool = True) -> "LiveTokens":
        self.training = mode
        for m in self.model.modules():
            if is_lora_layer(m):
                m.train(mode)
        return self

    def forward(self, batch: dict) -> torch.Tensor:
        key = "pixels" if "pixels" in batch else "hidden"
        x = batch[key].to(self.device, non_blocking=True)
        run = self._full if key == "pixels" else self._suffix
        with autocast(resolve_precision(self.s.precision if self.s.amp else "fp32", self.device), self.device):
            if self.s.micro_batch and len(x) > self.s.micro_batch:
                parts = x.split(self.s.micro_batch)
                if torch.is_grad_enabled():  # one micro-batch of activations alive at a time, exact gradient
                    out = torch.cat([checkpoint(run, p, use_reentrant=False) for p in parts])
                else:
                    out = torch.cat([run(p) for p in parts])
            else:
                out = run(x)
        return out.float()

    def _full(self, pixels: torch.Tensor) -> torch.Tensor:
        x, rope = embed(self.model, split_tiles(pixels, self.tiles))
        tokens = run_blocks(self.model, x, rope, 0, self.layers, self.s.norm, self.bb.n_prefix)
        return stitch_tiles(tokens, self.tiles, self.grid[0])

    def _suffix(self, hidden: torch.Tensor) -> torch.Tensor:
        rope = grid_rope(self.model, self.grid, hidden)
        return run_blocks(self.model, hidden, rope, self.start, self.layers, self.s.norm, self.bb.n_prefix)

    def check_prefix_layers(self) -> None:
        if self.tiles > 1:
            raise DataError(f"--lora-prefix-cache stores one hidden state per view, not one per tile (tiles = "
                            f"{self.tiles}); train with --tiles 1 or without --lora-prefix-cache")
        if any(l < self.start - 1 for l in self.layers):
            raise DataError(f"layers {self.layers} precede the prefix cache (the hidden state entering block "
                             f"{self.start}); read blocks >= {self.start - 1} or train without --lora-prefix-cache")

    @torch.no_grad()
    def prefix_hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, n_prefix + T, C): the hidden state entering block `start` (frozen blocks only)."""
        x, rope = embed(self.model, pixels.to(self.device))
        for blk in self.model.blocks[: self.start]:
            x = blk(x, rope=rope)
        return x
