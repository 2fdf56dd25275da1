"""`biomass lora` (train_heads.py --lora; under torchrun: `torchrun --nproc-per-node N -m biomass_cache lora ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch.distributed as dist
import typer

from biomass_cache.cli.options import TRAIN_OPTIONS, cli_overrides, with_default
from biomass_cache.common.config import read_config
from biomass_cache.extract.config import parse_layers
from biomass_cache.lora.settings import LoraSettings, load_settings
from biomass_cache.lora.train import run_lora
from biomass_cache.train.config import TrainConfig, load_config, resolve


def _lora(flags: str, text: str, name: str, note: str = "") -> typer.models.OptionInfo:
    """A [lora] setting's option, its help stating the LoraSettings default."""
    return typer.Option(None, flags, help=with_default(text, LoraSettings, name, note))


FINETUNE_OPTION = _lora("--finetune", "lora: adapters on those blocks; full: their own weights train", "finetune")


def lora_command(
    data: Path = typer.Option(..., "--data", help="Kaggle-format data folder holding train.csv and the images."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (same layout as `biomass train`)."),
    backbone: Optional[str] = _lora("--backbone", "timm DINOv3 name", "backbone"),
    weights: Optional[str] = _lora("--weights", "Local weights file, or 'random'", "weights"),
    size: Optional[str] = _lora("--size", "Image size WxH, multiples of 16", "size"),
    tiles: Optional[int] = _lora("--tiles", "Side-by-side tiles of --size, each through the backbone alone, token "
                                 "grids stitched", "tiles"),
    layers: Optional[str] = _lora("--layers", "Blocks the head reads, comma-separated, negative from the end",
                                  "layers"),
    norm: Optional[bool] = _lora("--norm/--no-norm", "Final norm on the read layers", "norm"),
    head: Optional[str] = typer.Option(None, "--head", help=with_default("Head name (one; heads.HEADS)", TrainConfig,
                                                                         "head")),
    folds: Optional[int] = TRAIN_OPTIONS["folds"],
    folds_csv: Optional[Path] = TRAIN_OPTIONS["folds_csv"],
    full: bool = TRAIN_OPTIONS["full"],
    epochs: Optional[int] = TRAIN_OPTIONS["epochs"],
    eval_every: Optional[int] = TRAIN_OPTIONS["eval_every"],
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config: [train], [lora], [extract]."),
    lora_blocks: Optional[int] = _lora("--lora-blocks", "Adapt the last K blocks", "blocks"),
    finetune: Optional[str] = FINETUNE_OPTION,
    lora_rank: Optional[int] = _lora("--lora-rank", "LoRA rank", "rank"),
    lora_alpha: Optional[float] = _lora("--lora-alpha", "LoRA alpha (scale alpha/rank)", "alpha"),
    lora_dropout: Optional[float] = _lora("--lora-dropout", "Dropout on the adapter input", "dropout"),
    lora_targets: Optional[str] = _lora("--lora-targets", "Modules inside a block, e.g. attn.qkv,attn.proj,mlp.fc1",
                                        "targets"),
    lora_lr: Optional[float] = _lora("--lora-lr", "Adapter learning rate", "lr"),
    layer_decay: Optional[float] = _lora("--lora-layer-decay", "Adapter lr x decay^(blocks above), 1 = off",
                                         "layer_decay"),
    prefix_cache: Optional[str] = typer.Option(None, "--lora-prefix-cache",
                                               help="Zarr store of hidden states entering the first adapted block "
                                                    "(built if absent): only the adapted blocks run live."),
    prefix_views: Optional[int] = _lora("--prefix-views", "Views per image in the prefix cache", "prefix_views"),
    micro_batch: Optional[int] = _lora("--micro-batch", "Backbone micro-batch: exact gradient accumulation, less "
                                       "memory, 0 = off", "micro_batch"),
    grad_checkpointing: Optional[bool] = _lora("--grad-checkpointing/--no-grad-checkpointing",
                                               "Recompute blocks in backward (large backbones)", "grad_checkpointing"),
    amp: Optional[bool] = _lora("--amp/--no-amp", "Autocast in --precision; off: fp32", "amp"),
    precision: Optional[str] = _lora("--precision", "auto | bf16 | fp16 | fp32", "precision", "auto is bf16 on GPUs "
                                     "with native bf16, fp16 on older ones, fp32 on CPU"),
    batch_size: Optional[int] = TRAIN_OPTIONS["batch_size"],
    lr: Optional[float] = TRAIN_OPTIONS["lr"],
    seed: Optional[int] = TRAIN_OPTIONS["seed"],
    device: Optional[str] = TRAIN_OPTIONS["device"],
    workers: Optional[int] = TRAIN_OPTIONS["workers"],
    mixup: Optional[bool] = TRAIN_OPTIONS["mixup"],
    uw: Optional[bool] = TRAIN_OPTIONS["uw"],
    pcgrad: Optional[bool] = TRAIN_OPTIONS["pcgrad"],
    ema: Optional[bool] = TRAIN_OPTIONS["ema"],
    aux: Optional[bool] = TRAIN_OPTIONS["aux"],
    interval_bins: Optional[int] = TRAIN_OPTIONS["interval_bins"],
    stratify: Optional[bool] = TRAIN_OPTIONS["stratify"],
    no_plots: bool = TRAIN_OPTIONS["no_plots"],
    overwrite: bool = TRAIN_OPTIONS["overwrite"],
) -> None:
    """Train a head + LoRA adapters on a live DINOv3 backbone with grouped K-fold CV (train_heads.py --lora).

    Options left out take the --config file's value ([lora]; the backbone settings also from [extract]), else the
    default shown in parentheses.
    """
    conf = read_config(config)
    base, _, _ = load_config(conf)
    overrides = cli_overrides(dict(folds=folds, epochs=epochs, eval_every=eval_every, batch_size=batch_size, lr=lr,
                                   seed=seed, device=device, workers=workers, head=head, mixup=mixup, uw=uw, pcgrad=pcgrad, ema=ema, aux=aux,
                                   interval_bins=interval_bins, stratify=stratify),
                              full, no_plots)
    cfg, _ = resolve(base, [], overrides, None)
    lora = dict(backbone=backbone, weights=weights, size=size, tiles=tiles, norm=norm, blocks=lora_blocks,
                finetune=finetune,
                rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, lr=lora_lr, layer_decay=layer_decay,
                prefix_cache=prefix_cache, prefix_views=prefix_views, micro_batch=micro_batch,
                grad_checkpointing=grad_checkpointing, amp=amp, precision=precision,
                layers=parse_layers(layers) if layers else None,
                targets=[t.strip() for t in lora_targets.split(",")] if lora_targets else None)
    s = load_settings(conf, {k: v for k, v in lora.items() if v is not None})
    run_lora(data, out, cfg, s, folds_csv=folds_csv, strict_folds=folds is not None, overwrite=overwrite)
    if dist.is_initialized():
        dist.destroy_process_group()
