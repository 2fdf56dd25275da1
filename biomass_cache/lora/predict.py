"""Predictions of LoRA checkpoints on photos: one checkpoint over views, and an ensemble member over its folds."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from biomass_cache.backbone.views import TTA_VIEWS
from biomass_cache.common.targets import components_to_targets
from biomass_cache.lora.checkpoint import load_checkpoint
from biomass_cache.lora.data import LiveDataset, live_loader
from biomass_cache.train import inference
from biomass_cache.train.dataset import AuxSpec


def predict_images(json_path: Path, data_dir: Path, table: pd.DataFrame, split: str = "test",
                   views: Sequence[int] = (0,), weights: str | None = None, device: str = "cpu",
                   batch_size: int = 16, workers: int = 0, precision: str | None = None) -> np.ndarray:
    """(N, 5) grams for `table`'s images with a LoRA checkpoint: components averaged over `views`, then rebuilt."""
    head, live, meta = load_checkpoint(json_path, weights, device, precision)
    aux = AuxSpec.from_dict(meta["aux"])
    per_view = [inference.predict_loader(head, live_loader(LiveDataset(table, range(len(table)), data_dir, live.s,
                                                                       train=False, seed=0, aux=aux, view=v,
                                                                       split=split), batch_size, workers), live)
                for v in views]
    return inference.mean_over_views(per_view).grams


def predict_member(rm, table: pd.DataFrame, data_dir: Path, device: str, progress: bool,
                   precision: str | None = None) -> np.ndarray:
    """(N, 5) grams of a LoRA ensemble member (`members.ResolvedMember`) for the test images of `table`, in order:
    every fold model on the TTA views (clean and flips), components averaged over views and folds."""
    comps = [predict_images(path, data_dir, table, split="test", views=range(len(TTA_VIEWS)),
                            weights=rm.extract["weights"], device=device, precision=precision)[:, :3]
             for path in tqdm(rm.checkpoints, desc=f"LoRA member {rm.member.name}", unit="fold", disable=not progress)]
    return components_to_targets(np.mean(comps, axis=0))
