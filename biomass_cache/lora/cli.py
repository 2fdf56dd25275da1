"""`biomass lora` (train_heads.py --lora; `python -m biomass_cache.lora`, also under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist
import typer

from biomass_cache.cv import SHARED_OPTIONS, cli_overrides
from biomass_cache.extract import _parse_layers
from biomass_cache.lora.settings import load_settings
from biomass_cache.lora.train import run_lora
from biomass_cache.train import load_config, resolve


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
    interval_bins: Optional[int] = SHARED_OPTIONS["interval_bins"],
    stratify: Optional[bool] = SHARED_OPTIONS["stratify"],
    no_plots: bool = SHARED_OPTIONS["no_plots"],
    overwrite: bool = SHARED_OPTIONS["overwrite"],
) -> None:
    """Train a head + LoRA adapters on a live DINOv3 backbone with grouped K-fold CV (train_heads.py --lora)."""
    base, _, _ = load_config(config)
    overrides = cli_overrides(dict(folds=folds, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                   workers=workers, head=head, mixup=mixup, uw=uw, pcgrad=pcgrad, ema=ema, aux=aux,
                                   interval_bins=interval_bins, stratify=stratify),
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
