"""Figures of a training run, written into RUN_DIR/plots/ (matplotlib, Agg backend, each PNG written atomically).

- `pred_vs_true.png`: out-of-fold predictions against the truth, one panel per target, with R^2;
- `fold_scores.png`: competition_r2 of every head on every fold, and pooled out-of-fold;
- `learning_curves.png`: training loss and validation competition_r2 per epoch, per head and fold;
- `density_maps.png` (when a head draws maps, e.g. `density`): a few validation photos of fold 0 with the predicted density of
  each component overlaid (fold-0 model, clean view 0 of the token store), so one sees where the head puts mass.

A `--full` run (no validation) gets the training-loss curves only.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from biomass_cache.common.data import read_long_csv
from biomass_cache.common.photo import load_image
from biomass_cache.common.errors import DataError  # noqa: E402
from biomass_cache.common.folds import read_folds  # noqa: E402
from biomass_cache.common.io import atomic_path  # noqa: E402
from biomass_cache.common.metrics import per_target_r2  # noqa: E402
from biomass_cache.common.targets import COMPONENTS, TARGETS  # noqa: E402
from biomass_cache.heads import has_maps
from biomass_cache.store.layout import open_store
from biomass_cache.train import inference, runs  # noqa: E402

N_MAP_IMAGES = 4
COMPONENT_CMAPS = ("Blues", "YlOrBr", "Greens")  # clover, dead, green


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing (plots need the run folder written by `biomass train`)") from e
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from e


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: missing (plots need the run folder written by `biomass train`)")
    df = pd.read_csv(path, dtype={"image_id": str})
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise DataError(f"{path}: lacks columns {absent} (has {list(df.columns)})")
    return df


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _colours(names) -> dict[str, str]:
    """One colour per head, the same in every figure (by sorted name)."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {n: cycle[k % len(cycle)] for k, n in enumerate(sorted(set(names)))}


def _short(target: str) -> str:
    return target.removesuffix("_g").replace("Dry_", "")


def plot_pred_vs_true(oof: pd.DataFrame, truth: pd.DataFrame, head: str, path: Path) -> Path:
    """One scatter per target (grams), the identity line and the R^2 of the images with all targets known."""
    merged = truth[["image_id", *TARGETS]].merge(oof[["image_id", *TARGETS]], on="image_id", suffixes=("", "_pred"))
    if len(merged) != len(truth):
        raise DataError(f"{path.parent.parent / 'oof.csv'}: predictions for {len(merged)} of the {len(truth)} images "
                        "of train.csv (another data folder?)")
    y, p = merged[list(TARGETS)].to_numpy(float), merged[[f"{t}_pred" for t in TARGETS]].to_numpy(float)
    ok = np.isfinite(y).all(axis=1) & np.isfinite(p).all(axis=1)
    r2 = per_target_r2(y[ok], p[ok])
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(4 * len(TARGETS), 4.2))
    for j, (ax, t) in enumerate(zip(axes, TARGETS)):
        top = 1.05 * max(np.nanmax(y[:, j]), np.nanmax(p[:, j]), 1e-6)
        ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--", zorder=1)
        ax.scatter(y[ok, j], p[ok, j], s=14, alpha=0.7, color="tab:green", edgecolor="none", zorder=2)
        ax.set(xlim=(0, top), ylim=(0, top), xlabel="true (g)", ylabel="predicted (g)" if j == 0 else None,
               title=f"{_short(t)}   R$^2$ = {r2[t]:.3f}")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    fig.suptitle(f"out-of-fold predictions, head '{head}' ({int(ok.sum())} images)", y=1.02)
    return _save(fig, path)


SCORE_FLOOR = -1.0  # fold_scores.png: lower scores are drawn down to here, hatched, labelled with their value


