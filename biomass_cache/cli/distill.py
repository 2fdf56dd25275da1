"""`biomass distill`: a small student backbone (LoRA, or its last blocks fine-tuned) and a head trained to match a
teacher's predictions and, optionally, its cached tokens (submit/distill.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from biomass_cache.cli.lora import FINETUNE_OPTION, _lora
from biomass_cache.cli.options import TEST_OPTIONS, TRAIN_OPTIONS, cli_overrides, with_default
from biomass_cache.common.config import read_config
from biomass_cache.common.distributed import resolve_device
from biomass_cache.extract.config import parse_layers
from biomass_cache.lora.settings import load_settings
from biomass_cache.submit.distill import DEFAULT_ALPHA, DEFAULT_WEIGHT, distill
from biomass_cache.submit.spec import spec_from_options
from biomass_cache.train.config import TrainConfig, load_config, resolve


def distill_command(
    data: Path = TRAIN_OPTIONS["data"],
    out: Path = typer.Option(..., "--out", help="Run folder to write (as `biomass lora` writes; exportable)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Run folder(s), comma-separated (their mean), "
                                          "whose predictions the student learns; the first gives the folds."),
    ensemble: Optional[Path] = typer.Option(None, "--ensemble", help="Ensemble file (as `biomass submit`'s) as "
                                            "the teacher, instead of --teacher."),
    student: Optional[str] = typer.Option(None, "--student", help="The student's timm DINOv3 backbone "
                                          "(vit_small_patch16_dinov3)."),
    student_weights: Optional[str] = _lora("--student-weights", "The student's local weights file, or 'random'",
                                           "weights"),
    photos: Optional[List[Path]] = typer.Option(None, "--photos", help="A folder of unlabelled photos the student "
                                                "also learns the teacher's predictions on (repeatable)."),
    alpha: float = typer.Option(DEFAULT_ALPHA, "--alpha", help="A labelled image's target: (1 - alpha) x label + "
                                "alpha x the teacher's prediction."),
    weight: float = typer.Option(DEFAULT_WEIGHT, "--weight", help="Loss weight of an unlabelled photo relative to a "
                                 "labelled one."),
    features: float = typer.Option(0.0, "--features", help="Weight of the feature loss: the student's tokens, "
                                   "through a learned projection, match the teacher's cached tokens of the same "
                                   "views (0 = off)."),
    teacher_tokens: Optional[Path] = typer.Option(None, "--teacher-tokens", help="The teacher's training token "
                                                  "store for --features [the first member's]."),
    size: Optional[str] = _lora("--size", "The student's image size WxH, multiples of 16", "size"),
    layers: Optional[str] = _lora("--layers", "Student blocks the head reads, comma-separated", "layers"),
    head: Optional[str] = typer.Option(None, "--head", help=with_default("Head name", TrainConfig, "head")),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML config: [train], [lora] (the student)."),
    lora_blocks: Optional[int] = _lora("--lora-blocks", "Adapt the student's last K blocks", "blocks"),
    finetune: Optional[str] = FINETUNE_OPTION,
    lora_rank: Optional[int] = _lora("--lora-rank", "LoRA rank", "rank"),
    lora_lr: Optional[float] = _lora("--lora-lr", "Adapter learning rate", "lr"),
    full: bool = TRAIN_OPTIONS["full"],
    epochs: Optional[int] = TRAIN_OPTIONS["epochs"],
    batch_size: Optional[int] = TRAIN_OPTIONS["batch_size"],
    lr: Optional[float] = TRAIN_OPTIONS["lr"],
    seed: Optional[int] = TRAIN_OPTIONS["seed"],
    workers: Optional[int] = TRAIN_OPTIONS["workers"],
    work_dir: Optional[Path] = TEST_OPTIONS["work_dir"],
    weights: Optional[str] = TEST_OPTIONS["weights"],
    device: str = TEST_OPTIONS["device"],
    precision: Optional[str] = TEST_OPTIONS["precision"],
    no_plots: bool = TRAIN_OPTIONS["no_plots"],
    overwrite: bool = TRAIN_OPTIONS["overwrite"],
) -> None:
    """Distil a teacher (run folders or an ensemble) into a small student backbone (LoRA adapters or its last blocks
    fully fine-tuned) and a head.

    The teacher predicts the training photos (and --photos) as `biomass submit` does; the student trains on the
    teacher's folds, its OOF score beside the teacher's. Train again with --full for the model to export.
    """
    device = str(resolve_device(device))
    spec = spec_from_options(ensemble, teacher, weights=weights)
    conf = read_config(config)
    base, _, _ = load_config(conf)
    overrides = cli_overrides(dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                   workers=workers, head=head), full, no_plots)
    cfg, _ = resolve(base, [], overrides, None)
    lora = dict(backbone=student, weights=student_weights, size=size, blocks=lora_blocks, finetune=finetune,
                rank=lora_rank, lr=lora_lr, layers=parse_layers(layers) if layers else None)
    s = load_settings(conf, {k: v for k, v in lora.items() if v is not None})
    distill(spec, data, out, s, cfg, photos or [], alpha, weight, work_dir, device, precision, overwrite,
            features=features, teacher_tokens=teacher_tokens)
