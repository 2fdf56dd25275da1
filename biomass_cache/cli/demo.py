"""`biomass demo`: the whole pipeline end to end on the CPU in a few minutes, on synthetic data.

synthetic Kaggle folder -> train token cache (ViT-S, RANDOM weights), reduced in the extraction pass (PCA channels)
-> 5-fold density + mlp heads -> test cache with TTA (reduced alike) -> ensemble -> validated submission.csv -> score
against the hidden test labels -> the run's and the submission's HTML reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer

from biomass_cache.cli.score import print_scores
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import TARGETS
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.extract.pipeline import extract
from biomass_cache.report.run import write_run_report
from biomass_cache.report.submission import write_submission_report
from biomass_cache.store.layout import open_store
from biomass_cache.submit.ensemble import submit
from biomass_cache.submit.spec import EnsembleSpec, Member
from biomass_cache.submit.submission import long_to_wide, read_long_file, score
from biomass_cache.synth.generate import generate
from biomass_cache.train.config import resolve
from biomass_cache.train.crossval import run_training

RANDOM_NOTE = """\
NOTE: the backbone here is RANDOMLY INITIALISED (no weights are downloaded), so the scores only show that the
pipeline works. With real DINOv3 weights and the real competition data the same steps are:
  biomass extract --data DATA_DIR --split train --backbone vit_small_patch16_dinov3 --weights PATH.pth \\
                  --size 960x480 --reduce --out cache/train.zarr   (PCA 128 channels, 30 x 60 -> 15 x 30)
  biomass train   --cache cache/train.zarr --data DATA_DIR --head density --folds 5 --out runs/density
  biomass submit  --data DATA_DIR --members runs/density --weights vit_small_patch16_dinov3=PATH.pth \\
                  --out submission.csv                           (the same as: python submit.py ...)
