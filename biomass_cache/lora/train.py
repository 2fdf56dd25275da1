"""LoRA training: stage two's cross-validation with the live adapted backbone as token source, on one process or
under torchrun (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from biomass_cache.backbone.vit import create_backbone
from biomass_cache.common.data import read_training_table
from biomass_cache.common.distributed import init_ranks
from biomass_cache.common.errors import DataError
from biomass_cache.lora.adapters import make_trainable
from biomass_cache.lora.checkpoint import lora_fingerprint, save_checkpoint
from biomass_cache.lora.data import EpochSampler, LiveDataset, build_prefix_cache, live_loader
from biomass_cache.lora.features import FeatureMatch, TeacherTokens
from biomass_cache.lora.model import LiveTokens
from biomass_cache.lora.settings import LoraSettings
from biomass_cache.store.layout import open_store
from biomass_cache.train import inference, runs
from biomass_cache.train.crossval import TokenSource, cross_validate
from biomass_cache.train.dataset import AuxSpec


@dataclass
class Part:
    """What one fold's model trains on: `rows` of `table` (image paths relative to `data`), each of loss weight
    `weight` (one for all, or one per row)."""

    table: pd.DataFrame
    rows: np.ndarray
    data: Path
    weight: float | np.ndarray


TrainingPart = Callable[[np.ndarray], Part]  # a fold's training rows of the table -> what its model trains on


# ------------------------------------------------------------------------------------ cross-validation
def run_lora(data: Path, out: Path, cfg, s: LoraSettings, folds_csv: Path | None = None,
             strict_folds: bool = False, progress: bool = True, overwrite: bool = False,
             training_part: TrainingPart | None = None, record: dict | None = None,
             teacher: TeacherTokens | None = None, feature_weight: float = 1.0) -> dict:
    """Stage two's cross-validation with a live, adapted backbone; writes the same run folder (rank 0).

    The head reads the live layers `s.layers` (so `cfg.layers`, block indices of a cache, is set to []). Live views
    are drawn fresh every epoch, so validation and OOF read the clean view 0 (`cfg.tta` must be 0 or the default
    "all"). `cfg.batch_size` is the global batch, split evenly over the ranks. `training_part` gives what a fold's
    model trains on instead of the table's own rows and labels (distillation: submit/distill.py); `record` goes
    into config.json. `teacher`: a teacher's training tokens (`features.teacher_tokens`) that the student's tokens of
    the same views match through a learned projection, that loss times `feature_weight` (feature distillation).
    """
    ranks, device = init_ranks(cfg.device)
    rank, world = ranks.rank, ranks.world
    if cfg.batch_size % world:
        raise DataError(f"--batch-size {cfg.batch_size} must be a multiple of the {world} processes")
    if cfg.tta not in ("all", 0):
        raise DataError(f"the LoRA path predicts the clean view 0 (no stored views to average); got tta={cfg.tta!r}")
    cfg = replace(cfg, tta=0, layers=[])
    if s.weights != "random":  # recorded absolute, so the run folder finds its base backbone from anywhere
        s = replace(s, weights=str(Path(s.weights).resolve()))
    data, out = Path(data), Path(out)
    with runs.claim_run_dir(out, overwrite, rank == 0):  # before the backbone loads
        table = read_training_table(data / "train.csv")
        bb = create_backbone(s.backbone, s.weights, seed=s.backbone_seed, overrides=s.overrides)
        make_trainable(bb, s)
        live = LiveTokens(bb, s, device)
        if teacher is not None:
            if s.prefix_cache:
                raise DataError("feature distillation trains on the teacher store's views, a prefix cache holds the "
                                "student's own: leave out the prefix cache")
            live.match = FeatureMatch(len(live.layers), bb.embed_dim, teacher.channels, live.grid, teacher.grid,
                                      feature_weight).to(device)
            record = {**(record or {}), "features": {**teacher.describe(), "weight": feature_weight}}
            if teacher.n_views < 3 and rank == 0:
                tqdm.write(f"NOTE: the student trains on the teacher store's {teacher.n_views} view(s) per photo "
                           "(--features), fewer augmentations than its own fresh view per epoch")
        prefix = None
        if s.prefix_cache:
            live.check_prefix_layers()
            if rank == 0:
                build_prefix_cache(Path(s.prefix_cache), table, data, live, progress)
            ranks.barrier()
            prefix = open_store(s.prefix_cache)
        per_rank = cfg.batch_size // world

        def train_loader(rows: np.ndarray, seed: int, aux: AuxSpec):
            part = Part(table, rows, data, 1.0) if training_part is None else training_part(rows)
            ds = LiveDataset(part.table, part.rows, part.data, s, train=True, seed=seed, aux=aux, prefix=prefix,
                             weight=part.weight, teacher=teacher)
            return live_loader(ds, per_rank, cfg.workers, EpochSampler(ds, per_rank, seed, rank, world))

        def val_loader(rows: np.ndarray, aux: AuxSpec):
            ds = LiveDataset(table, rows, data, s, train=False, seed=0, aux=aux, prefix=prefix, view=0)
            return live_loader(ds, cfg.eval_batch_size, cfg.workers)

        def predict(head: nn.Module, meta: dict, rows: np.ndarray) -> np.ndarray:
            loader = val_loader(rows, AuxSpec.from_dict(meta["aux"]))
            return inference.predict_loader(head, loader, live).grams

        fingerprint = lora_fingerprint(bb, s)
        source = TokenSource(
            layers=live.layers, signature={"channels": bb.embed_dim, "grid": list(live.grid)}, fingerprint=fingerprint,
            config={"lora": asdict(s), "fingerprint": fingerprint, "device": str(device), "world_size": world,
                    **(record or {})},
            device=device, train_loader=train_loader, val_loader=val_loader, tokens_fn=live, predict=predict,
            save=partial(save_checkpoint, live=live), extra=live, rank=rank, barrier=ranks.barrier,
            sync=ranks.average_gradients if world > 1 else None)
        if bb.weights_sha256 == "random" and rank == 0:
            tqdm.write("NOTE: LoRA on a RANDOMLY INITIALISED backbone: scores are a demo only")
        return cross_validate(source, table, data, out, cfg, {cfg.head: cfg}, folds_csv, strict_folds)
