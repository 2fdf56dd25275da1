"""The frozen DINOv3 ViT (timm's Eva-based definitions), built offline from a local weights file or a seeded
random initialisation, and its multi-layer patch tokens.

Nothing here can reach a hub: models are always created with `pretrained=False`, and a weights file is read by this
module (safetensors, or torch.load with weights_only=True), converted from Meta's official key names with timm's own
`checkpoint_filter_fn`, and loaded strictly. Any mismatch is an error naming the file, never a random fallback.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import timm
import torch
from timm.models.eva import checkpoint_filter_fn
from torch import nn

from biomass_cache.common.content import sha256_file
from biomass_cache.common.errors import DataError, WeightsError

BACKBONES = (
    "vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb",
    "vit_small_plus_patch16_dinov3", "vit_small_plus_patch16_dinov3_qkvb",
    "vit_base_patch16_dinov3", "vit_base_patch16_dinov3_qkvb",
    "vit_large_patch16_dinov3", "vit_large_patch16_dinov3_qkvb",
    "vit_huge_plus_patch16_dinov3", "vit_huge_plus_patch16_dinov3_qkvb",
    "vit_7b_patch16_dinov3",  # timm has no _qkvb twin of the 7B
)
RANDOM = "random"
# Model kwargs that would change how weights are obtained: set only by this module.
_RESERVED_OVERRIDES = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}


@dataclass
class Backbone:
    """A frozen backbone in eval mode and what identifies it."""

    model: nn.Module
    name: str
    weights: str  # "random" or the file path
    weights_sha256: str  # "random" or the file's hex digest
    embed_dim: int
    depth: int
    patch_size: int
    n_prefix: int  # CLS + register tokens
    overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # determines the weights only when weights == "random"


def create_backbone(name: str, weights: str | Path = RANDOM, seed: int = 0,
                    overrides: dict[str, Any] | None = None) -> Backbone:
    """Build `name` with weights from a local file (Meta's official .pth or a timm .safetensors/.pth), or with a
    random initialisation that is a pure function of `seed` (so train and test caches share one random backbone).

    `overrides` are timm model kwargs, e.g. dict(depth=2, embed_dim=64, num_heads=2) for tiny test models.
    """
    if name not in BACKBONES:
        raise DataError(f"unknown backbone {name!r}; supported: {', '.join(BACKBONES)}")
    overrides = dict(overrides or {})
    reserved = _RESERVED_OVERRIDES & set(overrides)
    if reserved:
        raise ValueError(f"overrides may not set {sorted(reserved)}: weights come only from the `weights` argument")
    weights = str(weights)
    if weights != RANDOM and not Path(weights).is_file():
        raise DataError(f"{weights}: backbone weights file not found (pass 'random' for random weights)")

    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=False, **{"num_classes": 0, **overrides})
        except TypeError as e:  # an override the model does not take
            if not overrides:
                raise
            raise DataError(f"overrides {overrides} are not settings {name} takes ({e})") from None
    if weights == RANDOM:
        sha = RANDOM
    else:
        sha = sha256_file(weights, progress=True)
        state = _to_timm_keys(read_state_dict(weights), model, weights)
        load_strict(model, state, weights)
    model.eval().requires_grad_(False)
    return Backbone(
        model=model, name=name, weights=weights, weights_sha256=sha, embed_dim=model.embed_dim,
        depth=len(model.blocks), patch_size=model.patch_embed.patch_size[0], n_prefix=model.num_prefix_tokens,
        overrides=overrides, seed=seed,
    )


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors of a .safetensors file, or of a pickled checkpoint via torch.load(weights_only=True, mmap=True)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # each reader raises its own types; ours names the file
        raise WeightsError(f"cannot read backbone weights {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict that fails with every missing and unexpected key and the file's name."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"weights in {path} do not fit this backbone: {e}") from e
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights in {path} do not match the backbone ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys; is it the right model name?)\n"
            f"  missing: {result.missing_keys}\n  unexpected: {result.unexpected_keys}"
        )


def _to_timm_keys(state: dict[str, Any], model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """timm's converter for the Eva family (official DINOv3 names -> timm; timm names pass through).

    Official files store a fused `qkv.bias` even for models without q/v biases (all zeros, dropped by timm). Dropping
    a non-zero bias would silently change the model, so that case is an error pointing to the `_qkvb` twin.
    """
    if "storage_tokens" in state and getattr(model.blocks[0].attn, "q_bias", None) is None:
        for key in [k for k in state if k.endswith("attn.qkv.bias")]:
            q, _, v = state.pop(key).chunk(3, dim=-1)  # the k bias never matters (softmax shift)
            if q.any() or v.any():
                raise WeightsError(f"{path}: {key} has non-zero q/v biases but the chosen model has none; "
                                   "use the `_qkvb` variant of this backbone")
    return checkpoint_filter_fn(state, model)


def resolve_layers(layers: Sequence[int], depth: int) -> list[int]:
    """Block indices, negative counting from the end, as sorted non-negative indices (the order tokens are stored)."""
    if len(layers) == 0:
        raise DataError("layers must name at least one block")
    resolved = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise DataError(f"layer indices must be integers, got {layer!r}")
        layer = int(layer)
        if not -depth <= layer < depth:
            raise DataError(f"layer {layer} is out of range for a backbone of depth {depth} "
                             f"(valid: {-depth}..{depth - 1})")
        resolved.append(layer % depth)
    if len(set(resolved)) != len(resolved):
        raise DataError(f"layers {list(layers)} name the same block twice (resolved: {resolved})")
    return sorted(resolved)


def forward_tokens(backbone: Backbone, images: torch.Tensor, layers: Sequence[int], norm: bool,
                   tiles: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch tokens (B, L, T, C) and prefix tokens (B, L, tiles * n_prefix, C) of the given blocks, in the order
    given.

    T runs row-major over the (H/16, W/16) patch grid. `norm` applies the final LayerNorm to every layer (it changes
    the feature scale: record it). With `tiles` > 1 the images are cut into that many side-by-side pieces, each
    piece goes through the backbone alone (attention never crosses a cut) and the pieces' patch grids are stitched
    back into the whole image's grid (`stitch_tiles`), so everything downstream sees one grid whatever the tiling;
    the prefix tokens are the pieces' own, left to right. Grad mode and autocast are the caller's choice; blocks
    after the last one asked for are not run.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    p = backbone.patch_size
    if h % p or w % (p * tiles):
        raise ValueError(f"image size H x W = {h} x {w} must be a multiple of the patch size {p} and its width cut "
                         f"into {tiles} whole-patch tile(s)")
    order = resolve_layers(layers, backbone.depth)
    outputs = backbone.model.forward_intermediates(
        split_tiles(images, tiles), indices=order, norm=norm, stop_early=True, output_fmt="NLC",
        return_prefix_tokens=True, intermediates_only=True,
    )
    pick = [order.index(int(layer) % backbone.depth) for layer in layers]
    tokens = torch.stack([outputs[k][0].to(images.device) for k in pick], dim=1)  # gathered from a split model
    prefix = torch.stack([outputs[k][1].to(images.device) for k in pick], dim=1)
    return stitch_tiles(tokens, tiles, h // p), stitch_tiles(prefix, tiles, 1)


def split_tiles(images: torch.Tensor, tiles: int) -> torch.Tensor:
    """(B, 3, H, W) -> (tiles * B, 3, H, W / tiles): the side-by-side pieces as a batch, piece-major (every image's
    left piece, then every image's next one). The identity for one tile."""
    return images if tiles == 1 else torch.cat(images.chunk(tiles, dim=-1))


def stitch_tiles(tokens: torch.Tensor, tiles: int, rows: int) -> torch.Tensor:
    """Undo `split_tiles` on tokens: (tiles * B, L, rows * cols, C) row-major grids of the pieces -> (B, L,
    rows * tiles * cols, C), the row-major grid of the whole image (each row: piece 0's row, then piece 1's, ...).
    With rows = 1 it lays the pieces' token lists end to end (their prefix tokens)."""
    if tiles == 1:
        return tokens
    n, n_layers, t, c = tokens.shape
    grid = tokens.reshape(tiles, n // tiles, n_layers, rows, t // rows, c).permute(1, 2, 3, 0, 4, 5)
    return grid.reshape(n // tiles, n_layers, tiles * t, c)


def split_points(model: nn.Module, n_parts: int) -> list[int]:
    """The first block of parts 1..n-1 that gives each part about the same parameter count (the embeddings and
    everything outside the blocks count towards part 0, where they run)."""
    sizes = [sum(p.numel() for p in blk.parameters()) for blk in model.blocks]
    if not 1 <= n_parts <= len(sizes):
        raise DataError(f"cannot split {len(sizes)} blocks over {n_parts} devices")
    total = sum(p.numel() for p in model.parameters())
    before = [total - sum(sizes)]  # parameters on the devices before block i: embeddings, final norm, blocks < i
    for size in sizes[:-1]:
        before.append(before[-1] + size)
    points: list[int] = []
    for part in range(1, n_parts):
        lowest, highest = (points[-1] if points else 0) + 1, len(sizes) - (n_parts - part)
        points.append(min(range(lowest, highest + 1), key=lambda i: abs(before[i] - total * part / n_parts)))
    return points


def place_backbone(backbone: Backbone, devices: Sequence[torch.device],
                   split_at: Sequence[int] | None = None) -> list[int]:
    """Put the backbone on `devices`: one device holds it whole; several hold consecutive runs of blocks (pipeline
    style, one batch at a time), starting at the blocks `split_at` (default: by parameter count, `split_points`).

    Embeddings and the final norm stay on the first device; forward hooks move each block's input (hidden state
    and RoPE table) to the block's device and the normed intermediates back, so `forward_tokens` runs unchanged and
    returns everything on the first device. Returns the first block of every part.
    """
    devices = [torch.device(d) for d in devices]
    model = backbone.model.to(devices[0])
    if len(devices) == 1:
        return [0]
    if split_at is None:
        split_at = split_points(model, len(devices))
    split_at = [int(b) for b in split_at]
    if len(split_at) != len(devices) - 1 or split_at != sorted(set(split_at)) or \
            not all(0 < b < backbone.depth for b in split_at):
        raise DataError(f"split points {split_at} must be {len(devices) - 1} increasing block indices in "
                         f"1..{backbone.depth - 1} for {len(devices)} devices")
    starts = [0, *split_at]
    for part, (device, first) in enumerate(zip(devices, starts)):
        last = starts[part + 1] if part + 1 < len(starts) else backbone.depth
        for blk in model.blocks[first:last]:
            blk.to(device).register_forward_pre_hook(_mover(device), with_kwargs=True)
    model.norm.register_forward_pre_hook(_mover(devices[0]), with_kwargs=True)
    return starts


def _mover(device: torch.device):
    def to_device(_module, args, kwargs):
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
    return to_device


def backbone_fingerprint(backbone: Backbone) -> dict[str, Any]:
    """Everything about the backbone that determines its tokens (for the extraction fingerprint)."""
    return {
        "name": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "random_seed": backbone.seed if backbone.weights_sha256 == RANDOM else None,
        "overrides": dict(backbone.overrides),
        "embed_dim": backbone.embed_dim,
        "depth": backbone.depth,
        "patch_size": backbone.patch_size,
        "n_prefix": backbone.n_prefix,
        "timm_version": timm.__version__,
    }