The test cache is extracted by `submit` with the settings recorded in the run folder and that weights file
(sha256 checked against the training cache), and reduced in the same pass with the run's projection. A run that
trained several heads (like this demo's) is submitted one head at a time or together: --members
RUN:density,RUN:mlp; weights per member: an ensemble file (--ensemble FILE, see configs/ensemble_example.toml)."""


@dataclass(frozen=True)
class DemoSize:
    """Everything that sets the demo's run time."""

    n_train: int
    n_test: int
    photo: tuple[int, int]  # synthetic photo W x H
    size: tuple[int, int]  # backbone input W x H (multiples of 16)
    layers: tuple[int, ...]  # ViT-S blocks whose tokens are cached
    views: int
    epochs: int
    folds: int = 5
    pcgrad: bool = True  # primary-anchored PCGrad: most of a training step's time on the CPU
    reduce: tuple[int, int | str] | None = (128, "auto")  # (dim, pool) of the reduction in the extraction pass


FULL = DemoSize(n_train=96, n_test=24, photo=(448, 224), size=(224, 112), layers=(8, 11), views=2, epochs=6)
QUICK = DemoSize(n_train=60, n_test=12, photo=(224, 112), size=(224, 112), layers=(11,), views=2, epochs=3)
BACKBONE = "vit_small_patch16_dinov3"
HEADS = ("density", "mlp")


def run_demo(out: Path, quick: bool = False, progress: bool = True, sizes: DemoSize | None = None) -> dict:
    """Run every stage into `out`; returns the scores and where every artefact is (`sizes` for tests)."""
    sz = sizes or (QUICK if quick else FULL)
    out = Path(out)
    t0 = time.time()
    timings = {}

    def step(name: str, t: float) -> None:
        timings[name] = round(time.time() - t, 1)
        typer.secho(f"[{time.time() - t0:6.1f} s] {name} done ({timings[name]} s)", fg="green")

    data = out / "data"
    t = time.time()
    if not (data / "test_labels.csv").is_file():
        generate(data, n_train=sz.n_train, n_test=sz.n_test, seed=0, size=sz.photo, progress=progress)
    step("synthetic data", t)

    t = time.time()
    cache = out / "cache" / "train.zarr"
    reduce = {} if sz.reduce is None else dict(reduce=True, dim=sz.reduce[0], pool=sz.reduce[1])
    extract(ExtractConfig(data_dir=data, split="train", out=cache, backbone=BACKBONE, weights="random",
                          size=sz.size, layers=list(sz.layers), views=sz.views, seed=0, device="cpu",
                          **reduce), progress=progress)
    store = open_store(cache)
    step("train cache" + (f", reduced in the pass (PCA {store.channels} channels, grid {list(store.grid)})"
                          if sz.reduce else ""), t)

    t = time.time()
    run = out / "runs" / "heads"
    settings = dict(folds=sz.folds, epochs=sz.epochs, device="cpu", workers=0, pcgrad=sz.pcgrad)
    cfg, members = resolve({}, [], settings, list(HEADS))
    run_training(cache, data, run, cfg, members, overwrite=True,  # a re-run demo replaces its run
                 extract=dict(backbone=BACKBONE, weights="random", size=list(sz.size), layers=list(sz.layers),
                              views=sz.views, seed=0))
    step(f"{sz.folds}-fold training", t)

    t = time.time()
    spec = EnsembleSpec(tuple(Member(run, head=h) for h in HEADS))
    submission = out / "submission.csv"
    result, _ = submit(spec, data, submission, work_dir=out, device="cpu", progress=progress)
    step("test cache + ensemble + submission", t)

    t = time.time()
    reports = [write_run_report(run, data_dir=data), write_submission_report(submission, result)]
    step("reports", t)

    scores = score(submission, data / "test_labels.csv")
    print_scores(scores, "demo submission vs the hidden test labels")
    baseline = mean_baseline(data)
    wall = time.time() - t0
    summary = {
        "wall_s": round(wall, 1), "timings_s": timings, "quick": quick, "scores": scores,
        "mean_predictor_competition_r2": baseline,
        "artefacts": {"data": str(data), "train_cache": str(cache),
                      "run": str(run),
                      "test_caches": [str(p) for p in dict.fromkeys(result.caches)],
                      "member_predictions": [str(p) for p in result.member_files],
                      "submission": str(submission), "labels": str(data / "test_labels.csv"),
                      "run_report": str(reports[0]), "submission_report": str(reports[1])},
    }
    typer.echo("\nwhere everything is:")
    for name, path in summary["artefacts"].items():
        typer.echo(f"  {name:<20} {path}")
    typer.echo(f"\ndemo finished in {wall:.0f} s; competition_r2 {scores['competition_r2']:.3f} (predicting the "
               f"training mean of every target scores {baseline:.3f}: the metric pools all targets)\n")
    typer.secho(RANDOM_NOTE, fg="yellow")
    return summary


def mean_baseline(data: Path) -> float:
    """competition_r2 of predicting every test image as the training mean: the floor a model must clear."""
    labels = data / "test_labels.csv"
    truth = long_to_wide(read_long_file(labels), str(labels))[list(TARGETS)].to_numpy(float)
    mean = read_long_csv(data / "train.csv", check_images=False)[list(TARGETS)].mean().to_numpy(float)
    return float(competition_r2(truth, np.broadcast_to(mean, truth.shape)))


def demo_command(
    out: Path = typer.Option(Path("biomass_demo"), "--out", help="Folder for every artefact of the demo."),
    quick: bool = typer.Option(False, "--quick", help="Fewer, smaller images and epochs (about a minute)."),
) -> None:
    """The whole pipeline on synthetic data on the CPU: data -> cache -> heads -> ensemble -> submission -> score."""
    typer.secho("biomass demo: the backbone is RANDOMLY INITIALISED (see the note at the end)", fg="yellow")
    run_demo(out, quick=quick)
