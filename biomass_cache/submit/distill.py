"""Distillation: a small student backbone (LoRA adapters on the live path, `biomass lora`'s loop) and a head trained
on the training photos, and optionally unlabelled photos, to match a teacher's predictions, with the labels where
they exist.

The teacher is an ensemble (`--teacher RUN` is one of one member) and predicts as `biomass submit` does: on a
labelling folder in the work folder (`distill-photos/`: links to the training photos and the unlabelled ones, and a
test.csv listing them), its test caches built there once and reused. Fold k's targets come from the members' fold-k
models alone when every member is a run folder with the student's folds ("per-fold": no validation image of fold k
reaches fold k's student through its targets); otherwise from the whole ensemble ("ensemble", which leaks: recorded
and warned), as for pseudo-labels (pseudo.py). A `--full` student trains on the mean of the folds' targets.

A labelled image's target is (1 - alpha) x its label + alpha x the teacher's prediction: for the squared losses of
the totals and the five targets exactly the sum of the two losses weighted 1 - alpha and alpha (plus a constant);
the composition's loss is recomputed from the blended masses. An unlabelled photo's target is the teacher's
prediction, at loss weight `weight`. Validation and OOF predictions are over the labelled images only, against
their labels, so the student's OOF score stands beside the teacher's.

With `features` > 0 the student also matches the teacher's cached tokens of the same views through a learned
projection (lora/features.py), that loss weighted `features`: the first member's training store, or `teacher_tokens`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from biomass_cache.common.data import read_training_table
from biomass_cache.common.errors import DataError
from biomass_cache.common.folds import read_folds
from biomass_cache.common.io import write_bytes
from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.photo import list_photos
from biomass_cache.common.targets import TARGETS
from biomass_cache.lora.features import teacher_tokens as match_teacher
from biomass_cache.lora.settings import LoraSettings
from biomass_cache.lora.train import Part, run_lora
from biomass_cache.submit.ensemble import run_ensemble
from biomass_cache.submit.members import ResolvedMember, resolve_member
from biomass_cache.submit.pseudo import NOTES, PseudoLabels, predict_labels
from biomass_cache.submit.spec import EnsembleSpec
from biomass_cache.train import runs
from biomass_cache.train.config import TrainConfig

DEFAULT_ALPHA = 0.5
DEFAULT_WEIGHT = 0.5
UNLABELLED_PREFIX = "unlabelled_"  # unlabelled photos' ids: file stems, apart from the training images' ids


def labelling_folder(data: Path, table: pd.DataFrame, photo_dirs: list[Path], work: Path) -> pd.DataFrame:
    """`work` made a data folder the teacher predicts: links to the training photos (at their own relative paths)
    and to the unlabelled photos (`unlabelled/`), train.csv linked, and a test.csv listing them all. Returns the
    labelling table: the training rows (labels kept) then the unlabelled photos (no labels), paths relative to
    `work`."""
    unlabelled = [p for d in photo_dirs for p in list_photos(Path(d))]
    ids = [UNLABELLED_PREFIX + p.stem for p in unlabelled]
    clash = sorted({i for i in ids if ids.count(i) > 1})
    if clash:
        raise DataError(f"--photos: photo names {clash[:5]} occur in more than one folder; rename them")
    links = {Path(p): (data / p).resolve() for p in table["image_path"]}
    paths = [f"unlabelled/{i}{p.suffix}" for i, p in zip(ids, unlabelled)]  # an image's id is its file's stem
    links |= {Path(rel): p.resolve() for rel, p in zip(paths, unlabelled)}
    links[Path("train.csv")] = (data / "train.csv").resolve()
    work.mkdir(parents=True, exist_ok=True)
    for rel, target in links.items():
        link = work / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    rows = pd.concat([table, pd.DataFrame({"image_id": ids, "image_path": paths})], ignore_index=True)
    long = pd.DataFrame([(f"{i}__{t}", p, t) for i, p in zip(rows["image_id"], rows["image_path"]) for t in TARGETS],
                        columns=["sample_id", "image_path", "target_name"])
    write_bytes(work / "test.csv", long.to_csv(index=False).encode())
    return rows


def training_part(rows_table: pd.DataFrame, labels: PseudoLabels, folds: np.ndarray, n_train: int,
                  alpha: float, weight: float, folder: Path):
    """The student's training part of a fold: its labelled rows with targets blended towards the teacher's, and
    every unlabelled photo with the teacher's targets at loss weight `weight`."""
    if labels.image_ids != rows_table["image_id"].tolist():
        raise DataError("the teacher's predictions are not in the labelling table's order (test.csv changed?)")
    unlabelled = np.arange(n_train, len(rows_table))

    def part(rows: np.ndarray) -> Part:
        left_out = sorted(set(range(len(labels.by_fold))) - set(folds[rows].tolist()))
        if len(left_out) > 1:
            raise ValueError(f"training rows leave out folds {left_out}; distillation needs one or none (--full)")
        teacher = labels.by_fold[left_out[0]] if left_out else np.mean(labels.by_fold, axis=0)
        blended = rows_table.copy()
        truth = blended.loc[:n_train - 1, list(TARGETS)].to_numpy(float)
        mixed = np.where(np.isfinite(truth), (1 - alpha) * truth + alpha * teacher[:n_train], truth)
        blended.loc[:n_train - 1, list(TARGETS)] = mixed
        blended.loc[n_train:, list(TARGETS)] = teacher[n_train:]
        weights = np.concatenate([np.ones(len(rows)), np.full(len(unlabelled), weight)])
        return Part(blended, np.concatenate([rows, unlabelled]).astype(np.int64), folder, weights)

    return part


