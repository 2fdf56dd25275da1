"""The LoRA path: adapt the last K blocks of the frozen DINOv3 backbone with peft adapters, running it live.

Everything but the token source is stage two's (`biomass_cache.cv.cross_validate`): heads, losses, mixup,
uncertainty weighting, PCGrad, EMA, folds, metrics and the run folder. Here the tokens come from `LiveTokens`, an
nn.Module whose trainable parameters are the adapters only; it runs either the whole backbone on augmented pixels (a
fresh view per epoch) or, with a prefix cache (biomass_cache.live), only blocks [depth-K, depth) on the stored hidden
state entering block depth-K.

Checkpoints hold adapter and head tensors only (megabytes), plus the base backbone's name and weights sha256,
checked on load. Scale-out: `torchrun --nproc-per-node N train_heads.py --lora ...` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import typer
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from biomass_cache import runs
from biomass_cache.backbone import (Backbone, backbone_fingerprint, create_backbone, resolve_layers, split_tiles,
                                    stitch_tiles)
from biomass_cache.cv import SHARED_OPTIONS, cli_overrides
from biomass_cache.data import DataError, read_training_table
from biomass_cache.dataset import AuxSpec
from biomass_cache.extract import _parse_layers
from biomass_cache.io import atomic_path, write_json
from biomass_cache.precision import autocast, check_precision, resolve_precision
from biomass_cache.live import EpochSampler, LiveDataset, build_prefix_cache, make_loader
from biomass_cache.runtime import run
from biomass_cache.store import open_store
from biomass_cache.targets import ZScore, components_to_targets
from biomass_cache.train import check_values, is_int, is_number
from biomass_cache.views import ViewPolicy, parse_size, validate_tiles

import peft  # noqa: E402  (after biomass_cache.backbone, which makes timm/torchvision importable)
from peft.tuners.lora import LoraLayer  # noqa: E402

ADAPTER_PREFIX, HEAD_PREFIX = "backbone.", "head."


# ----------------------------------------------------------------------------------------------- settings
@dataclass
class LoraSettings:
    """The live token source and its adapters; the [lora] section of a config (CLI flags override)."""

    backbone: str = "vit_small_patch16_dinov3"
    weights: str = "random"  # "random" (seeded) or a local weights file
    backbone_seed: int = 0  # initialisation of a random backbone
    overrides: dict = field(default_factory=dict)  # timm kwargs for tiny test models
    size: tuple[int, int] = (448, 224)  # W x H
    tiles: int = 1  # side-by-side pieces of `size`, each through the backbone alone (backbone.forward_tokens)
    layers: list[int] = field(default_factory=lambda: [5, 8, 11])  # blocks the head reads (negative allowed)
    norm: bool = True  # final norm on every read layer (as in extraction)
    blocks: int = 4  # adapt the last K blocks
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["attn.qkv"])  # module names inside a block
    lr: float = 1e-4  # adapter learning rate (own optimizer groups)
    layer_decay: float = 1.0  # adapter lr of block b = lr * layer_decay ** (depth - 1 - b)
    view_seed: int = 0  # augmentation seed (views.make_view)
    prefix_cache: Optional[str] = None  # Zarr store of hidden states entering block depth-K
    prefix_views: int = 4  # views stored in the prefix cache (view 0 clean)
    micro_batch: int = 0  # >0: run the backbone in checkpointed micro-batches (exact gradient accumulation)
    grad_checkpointing: bool = False  # recompute each block in backward (timm set_grad_checkpointing)
    amp: bool = True  # autocast in `precision` (False: fp32)
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (precision.py; fp16 trains without loss scaling)

    def __post_init__(self) -> None:
        check_precision(self.precision)


def adapted_blocks(depth: int, k: int) -> list[int]:
    if not 1 <= k <= depth:
        raise DataError(f"--lora-blocks must be in 1..{depth} for a backbone of depth {depth}, got {k}")
    return list(range(depth - k, depth))


def target_regex(blocks: Sequence[int], targets: Sequence[str]) -> str:
    """Full module names (peft full-matches a string): `proj` alone would also hit `patch_embed.proj`."""
    return rf"blocks\.({'|'.join(map(str, blocks))})\.({'|'.join(re.escape(t) for t in targets)})"


# ----------------------------------------------------------------------------------------- adapter injection
def inject_lora(bb: Backbone, s: LoraSettings, seed: int = 0) -> list[str]:
    """Add peft LoRA adapters to `s.targets` of the last `s.blocks` blocks (in place); returns the adapted names.

    On `_qkvb` variants the attention calls F.linear on the raw qkv weight, bypassing any wrapper: those blocks are
    switched to `qkv_bias_separate` (qkv(x) + bias, the same function) so the adapter is really applied.
    """
    model = bb.model
    blocks = adapted_blocks(bb.depth, s.blocks)
    expected = [f"blocks.{b}.{t}" for b in blocks for t in s.targets]
    modules = dict(model.named_modules())
    absent = [n for n in expected if not isinstance(modules.get(n), nn.Linear)]
    if absent:
        raise DataError(f"LoRA targets {absent[:4]} are not Linear layers of {bb.name}; "
                         f"valid targets are Linear modules inside a block, e.g. attn.qkv, attn.proj, mlp.fc1")
    if "attn.qkv" in s.targets:
        for b in blocks:
            attn = model.blocks[b].attn
            if not hasattr(attn, "qkv_bias_separate"):
                raise DataError(f"blocks.{b}.attn ({type(attn).__name__}) is not timm's EvaAttention: cannot "
                                 "check that a LoRA on its qkv is applied")
            if getattr(attn, "q_bias", None) is not None:
                attn.qkv_bias_separate = True
    config = peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, bias="none",
                             target_modules=target_regex(blocks, s.targets))
    peft.inject_adapter_in_model(config, model)
    reset_adapters(model, seed)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    if adapted != sorted(expected):
        raise RuntimeError(f"peft adapted {adapted}, expected {sorted(expected)}")
    stray = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if stray:
        raise RuntimeError(f"non-adapter parameters became trainable: {stray[:4]}")
    return adapted


def reset_adapters(model: nn.Module, seed: int) -> None:
    """Fresh adapters (A random, B = 0: the model's output is unchanged), a pure function of `seed`: identical on
    every rank, in every rerun, and for every fold (the adapters are re-initialised, never re-injected)."""
    gen = torch.Generator().manual_seed(seed)
    layers = sorted((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        for _, m in layers:  # peft's default init, drawn on the CPU so every device gets the same numbers
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            bound = 1 / math.sqrt(a.shape[1])  # = kaiming_uniform_(a=sqrt(5)), nn.Linear's default
            a.copy_(torch.empty(a.shape).uniform_(-bound, bound, generator=gen))
            b.zero_()


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by their model names (each contains `lora_`)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen tensor (for bit-equality checks)."""
    return {n: t for n, t in model.state_dict().items() if "lora_" not in n}


# -------------------------------------------------------------------------------------- the split forward
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
    are the adapters only (the loop's `extra`: `reset(seed)` per fold, `param_groups()` for the optimizer, EMA
    and clipping with the head's). `train()` toggles only the adapters' dropout: the frozen backbone stays in eval
    mode.
    """

    def __init__(self, bb: Backbone, s: LoraSettings, device: torch.device):
        super().__init__()
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

    def reset(self, seed: int) -> None:
        reset_adapters(self.model, seed)

    def param_groups(self) -> list[dict]:
        """One optimizer group per adapted block: lr * layer_decay ** (blocks above it), no weight decay."""
        groups: dict[int, list] = {}
        for n, p in adapter_state(self.model).items():
            groups.setdefault(int(n.split(".")[1]), []).append(p)
        top = self.bb.depth - 1
        return [{"params": ps, "lr": self.s.lr * self.s.layer_decay ** (top - b), "weight_decay": 0.0}
                for b, ps in sorted(groups.items())]

    def train(self, mode: bool = True) -> "LiveTokens":
        self.training = mode
        for m in self.model.modules():
            if isinstance(m, LoraLayer):
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


# ---------------------------------------------------------------------------------------------- checkpoints
def lora_fingerprint(bb: Backbone, s: LoraSettings) -> dict:
    """What determines the live tokens before training: backbone, image size, read layers, norm, views."""
    return {"kind": "lora", "backbone": backbone_fingerprint(bb), "size": list(s.size),
            **({"tiles": s.tiles} if s.tiles > 1 else {}),
            "layers": resolve_layers(s.layers, bb.depth), "norm": s.norm, "view_seed": s.view_seed,
            "policy": asdict(ViewPolicy()), "adapted_blocks": adapted_blocks(bb.depth, s.blocks)}


def base_identity(bb: Backbone) -> dict:
    fp = backbone_fingerprint(bb)
    return {k: fp[k] for k in ("name", "weights_sha256", "random_seed", "overrides")}


def save_checkpoint(json_path: Path, head: nn.Module, meta: dict, live: LiveTokens) -> None:
    """Head + adapter tensors (never a frozen weight) to `<stem>.safetensors`, then the JSON beside it."""
    json_path = Path(json_path)
    tensors = {HEAD_PREFIX + k: v for k, v in head.state_dict().items()}
    tensors |= {ADAPTER_PREFIX + k: v for k, v in adapter_state(live.model).items()}
    weights = json_path.with_suffix(".safetensors")
    with atomic_path(weights) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    write_json(json_path, {**meta, "kind": "lora", "base": base_identity(live.bb), "lora": asdict(live.s),
                           "weights_sha256": runs.sha256_file(weights), "format_version": runs.FORMAT_VERSION})


def load_checkpoint(json_path: Path, weights: str | None = None, device: str = "cpu", precision: str | None = None):
    """(head, live tokens, meta) from a LoRA checkpoint; the base backbone is rebuilt from `weights` (default: the
    recorded path) and must be the one the adapters were trained on (name, weights sha256, seed, overrides). The
    backbone computes in `precision` (default: the one recorded at training, resolved on `device`)."""
    from biomass_cache.heads import rebuild_head

    json_path = Path(json_path)
    meta = json.loads(json_path.read_text())
    if meta.get("kind") != "lora":
        raise DataError(f"{json_path}: not a LoRA checkpoint (use runs.load_head for cached-token heads)")
    file = json_path.with_suffix(".safetensors")
    if runs.sha256_file(file) != meta["weights_sha256"]:
        raise DataError(f"{file}: sha256 differs from the one recorded in {json_path.name} (file changed?)")
    s = LoraSettings(**{**meta["lora"], "size": tuple(meta["lora"]["size"]), "prefix_cache": None})
    s.weights = str(weights or s.weights)
    s.precision = check_precision(precision or s.precision)
    bb = create_backbone(s.backbone, s.weights, seed=s.backbone_seed, overrides=s.overrides)
    if base_identity(bb) != meta["base"]:
        raise DataError(f"{json_path}: the adapters were trained on base {meta['base']}, but {s.weights} gives "
                        f"{base_identity(bb)}; pass the original backbone weights")
    inject_lora(bb, s)
    live = LiveTokens(bb, s, torch.device(device))
    tensors = load_file(file)
    adapters = {k[len(ADAPTER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)}
    mine = adapter_state(live.model)
    if set(adapters) != set(mine):
        raise DataError(f"{file}: adapter tensors {sorted(set(adapters) ^ set(mine))[:4]} do not match the model")
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(adapters[k])
    head = rebuild_head(meta["head"], ZScore.from_dict(meta["zscore"]))
    head.load_state_dict({k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)})
    return head.to(device).eval(), live.eval(), meta


def predict_images(json_path: Path, data_dir: Path, table: pd.DataFrame, split: str = "test",
                   views: Sequence[int] = (0,), weights: str | None = None, device: str = "cpu",
                   batch_size: int = 16, workers: int = 0, precision: str | None = None) -> np.ndarray:
    """(N, 5) grams for `table`'s images with a LoRA checkpoint: components averaged over `views`, then rebuilt."""
    head, live, meta = load_checkpoint(json_path, weights, device, precision)
    aux = AuxSpec.from_dict(meta["aux"])
    comps = []
    for v in views:
        ds = LiveDataset(table, range(len(table)), data_dir, live.s, train=False, seed=0, aux=aux, view=v,
                         split=split)
        comps.append(runs.predict_components(head, make_loader(ds, batch_size, workers), live))
    return runs.components_to_grams(np.mean(comps, axis=0))


def predict_member(rm, table: pd.DataFrame, data_dir: Path, device: str, progress: bool,
                   precision: str | None = None) -> np.ndarray:
    """(N, 5) grams of a LoRA ensemble member (`ensemble.ResolvedMember`) for the test images of `table`, in order:
    every fold model on the TTA views (clean and flips), components averaged over views and folds."""
    from biomass_cache.views import TTA_VIEWS

    comps = [predict_images(path, data_dir, table, split="test", views=range(len(TTA_VIEWS)),
                            weights=rm.extract["weights"], device=device, precision=precision)[:, :3]
             for path in tqdm(rm.checkpoints, desc=f"LoRA member {rm.member.name}", unit="fold", disable=not progress)]
    return components_to_targets(np.mean(comps, axis=0))


# ----------------------------------------------------------------------------------------------- scale out
def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world, device); under torchrun joins the process group (nccl on CUDA, gloo on CPU)."""
    from biomass_cache.train import pick_device

    dev, world = pick_device(device), int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Mean of every gradient over the ranks, in one all-reduce (the loop's `sync`, after backward or PCGrad).
    A missing gradient counts as zero, so every rank sends the same tensor list."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------ cross-validation
def run_lora(data: Path, out: Path, cfg, s: LoraSettings, folds_csv: Path | None = None,
             strict_folds: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Stage two's cross-validation with a live, adapted backbone; writes the same run folder (rank 0).

    The head reads the live layers `s.layers` (so `cfg.layers`, block indices of a cache, is set to []). Live views
    are drawn fresh every epoch, so validation and OOF read the clean view 0 (`cfg.tta` must be 0 or the default
    "all"). `cfg.batch_size` is the global batch, split evenly over the ranks.
    """
    from biomass_cache.cv import TokenSource, cross_validate

    rank, world, device = init_distributed(cfg.device)
    if cfg.batch_size % world:
        raise DataError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    if cfg.tta not in ("all", 0):
        raise DataError(f"the LoRA path predicts the clean view 0 (no stored views to average); got tta={cfg.tta!r}")
    cfg = replace(cfg, tta=0, layers=[])
    if s.weights != "random":  # recorded absolute, so the run folder finds its base backbone from anywhere
        s = replace(s, weights=str(Path(s.weights).resolve()))
    data, out = Path(data), Path(out)
    table = read_training_table(data / "train.csv")
    bb = create_backbone(s.backbone, s.weights, seed=s.backbone_seed, overrides=s.overrides)
    inject_lora(bb, s)
    live = LiveTokens(bb, s, device)
    prefix = None
    if s.prefix_cache:
        live.check_prefix_layers()
        if rank == 0:
            build_prefix_cache(Path(s.prefix_cache), table, data, live, progress)
        barrier(world)
        prefix = open_store(s.prefix_cache)
    per_rank = cfg.batch_size // world

    def train_loader(rows: np.ndarray, seed: int, aux: AuxSpec):
        ds = LiveDataset(table, rows, data, s, train=True, seed=seed, aux=aux, prefix=prefix)
        return make_loader(ds, per_rank, cfg.workers, EpochSampler(ds, per_rank, seed, rank, world))

    def val_loader(rows: np.ndarray, aux: AuxSpec):
        ds = LiveDataset(table, rows, data, s, train=False, seed=0, aux=aux, prefix=prefix, view=0)
        return make_loader(ds, cfg.eval_batch_size, cfg.workers)

    def predict(head: nn.Module, meta: dict, rows: np.ndarray) -> np.ndarray:
        loader = val_loader(rows, AuxSpec.from_dict(meta["aux"]))
        return runs.components_to_grams(runs.predict_components(head, loader, live))

    fingerprint = lora_fingerprint(bb, s)
    source = TokenSource(
        layers=live.layers, signature={"channels": bb.embed_dim, "grid": list(live.grid)}, fingerprint=fingerprint,
        config={"lora": asdict(s), "fingerprint": fingerprint, "device": str(device), "world_size": world},
        device=device, train_loader=train_loader, val_loader=val_loader, tokens_fn=live, predict=predict,
        save=partial(save_checkpoint, live=live), extra=live, rank=rank, barrier=partial(barrier, world),
        sync=partial(average_gradients, world=world) if world > 1 else None)
    if bb.weights_sha256 == "random" and rank == 0:
        tqdm.write("NOTE: LoRA on a RANDOMLY INITIALISED backbone: scores are a demo only")
    return cross_validate(source, table, data, out, cfg, {cfg.head: cfg}, folds_csv, strict_folds, overwrite)


# ---------------------------------------------------------------------------------------------- command line
def load_settings(config: Path | None, overrides: dict) -> LoraSettings:
    """[lora] of the config (backbone, weights, size, layers, norm default to its [extract] section), then flags."""
    doc = tomllib.loads(Path(config).read_text()) if config else {}
    extract = {k: v for k, v in doc.get("extract", {}).items() if k in ("backbone", "weights", "size", "tiles",
                                                                           "layers", "norm", "precision")}
    section = {**extract, **doc.get("lora", {}), **overrides}
    unknown = sorted(set(section) - {f.name for f in fields(LoraSettings)})
    if unknown:
        raise DataError(f"{config} [lora]: unknown key(s) {unknown}")
    s = replace(LoraSettings(), **section)
    s.size = parse_size(s.size) if isinstance(s.size, str) else tuple(s.size)
    check_values(s, LORA_RULES, LORA_FLAGS, "lora")
    return s


# [lora] key -> (is the value valid, what it must be), as train.RULES; the flags that set them
LORA_RULES = {
    "blocks": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "rank": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "alpha": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "dropout": (lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "lr": (lambda v: is_number(v) and v > 0, "a number > 0"),
    "layer_decay": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "prefix_views": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "micro_batch": (lambda v: is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    "layers": (lambda v: isinstance(v, list) and len(v) > 0 and all(is_int(x) for x in v), "a list of block indices"),
    "targets": (lambda v: isinstance(v, list) and len(v) > 0, "a list of module names, e.g. attn.qkv"),
}
LORA_FLAGS = {"blocks": "--lora-blocks", "rank": "--lora-rank", "alpha": "--lora-alpha", "dropout": "--lora-dropout",
              "lr": "--lora-lr", "layer_decay": "--lora-layer-decay", "prefix_views": "--prefix-views",
              "micro_batch": "--micro-batch", "layers": "--layers", "targets": "--lora-targets"}


def lora_command(
    data: Path = typer.Option(..., "--data", help="Kaggle-format data folder holding train.csv and the images."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (same layout as `biomass train`)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="timm DINOv3 name [config, ViT-S]."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file, or 'random'."),
    size: Optional[str] = typer.Option(None, "--size", help="Image size WxH, multiples of 16 [448x224]."),
    tiles: Optional[int] = typer.Option(None, "--tiles", help="Side-by-side tiles of --size, each through the "
                                        "backbone alone, token grids stitched [config [extract], 1]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Blocks the head reads, e.g. 5,8,11 or -1."),
    norm: Optional[bool] = typer.Option(None, "--norm/--no-norm", help="Final norm on the read layers [on]."),
    head: Optional[str] = typer.Option(None, "--head", help="Head name (one; heads.HEADS) [density]."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Grouped folds [config, 5]."),
    folds_csv: Optional[Path] = SHARED_OPTIONS["folds_csv"],
    full: bool = SHARED_OPTIONS["full"],
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs [config, 120]."),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config: [train], [lora], [extract]."),
    lora_blocks: Optional[int] = typer.Option(None, "--lora-blocks", help="Adapt the last K blocks [4]."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", help="LoRA rank [8]."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", help="LoRA alpha (scale alpha/rank) [16]."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", help="Dropout on the adapter input [0]."),
    lora_targets: Optional[str] = typer.Option(None, "--lora-targets",
                                               help="Modules inside a block, e.g. attn.qkv,attn.proj,mlp.fc1 [attn.qkv]."),
    lora_lr: Optional[float] = typer.Option(None, "--lora-lr", help="Adapter learning rate [1e-4]."),
    layer_decay: Optional[float] = typer.Option(None, "--lora-layer-decay",
                                                help="Adapter lr x decay^(blocks above) [1 = off]."),
    prefix_cache: Optional[str] = typer.Option(None, "--lora-prefix-cache",
                                               help="Zarr store of hidden states entering the first adapted block "
                                                    "(built if absent): only the adapted blocks run live."),
    prefix_views: Optional[int] = typer.Option(None, "--prefix-views", help="Views per image in the prefix cache."),
    micro_batch: Optional[int] = typer.Option(None, "--micro-batch",
                                              help="Backbone micro-batch: exact gradient accumulation, less memory."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                                      help="Recompute blocks in backward (large backbones)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Autocast in --precision [on]; off: fp32."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | bf16 | fp16 | fp32 [auto: bf16 on "
                                            "GPUs with native bf16, fp16 on older ones, fp32 on CPU]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size [config, 32]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate of the head [config]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of folds, init and mixup [config, 0]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda [auto]; torchrun: LOCAL_RANK."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers (decode + augment)."),
    mixup: Optional[bool] = SHARED_OPTIONS["mixup"],
    uw: Optional[bool] = SHARED_OPTIONS["uw"],
    pcgrad: Optional[bool] = SHARED_OPTIONS["pcgrad"],
    ema: Optional[bool] = SHARED_OPTIONS["ema"],
    aux: Optional[bool] = SHARED_OPTIONS["aux"],
    stratify: Optional[bool] = SHARED_OPTIONS["stratify"],
    no_plots: bool = SHARED_OPTIONS["no_plots"],
    overwrite: bool = SHARED_OPTIONS["overwrite"],
) -> None:
    """Train a head + LoRA adapters on a live DINOv3 backbone with grouped K-fold CV (train_heads.py --lora)."""
    from biomass_cache.train import load_config, resolve

    base, _, _ = load_config(config)
    overrides = cli_overrides(dict(folds=folds, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                   workers=workers, head=head, mixup=mixup, uw=uw, pcgrad=pcgrad, ema=ema, aux=aux,
                                   stratify=stratify),
                              full, no_plots)
    cfg, _ = resolve(base, [], overrides, None)
    lora = dict(backbone=backbone, weights=weights, size=size, tiles=tiles, norm=norm, blocks=lora_blocks,
                rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, lr=lora_lr, layer_decay=layer_decay,
                prefix_cache=prefix_cache, prefix_views=prefix_views, micro_batch=micro_batch,
                grad_checkpointing=grad_checkpointing, amp=amp, precision=precision,
                layers=_parse_layers(layers) if layers else None,
                targets=[t.strip() for t in lora_targets.split(",")] if lora_targets else None)
    s = load_settings(config, {k: v for k, v in lora.items() if v is not None})
    run_lora(data, out, cfg, s, folds_csv=folds_csv, strict_folds=folds is not None, overwrite=overwrite)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # python -m biomass_cache.lora ... (and under torchrun)
    run(lora_command)