def clip_scores(values, floor: float = SCORE_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """(bar heights, clipped mask): one diverged head (R^2 -140) must not squash every other bar to a line."""
    values = np.asarray(values, dtype=float)
    return np.maximum(values, floor), values < floor


def plot_fold_scores(metrics: dict, path: Path) -> Path:
    """Grouped bars: competition_r2 per fold for every head (in ranking order), then the pooled OOF score.
    Scores below SCORE_FLOOR are clipped to it, hatched and labelled with their true value."""
    names = metrics.get("ranking") or list(metrics["heads"])
    folds = list(metrics["heads"][names[0]]["folds"])
    labels = folds + ["pooled OOF"]
    width = 0.8 / len(names)
    colours = _colours(names)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(labels) * max(1, len(names) / 2), 4))
    any_clipped = False
    for k, name in enumerate(names):
        h = metrics["heads"][name]
        vals = [h["folds"][f]["competition_r2"] for f in folds] + [h["competition_r2"]]
        shown, clipped = clip_scores(vals)
        x = np.arange(len(labels)) + (k - (len(names) - 1) / 2) * width
        bars = ax.bar(x, shown, width, label=name, color=colours[name])
        for bar, cut in zip(bars, clipped):
            if cut:
                bar.set_hatch("///")
                bar.set_edgecolor("black")
        ax.bar_label(bars, [f"{v:.2f}" + (" (clipped)" if cut else "") for v, cut in zip(vals, clipped)],
                     fontsize=7, padding=2)
        any_clipped = any_clipped or bool(clipped.any())
    if any_clipped:
        ax.set_ylim(bottom=SCORE_FLOOR - 0.15)
        ax.text(0.01, 0.02, f"hatched: below {SCORE_FLOOR:g}, clipped", transform=ax.transAxes, fontsize=7)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.axvline(len(folds) - 0.5, color="0.7", lw=0.8, ls=":")
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.set(ylabel="competition_r2", title="score per fold (0 = predicting the mean)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def loss_title(uw_heads: set[str] | None, heads: list[str]) -> str:
    """What the training-loss curve sums: uncertainty-weighted only for the heads trained with `uw`."""
    if uw_heads is None:
        return "training loss"
    weighted = [h for h in heads if h in uw_heads]
    if not weighted:
        return "training loss (sum of the task losses)"
    if len(weighted) == len(heads):
        return "training loss (UW-weighted sum)"
    return f"training loss (UW-weighted: {', '.join(weighted)}; plain sum: the others)"


def plot_learning_curves(history: pd.DataFrame, path: Path, uw_heads: set[str] | None = None) -> Path:
    """Training loss (and validation competition_r2 when the run validated) against epoch; thin lines per fold,
    a thick line for the mean over folds, one colour per head. `uw_heads`: the heads trained with uncertainty
    weighting (None: not known)."""
    has_val = "val_competition_r2" in history and history["val_competition_r2"].notna().any()
    title = loss_title(uw_heads, list(dict.fromkeys(history["head"])))
    panels = [("train_loss", title)] + (
        [("val_competition_r2", "validation competition_r2 (EMA, view 0)")] if has_val else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), squeeze=False)
    colours = _colours(history["head"])
    for ax, (col, title) in zip(axes[0], panels):
        for head, rows in history.dropna(subset=[col]).groupby("head", sort=False):  # validated epochs (eval_every)
            for _, fold in rows.groupby("fold"):
                ax.plot(fold["epoch"], fold[col], color=colours[head], lw=0.8, alpha=0.35)
            mean = rows.groupby("epoch")[col].mean()
            ax.plot(mean.index, mean.to_numpy(), color=colours[head], lw=2.2, label=f"{head} (mean of folds)")
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _density_member(metrics: dict, run_dir: Path) -> str | None:
    """The best-ranked member whose fold-0 checkpoint is a head that draws density maps."""
    for name in metrics.get("ranking") or list(metrics.get("heads", {})):
        ckpt = run_dir / "fold0" / f"{name}.json"
        if ckpt.is_file() and has_maps(_read_json(ckpt).get("head", {})):
            return name
    return None


def _folds(run_dir: Path, table: pd.DataFrame) -> np.ndarray:
    if not (run_dir / "folds.csv").is_file():
        raise DataError(f"{run_dir / 'folds.csv'}: missing (plots need the run folder written by `biomass train`)")
    return read_folds(run_dir / "folds.csv", table)