def check_student(s: LoraSettings) -> tuple[tuple[int, int], int]:
    """The student as `biomass lora` builds it, on the CPU: its settings' errors, early. Returns its token grid and
    the number of layers its head reads."""
    import torch

    from biomass_cache.backbone.vit import create_backbone
    from biomass_cache.lora.adapters import make_trainable
    from biomass_cache.lora.model import LiveTokens

    bb = create_backbone(s.backbone, s.weights, seed=s.backbone_seed, overrides=s.overrides)
    make_trainable(bb, s)
    live = LiveTokens(bb, s, torch.device("cpu"))
    return live.grid, len(live.layers)


def teacher_store(first: ResolvedMember, given: Path | None) -> Path:
    """The token store feature distillation matches: `given`, else the first member's training store."""
    if given is not None:
        return Path(given)
    config = first.run_dir / "config.json"
    path = json.loads(config.read_text()).get("cache", {}).get("path") if config.is_file() else None
    if first.kind != "cache" or not path or not Path(path).exists():
        raise DataError(f"--features: the teacher's first member {first.member.name} has no training token store "
                        f"on record here ({path or 'none'}); give one with --teacher-tokens STORE")
    return Path(path)


def distill(spec: EnsembleSpec, data: Path, out: Path, s: LoraSettings, cfg: TrainConfig,
            photo_dirs: list[Path] = (), alpha: float = DEFAULT_ALPHA, weight: float = DEFAULT_WEIGHT,
            work_dir: Path | None = None, device: str = "cpu", precision: str | None = None,
            overwrite: bool = False, progress: bool = True, features: float = 0.0,
            teacher_tokens: Path | None = None) -> dict:
    """Label the training (and unlabelled) photos with `spec`, then train the student with the first member's folds
    when it has them; returns the run's metrics, with the teacher's OOF score beside the student's."""
    if not 0 <= alpha <= 1 or not weight > 0 or not features >= 0:
        raise DataError(f"--alpha must be in [0, 1], --weight > 0 and --features >= 0, got {alpha}, {weight} and "
                        f"{features}")
    if features > 0 and s.prefix_cache:
        raise DataError("--features trains on the teacher store's views, and a prefix cache holds the student's own "
                        "views: remove [lora] prefix_cache from the config")
    grid, n_layers = check_student(s)  # a mistake in the student's settings is refused before the teacher labels
    data, out = Path(data), Path(out)
    work = Path(work_dir) if work_dir else out.parent
    table = read_training_table(data / "train.csv")
    first = resolve_member(spec.members[0], spec.weights_files)
    teacher = None if features == 0 else match_teacher(  # so is a teacher store that does not fit the student
        teacher_store(first, teacher_tokens), list(table["image_id"]), s.size, grid, n_layers)
    folds_csv = first.run_dir / "folds.csv" if (first.run_dir / "folds.csv").is_file() else None
    if folds_csv is None and not cfg.full:
        raise DataError(f"{first.run_dir} has no folds.csv: the student cross-validates on the teacher's folds "
                        "(give a run folder as the first member), or train it with --full")
    folds = read_folds(folds_csv, table) if folds_csv else np.zeros(len(table), np.int64)
    folder = work / "distill-photos"
    rows_table = labelling_folder(data, table, list(photo_dirs), folder)
    labels = predict_labels(spec, table, folds, folder, work, device, precision, None, progress)
    oof = labels.oof if labels.mode == "ensemble" else run_ensemble(  # per fold: the whole teacher's, once
        spec, data_dir=folder, out_dir=work, device=device, progress=progress, precision=precision).oof
    teacher_r2 = None if oof is None else competition_r2(oof.labels, oof.grams)
    info = {"teacher": [m.name for m in spec.members], "aggregation": spec.aggregation, "alpha": alpha,
            "unlabelled_weight": weight, "n_train": len(table), "n_unlabelled": len(rows_table) - len(table),
            "labels": labels.mode, "note": NOTES[labels.mode], "teacher_oof_competition_r2": teacher_r2,
            "labelling_folder": str(folder)}
    if labels.mode == "ensemble" and not cfg.full:
        print("WARNING: the student's OOF score is optimistic: its targets come from a teacher whose models saw "
              "every fold's validation images (recorded in config.json `distill`)", file=sys.stderr)
    part = training_part(rows_table, labels, folds, len(table), alpha, weight, folder)
    metrics = run_lora(data, out, cfg, s, folds_csv=folds_csv, progress=progress, overwrite=overwrite,
                       training_part=part, record={"distill": info}, teacher=teacher, feature_weight=features)
    metrics["distill"] = info
    if not cfg.full:
        runs.write_metrics(out, metrics)
        line = f"student {s.backbone}: pooled OOF competition_r2 {metrics['competition_r2']:.4f}"
        tqdm.write(line + (f"; teacher {teacher_r2:.4f} on the same images" if teacher_r2 is not None else "")
                   + f" -> {out}")
    return metrics
