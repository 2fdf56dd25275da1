"""LoRA settings: the [lora] section of a config (CLI flags override), checked like stage two's settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Sequence

from biomass_cache.backbone.precision import check_precision
from biomass_cache.backbone.views import parse_view_size
from biomass_cache.common.config import SEED_RULE, Config, check_table, check_values, is_int, is_number, read_config
from biomass_cache.common.errors import DataError
from biomass_cache.extract.config import EXTRACT_RULES


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
    finetune: str = "lora"  # lora: adapters on those blocks; full: the blocks' own weights train (a student)
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


def load_settings(config: Path | Config | None, overrides: dict) -> LoraSettings:
    """[lora] of the config (backbone, weights, size, tiles, layers, norm, precision default to its [extract]
    section), then flags; the file's keys and values are checked before the flags are merged."""
    conf = read_config(config)
    extract = {k: v for k, v in conf.section("extract").items() if k in EXTRACT_KEYS}
    lora = conf.section("lora")
    conf.check_keys(lora, [f.name for f in fields(LoraSettings)], "[lora]")
    check_table(conf, extract, "extract", EXTRACT_RULES)
    check_table(conf, lora, "lora", LORA_RULES)
    s = replace(LoraSettings(), **{**extract, **lora, **overrides})
    s.size = parse_view_size(s.size) if isinstance(s.size, str) else tuple(s.size)
    check_values(s, LORA_RULES, LORA_FLAGS, "lora")
    return s


FINETUNE = ("lora", "full")
# the [extract] keys a [lora] section takes over (the same backbone and views)
EXTRACT_KEYS = ("backbone", "weights", "size", "tiles", "layers", "norm", "precision")
# [lora] key -> (is the value valid, what it must be), as train.config.RULES; the flags that set them
LORA_RULES = {
    "backbone_seed": SEED_RULE,
    "view_seed": SEED_RULE,
    "blocks": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "finetune": (lambda v: v in FINETUNE, f"one of {', '.join(FINETUNE)}"),
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
LORA_FLAGS = {"blocks": "--lora-blocks", "finetune": "--finetune", "rank": "--lora-rank", "alpha": "--lora-alpha",
              "dropout": "--lora-dropout", "lr": "--lora-lr", "layer_decay": "--lora-layer-decay",
              "prefix_views": "--prefix-views", "micro_batch": "--micro-batch", "layers": "--layers",
              "targets": "--lora-targets"}