def plot_density_maps(run_dir: Path, data_dir: Path, table: pd.DataFrame, member: str, store, path: Path,
                      picks: Sequence[int] | None = None) -> Path:
    """Photos with the per-component density maps: `picks` (rows of `table`), each by the model of its own fold, or
    by default fold 0's validation images from lowest to highest total."""
    folds = _folds(run_dir, table)
    if picks is None:
        val = np.flatnonzero(folds == 0)
        total = table["Dry_Total_g"].to_numpy(float)[val]
        val = val[np.isfinite(total)][np.argsort(total[np.isfinite(total)])]
        picks = val[np.unique(np.linspace(0, len(val) - 1, min(N_MAP_IMAGES, len(val))).round().astype(int))]
    position = {iid: k for k, iid in enumerate(store.image_ids)}
    absent = [iid for iid in table["image_id"].iloc[list(picks)] if iid not in position]
    if absent:
        raise DataError(f"image {absent[0]} of {data_dir / 'train.csv'} is not in the token store {store.path}")
    maps_of, grams_of = {}, {}
    for k in sorted({int(folds[r]) for r in picks}):  # each image by the model that never saw it
        head, meta = runs.load_head(run_dir / f"fold{k}" / f"{member}.json")
        mine = [r for r in picks if folds[r] == k]
        pred = inference.predict_store(head, meta, store, [position[table["image_id"].iloc[r]] for r in mine],
                                       views=0, maps=True)
        maps_of.update(zip(mine, pred.maps))
        grams_of.update(zip(mine, pred.grams))
    pred = SimpleNamespace(maps=[maps_of[r] for r in picks], grams=[grams_of[r] for r in picks])
    fig, axes = plt.subplots(len(picks), 4, figsize=(17, 2.6 * len(picks) + 0.6), squeeze=False)
    for row, r, maps, grams in zip(axes, picks, pred.maps, pred.grams):  # maps (3, rows, cols) g/m^2
        iid = table["image_id"].iloc[r]
        image = load_image(data_dir / table["image_path"].iloc[r])
        extent = (0, image.width, image.height, 0)
        row[0].imshow(image)
        truth = table.loc[table.index[r], list(TARGETS)].to_numpy(float)
        row[0].set_title(f"{iid}: total {grams[4]:.1f} g predicted, {truth[4]:.1f} g true", fontsize=9)
        for ax, j, cmap in zip(row[1:], range(3), COMPONENT_CMAPS):
            ax.imshow(image, alpha=0.45)
            shown = ax.imshow(maps[j], cmap=cmap, alpha=0.65, extent=extent, interpolation="nearest",
                              vmin=0, vmax=max(float(maps[j].max()), 1e-6))
            fig.colorbar(shown, ax=ax, fraction=0.025, pad=0.01, label="g/m$^2$")
            ax.set_title(f"{_short(COMPONENTS[j])}: {grams[j]:.1f} g predicted, {truth[j]:.1f} g true", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.suptitle(f"predicted density maps, head '{member}' (each photo by its fold's model, which never saw it; "
                 "view 0)")
    fig.tight_layout()
    return _save(fig, path)


def plot_run(run_dir: str | Path, data_dir: str | Path, store=None) -> list[Path]:
    """Write the run's figures to RUN_DIR/plots/ and return their paths.

    `store` (a TokenStore) is read for the density maps; None opens the cache recorded in config.json (a LoRA
    run has none: its maps would need the live backbone, so they are left out).
    A missing or malformed input file is a DataError naming it.
    """
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    out = run_dir / "plots"
    metrics = _read_json(run_dir / "metrics.json")
    history = _read_csv(run_dir / "history.csv", ["fold", "epoch", "head", "train_loss"])
    config = run_dir / "config.json"
    uw_heads = ({n for n, m in _read_json(config).get("members", {}).items() if m.get("uw")}
                if config.is_file() else None)
    written = [plot_learning_curves(history, out / "learning_curves.png", uw_heads)]
    if metrics.get("full"):
        return written
    table = read_long_csv(data_dir / "train.csv", check_images=False)
    oof = _read_csv(run_dir / "oof.csv", ["image_id", *TARGETS])
    written.append(plot_pred_vs_true(oof, table, metrics.get("best", "?"), out / "pred_vs_true.png"))
    written.append(plot_fold_scores(metrics, out / "fold_scores.png"))
    member = _density_member(metrics, run_dir)
    if member is not None and store is None:
        cache = _read_json(run_dir / "config.json").get("cache")  # None for a LoRA run: no cached tokens to map
        if cache is not None:
            store = open_store(cache["path"])
    if member is not None and store is not None:
        written.append(plot_density_maps(run_dir, data_dir, table, member, store, out / "density_maps.png"))
    return written
