"""The report of a training run (`RUN/report.html`): what was run, how sure its score is, against what, and where
it goes wrong.

The out-of-fold score of every head with a 95 % grouped-bootstrap interval, beside two cross-fitted baselines on
the same folds: the training folds' mean, and ridge on colour statistics (the photos decoded at a quarter of their
size); the best head's paired difference from each. Then per-fold, per-target and per-State tables, parity and
residual plots, learning curves, the photos it predicts best and worst (with their density maps when the head
draws them), and the split-conformal interval widths `biomass predict --interval` would give.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import pandas as pd

from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.common.folds import read_folds, visit_groups
from biomass_cache.common.metrics import competition_r2, per_target_r2
from biomass_cache.common.photo import load_image
from biomass_cache.common.targets import TARGETS
from biomass_cache.report import figures
from biomass_cache.report.html import png_uri, render
from biomass_cache.common.conformal import calibrate
from biomass_cache.report.stats import bootstrap_r2, paired_difference
from biomass_cache.store.fingerprint import root
from biomass_cache.store.layout import open_store
from biomass_cache.train import plots
from biomass_cache.train.baseline import colour_stats, ridge_inner_cv_oof

CONFORMAL_LEVEL = 0.9


@dataclass
class Run:
    """A finished run's files, the training table's rows it scored (targets all known) and their visits."""

    path: Path
    config: dict
    metrics: dict
    table: pd.DataFrame
    truth: np.ndarray
    folds: np.ndarray
    groups: np.ndarray
    oof: dict[str, np.ndarray]  # head -> (N, 5) grams
    data_dir: Path


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; a run report needs a finished `biomass train` run folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from e


def load_run(run_dir: Path, data_dir: Path | None = None) -> Run:
    """The run folder's config, metrics, folds and OOF predictions; the labels from `data_dir` (default: the data
    folder recorded in config.json). Anything missing or inconsistent is one DataError naming the file."""
    run_dir = Path(run_dir)
    config, metrics = _json(run_dir / "config.json"), _json(run_dir / "metrics.json")
    if metrics.get("full"):
        raise DataError(f"{run_dir}: a --full run has no out-of-fold predictions to report on")
    if not metrics.get("heads"):
        raise DataError(f"{run_dir / 'metrics.json'}: no head finished (every member was stopped)")
    data_dir = Path(data_dir or config.get("data") or "")
    if not (data_dir / "train.csv").is_file():
        raise DataError(f"{data_dir / 'train.csv'}: missing; pass --data with the folder the run trained on")
    table = read_long_csv(data_dir / "train.csv", check_images=False).reset_index(drop=True)
    folds = read_folds(run_dir / "folds.csv", table) if (run_dir / "folds.csv").is_file() else None
    if folds is None:
        raise DataError(f"{run_dir / 'folds.csv'}: missing; a run report needs a finished run folder")
    oof = {}
    for head in metrics["heads"]:
        path = run_dir / f"oof_{head}.csv"
        if not path.is_file():
            raise DataError(f"{path}: missing; the run did not finish (re-run its training)")
        frame = pd.read_csv(path, dtype={"image_id": str}).set_index("image_id")
        missing = sorted(set(table["image_id"]) - set(frame.index))
        if missing:
            raise DataError(f"{path}: no prediction for {len(missing)} training image(s), e.g. {missing[:3]}")
        oof[head] = frame.loc[table["image_id"], list(TARGETS)].to_numpy(float)
    known = np.isfinite(table[list(TARGETS)].to_numpy(float)).all(axis=1)
    table = table[known].reset_index(drop=True)
    return Run(run_dir, config, metrics, table, table[list(TARGETS)].to_numpy(float), folds[known],
               visit_groups(table).to_numpy(), {h: p[known] for h, p in oof.items()}, data_dir)


def mean_oof(run: Run) -> np.ndarray:
    """The cross-fitted mean predictor: each fold predicted by the mean of the other folds."""
    out = np.zeros_like(run.truth)
    for k in np.unique(run.folds):
        out[run.folds == k] = run.truth[run.folds != k].mean(axis=0)
    return out


def colour_oof(run: Run) -> np.ndarray:
    """Ridge on colour statistics, on the run's folds (train/baseline.py), the photos decoded at about 512 x 256
    (a JPEG's DCT scaling: 25 times faster than at 2000 x 1000, statistics within 1 of 255 of the full photo's)."""
    stats = [colour_stats(load_image(run.data_dir / rel, at_least=(512, 256))) for rel in run.table["image_path"]]
    return ridge_inner_cv_oof(np.stack(stats), run.truth, run.folds)[0]


def _per_state(run: Run, pred: np.ndarray) -> list[dict]:
    rows = []
    for state, idx in run.table.groupby("State").indices.items():
        t, p = run.truth[idx], pred[idx]
        try:
            r2 = competition_r2(t, p)
        except ValueError:
            r2 = None
        rows.append({"state": state, "images": len(idx), "visits": len(np.unique(run.groups[idx])), "r2": r2,
                     "total_mae": float(np.abs(t[:, 4] - p[:, 4]).mean()), "total_mean": float(t[:, 4].mean())})
    return rows


def _what_was_run(run: Run) -> dict:
    config = run.config
    cache = config.get("cache") or {}
    fp = cache.get("fingerprint") or config.get("fingerprint") or {}
    backbone = (root(fp) if "parent" in fp else fp).get("backbone", {}) if fp else {}
    train = config.get("train", {})
    heads = ",".join(run.metrics["heads"])
    command = config.get("command") or (  # a run trained from Python: its main settings as a command
        f"biomass train --cache {cache.get('path', '?')} --data {run.data_dir} --head {heads} --folds "
        f"{train.get('folds', '?')} --epochs {train.get('epochs', '?')} --seed {train.get('seed', '?')} "
        f"--out {run.path}")
    return {"command": command, "backbone": backbone.get("name", "?"),
            "random_weights": backbone.get("weights_sha256") == "random", "fingerprint": json.dumps(fp, indent=1),
            "settings": json.dumps({"train": train, "members": config.get("members", {})}, indent=1),
            "reduced": "reduce" in fp, "torch": config.get("torch", "?")}


def run_context(run: Run, resamples: int = 2000, colour: bool = True) -> dict[str, Any]:
    best = run.metrics.get("best") or next(iter(run.oof))
    heads = [{"name": h, "score": bootstrap_r2(run.truth, p, run.groups, resamples=resamples), "best": h == best}
             for h, p in sorted(run.oof.items(), key=lambda kv: -competition_r2(run.truth, kv[1]))]
    baselines = {"the training folds' mean": mean_oof(run)}
    if colour:
        baselines["ridge on colour statistics"] = colour_oof(run)
    pred = run.oof[best]
    rows = [{"name": name, "score": bootstrap_r2(run.truth, p, run.groups, resamples=resamples),
             "versus": paired_difference(run.truth, pred, p, run.groups, resamples=resamples)}
            for name, p in baselines.items()]
    per_fold = []
    for k in np.unique(run.folds):
        idx = run.folds == k
        per_fold.append({"fold": int(k), "images": int(idx.sum()), "visits": len(np.unique(run.groups[idx])),
                         **{h: _safe_r2(run.truth[idx], p[idx]) for h, p in run.oof.items()}})
    r2 = per_target_r2(run.truth, pred)
    per_target = [{"target": t, "r2": r2[t], "rmse": float(np.sqrt(((run.truth[:, j] - pred[:, j]) ** 2).mean())),
                   "bias": float((pred[:, j] - run.truth[:, j]).mean()), "mean": float(run.truth[:, j].mean())}
                  for j, t in enumerate(TARGETS)]
    conformal = calibrate(run.truth, pred, CONFORMAL_LEVEL)
    low, high = conformal.bounds(pred)
    images = figures.best_and_worst(run.truth, pred)
    with TemporaryDirectory() as tmp:
        curves = png_uri(plots.plot_learning_curves(pd.read_csv(run.path / "history.csv"), Path(tmp) / "c.png"))
        maps = _density_maps(run, images, Path(tmp) / "m.png")
    return {"kind": "run", "title": f"Run {run.path.name}", "run": _what_was_run(run), "best": best, "heads": heads,
            "baselines": rows, "per_fold": per_fold, "head_names": list(run.oof), "per_target": per_target,
            "per_state": _per_state(run, pred), "images": len(run.truth), "visits": len(np.unique(run.groups)),
            "parity": figures.parity_and_residuals(run.truth, pred, best), "curves": curves,
            "gallery": figures.gallery(run.table, run.data_dir, run.truth, pred, images), "maps": maps,
            "conformal": {"level": conformal.level, "n": conformal.n,
                          "rows": [{"target": t, "q": float(conformal.q[j]), "scale": float(conformal.scale[j]),
                                    "median_width": float(np.median(high[:, j] - low[:, j]))}
                                   for j, t in enumerate(TARGETS)]},
            "resamples": resamples}


def _safe_r2(t: np.ndarray, p: np.ndarray) -> float | None:
    try:
        return competition_r2(t, p)
    except ValueError:
        return None


def _density_maps(run: Run, images: dict[str, list[int]], path: Path) -> str | None:
    """The density maps of the best and worst images (each by its own fold's model), when a head draws them."""
    member = plots._density_member(run.metrics, run.path)
    cache = run.config.get("cache")
    if member is None or cache is None or not Path(cache["path"]).exists():
        return None
    picks = images["best"][:2] + images["worst"][:2]
    return png_uri(plots.plot_density_maps(run.path, run.data_dir, run.table, member, open_store(cache["path"]),
                                           path, picks=picks))


def write_run_report(run_dir: Path, out: Path | None = None, data_dir: Path | None = None,
                     resamples: int = 2000, colour: bool = True) -> Path:
    run = load_run(run_dir, data_dir)
    return render("run.html.j2", out or Path(run_dir) / "report.html", **run_context(run, resamples, colour))
