"""The quality bar: OOF competition_r2 of the readout heads against simple baselines, side by side, same folds.

On a synthetic data folder and one ViT-S token cache (random weights, 3 layers, 4 views): the mean predictor,
ridge on colour statistics of the photos, ridge on mean-pooled view-0 tokens, the density / mlp / vitdet heads
(stage two, `run_training`), density without mixup, and density on an int8 copy of the cache. Every contender is
scored out-of-fold on the same grouped 5 folds, on the clean view 0 (tta = 0), so baselines and heads see the same.

Presets: `full` (the table above, 224 x 112 views), `reduce` (448 x 224 views, a 14 x 28 patch grid: the density
and mlp heads on the full tokens beside the same heads on reduced copies of the cache, `biomass reduce`: per-layer
PCA channels and a pooled grid), `reduce_large` (896 x 448 views, a 28 x 56 grid: the density head on the full
tokens beside the reduction `--pool auto` picks there, 2 x 2 to 14 x 28, as at 960 x 480), `quick` (a smoke run),
`transfer` (whether defaults hold across data: one cell per (training size, generator style, seed), each with its
own data, cache and grouped folds; in every cell the colour-statistics ridge (train/baseline.py) and the selected
contenders, `--contenders`, on that cell's folds; `--quick` runs a reduced version), `techniques` (the full
preset's training photos, cache and folds, with 40 test photos for the pseudo-labels: the density head beside the
interval-classification auxiliary, the ridge head, their ensembles, a cache of 2 tiles per view and pseudo-labels;
`--quick` runs a reduced version). Wherever the density and ridge heads are both trained, two ensemble rows follow:
the equal-weight mean of their OOF grams and the non-negative stack's cross-fitted score (ENSEMBLES).

    python benchmarks/bench_heads.py [--preset full|reduce|reduce_large|quick|transfer|techniques] [--out FILE]
        [--work DIR]
    python benchmarks/bench_heads.py --preset transfer [--sizes 80 357] [--styles blades canopy] [--seeds 0]
        [--epochs 120] [--contenders density mlp ridge ...] [--quick]

The data and caches are kept in --work (a temporary folder by default) and reused when present.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from biomass_cache.train import runs
from biomass_cache.submit.aggregate import cross_fitted, fit_stack, stack_predict, weighted_mean
from biomass_cache.train.crossval import run_training
from biomass_cache.common.data import read_long_csv
from biomass_cache.extract.pipeline import extract
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.common.folds import grouped_folds, write_folds
from biomass_cache.common.io import write_json
from biomass_cache.common.metrics import competition_r2, per_target_r2
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.store.layout import StoreSpec, create_store, open_store
from biomass_cache.synth.generate import STYLES, generate
from biomass_cache.common.targets import TARGETS
from biomass_cache.train.baseline import STAT_NAMES, colour_stats_of, ridge_inner_cv_oof
from biomass_cache.train.config import TrainConfig

RESULTS = Path(__file__).parent / "results"
BACKBONE, LAYERS, VIEWS, FOLDS = "vit_small_patch16_dinov3", [5, 8, 11], 4, 5
ALPHAS = np.logspace(-3, 5, 17)
HEADS = {  # name -> (TrainConfig overrides); small vitdet dims keep it CPU-sized
    "density": dict(head="density"),
    "density (hidden 256)": dict(head="density", head_kwargs=dict(hidden=256)),
    "density (mixup)": dict(head="density", mixup=True),
    "density (reference recipe: mixup, UW, PCGrad, aux)": dict(head="density", mixup=True, uw=True, pcgrad=True,
                                                                aux=True),
    "mlp": dict(head="mlp"),
    "vitdet (dim 64, hidden 512)": dict(head="vitdet", head_kwargs=dict(dim=64, hidden=512)),
}
REDUCED = {  # (dim, pool) -> the heads trained on that reduced cache
    (128, 2): {"density": HEADS["density"], "mlp": HEADS["mlp"]},
    (128, 1): {"density": HEADS["density"]},
    (64, 2): {"density": HEADS["density"]},
}
PLAIN = {"density": HEADS["density"], "mlp": HEADS["mlp"]}
PRESETS = {
    "full": dict(n_train=160, photo=(448, 224), size=(224, 112), epochs=120, heads=HEADS, int8=True, reduced={}),
    "reduce": dict(n_train=160, photo=(896, 448), size=(448, 224), epochs=120, heads=PLAIN, int8=False,
                   reduced=REDUCED),
    "reduce_large": dict(n_train=160, photo=(896, 448), size=(896, 448), epochs=120, heads={"density": HEADS["density"]},
                         int8=False, reduced={(128, 2): {"density": HEADS["density"]}}),
    "quick": dict(n_train=80, photo=(448, 224), size=(448, 224), epochs=6, heads=HEADS, int8=True, reduced=REDUCED),
}
GOALS = {"density - ridge(pooled tokens)": 0.15, "density - ridge(colour stats)": 0.05,
         "density(float16) - density(int8)": -0.005}
REDUCED_GOAL = -0.01  # the default reduction (PCA 128, pool auto) against the full tokens
COLOUR_RIDGE = f"ridge on colour statistics ({len(STAT_NAMES)} features, alpha by inner CV)"
CONTENDERS = {  # transfer preset: name -> TrainConfig overrides; a head that is not registered is skipped
    "density": HEADS["density"],
    "density-h256": HEADS["density (hidden 256)"],
    "density-mixup": HEADS["density (mixup)"],
    "density-lr1e-3": dict(head="density", lr=1e-3),
    "mlp": HEADS["mlp"],
    "ridge": dict(head="ridge"),
    "density-interval": dict(head="density", interval_bins=8, interval_weight=0.3),
}
TRAIN_DEFAULTS = "TrainConfig defaults otherwise (batch 16, lr 4e-3, EMA; no mixup, UW, aux)"  # as recorded
ENSEMBLES = {"density+ridge": ("density", "ridge")}  # name -> members: rows wherever every member was trained
TRANSFER = dict(sizes=[80, 357], styles=["blades", "canopy"], seeds=[0], photo=(448, 224), size=(224, 112),
                epochs=120, contenders=["density", "density-h256", "density-mixup", "density-lr1e-3", "mlp", "ridge",
                                        "density-interval"])
TECHNIQUES = dict(n_train=160, n_test=40, photo=(448, 224), size=(224, 112), epochs=120, int8=False, tiles=2,
                  pseudo_weight=0.5, heads=["density", "density-interval", "ridge"], seeds=[1, 2])
TECHNIQUES_QUICK = dict(n_train=40, n_test=6, epochs=3, seeds=[1])  # --quick: a smoke run
TRANSFER_QUICK = dict(sizes=[60, 80], epochs=4, contenders=["density", "mlp", "ridge"])  # --quick: a smoke run


def machine_info() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}


def pooled_tokens(store_path: Path, image_ids: list[str]) -> np.ndarray:
    """(N, L * C): view-0 patch tokens of every cached layer, mean over the patches."""
    store = open_store(store_path)
    pos = {iid: k for k, iid in enumerate(store.image_ids)}
    return np.stack([store.read(pos[i], 0).mean(axis=1).reshape(-1) for i in image_ids])


def ridge_oof(x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold grams from standardised features -> RidgeCV (alpha picked by LOO on the training folds)."""
    oof = np.zeros_like(y)
    for k in np.unique(folds):
        tr, va = folds != k, folds == k
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(x[tr], y[tr])
        oof[va] = np.clip(model.predict(x[va]), 0, None)  # masses are non-negative
    return oof


def mean_oof(y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    oof = np.zeros_like(y)
    for k in np.unique(folds):
        oof[folds == k] = y[folds != k].mean(axis=0)
    return oof


def int8_copy(src: Path, dst: Path) -> None:
    """The same tokens stored as int8 (per-token scales): isolates the effect of the storage dtype."""
    store = open_store(src)
    fingerprint = {**store.fingerprint, "storage_dtype": "int8"}
    spec = StoreSpec(image_ids=list(store.image_ids), n_views=store.n_views, layers=list(store.layers),
                     grid=tuple(store.grid), channels=store.channels, fingerprint=fingerprint, split=store.split,
                     dtype="int8")
    out = create_store(dst, spec)
    for i in range(len(store.image_ids)):
        out.write_image(i, np.stack([store.read(i, v) for v in range(store.n_views)]))


def prepare(work: Path, sz: dict, style: str = "blades", seed: int = 0) -> tuple[Path, Path, Path, float]:
    """Data folder (sz["n_test"] test photos, 1 by default), float16 cache and (if the preset wants it) its int8 copy
    in `work` (reused when complete); returns extraction seconds. The training photos do not depend on n_test."""
    data, f16, i8 = work / "data", work / "cache_f16.zarr", work / "cache_int8.zarr"
    if not (data / "train.csv").is_file():
        generate(data, n_train=sz["n_train"], n_test=sz.get("n_test", 1), seed=seed, size=sz["photo"], progress=False,
                 style=style)
    seconds = extract_cache(data, f16, sz["size"])
    if sz["int8"] and not i8.exists():
        int8_copy(f16, i8)
    return data, f16, i8, seconds


def extract_cache(data: Path, out: Path, size: tuple[int, int], tiles: int = 1) -> float:
    """The training photos' tokens at `size` (in `tiles` side-by-side pieces) into `out` (resumed); its seconds."""
    t = time.perf_counter()
    extract(ExtractConfig(data_dir=data, out=out, backbone=BACKBONE, weights="random", size=size, layers=LAYERS,
                          views=VIEWS, seed=0, device="cpu", num_workers=1, tiles=tiles), progress=True)
    return time.perf_counter() - t


def token_change(a: Path, b: Path, n: int = 8) -> float:
    """Mean |a - b| / mean |a| of the patch tokens of the first n images' view 0 in two caches of the same photos."""
    sa, sb = open_store(a), open_store(b)
    x = np.stack([sa.read(i, 0) for i in range(n)]).astype(np.float64)
    y = np.stack([sb.read(i, 0) for i in range(n)]).astype(np.float64)
    return float(np.abs(x - y).mean() / np.abs(x).mean())


def reduced_copy(src: Path, work: Path, dim: int, pool: int) -> tuple[Path, float]:
    """The cache reduced as `biomass reduce --dim --pool` does (reused when present); returns its seconds."""
    from biomass_cache.store.reduce import fit_reduction, reduce_store

    out = work / f"cache_pca{dim}_pool{pool}.zarr"
    t = time.perf_counter()
    if not out.exists():
        store = open_store(src)
        reduce_store(store, fit_reduction(store, dim, pool), out)
    return out, time.perf_counter() - t


def train_heads(cache: Path, data: Path, run: Path, folds_csv: Path, members: dict[str, dict], epochs: int,
                threads: int, plots: bool = True, seed: int = 0) -> dict[str, dict]:
    """Stage two on the same folds and batches; {member: pooled OOF scores}. `seed` draws the batches, views and
    initial weights (the folds come from folds_csv)."""
    base = TrainConfig(folds=FOLDS, epochs=epochs, device="cpu", workers=0, threads=threads, tta=0, preload=True,
                       plots=plots, seed=seed)
    cfgs = {n: replace(base, **kw) for n, kw in members.items()}
    t = time.perf_counter()
    metrics = run_training(cache, data, run, base, cfgs, folds_csv=folds_csv, overwrite=True)
    seconds = time.perf_counter() - t
    return {n: {**metrics["heads"][n], "train_s": seconds} for n in members}


def read_oofs(run: Path, names: list[str], image_ids: list[str]) -> dict[str, np.ndarray]:
    """{head: (N, 5) OOF grams} from a run folder's oof_HEAD.csv files, rows in `image_ids` order."""
    return {n: runs.read_oof(run / f"oof_{n}.csv").set_index("image_id").loc[image_ids, list(TARGETS)].to_numpy(float)
            for n in names}


def ensemble_rows(oofs: dict[str, np.ndarray], y: np.ndarray, folds: np.ndarray) -> list[dict]:
    """Per ENSEMBLES entry whose members are all in `oofs`: the equal-weight component-space mean of their OOF grams
    (no fitting, so already out-of-fold) and the non-negative stack's cross-fitted score (fit on the other folds'
    OOF rows, applied to the held-out fold), on the folds the members were scored on."""
    rows = []
    for name, members in ENSEMBLES.items():
        if not all(m in oofs for m in members):
            continue
        preds = [oofs[m] for m in members]
        mean = weighted_mean(preds, [1.0] * len(preds))
        stack = cross_fitted(preds, y, folds, fit_stack, stack_predict)
        rows += [scored(f"{name} (mean of OOF grams)", y, mean),
                 {"model": f"{name} (stack, cross-fitted)", "competition_r2": stack["ensemble"], "per_target_r2": None,
                  "folds": stack["folds"]}]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | competition_r2 | " + " | ".join(f"R2 {t.removesuffix('_g')}" for t in TARGETS) + " |",
             "|---|---:|" + "---:|" * len(TARGETS)]
    for r in rows:
        per = " | ".join(f"{r['per_target_r2'][t]:.3f}" if r["per_target_r2"] else "" for t in TARGETS)
        lines.append(f"| {r['model']} | {r['competition_r2']:.3f} | {per} |")
    return "\n".join(lines)


def pick_contenders(names: list[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """The CONTENDERS named, and {name: why skipped} for those whose head is not registered in this checkout."""
    from biomass_cache.heads import HEADS as REGISTERED

    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise SystemExit(f"error: unknown contender(s) {unknown}; known: {', '.join(CONTENDERS)} (add one to "
                         f"CONTENDERS in benchmarks/bench_heads.py)")
    picked = {n: CONTENDERS[n] for n in names if CONTENDERS[n]["head"] in REGISTERED}
    skipped = {n: f"head '{CONTENDERS[n]['head']}' is not registered in this checkout" for n in names
               if n not in picked}
    return picked, skipped


def folds_of(data: Path, work: Path) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The training table, its (N, 5) grams and the grouped folds every row is scored on (written to work/folds.csv)."""
    table = read_long_csv(data / "train.csv")
    folds = grouped_folds(table, n_splits=FOLDS, seed=0)
    write_folds(work / "folds.csv", table, folds)
    return table, table[list(TARGETS)].to_numpy(float), folds


def scored(model: str, y: np.ndarray, oof: np.ndarray, **extra) -> dict:
    return {"model": model, "competition_r2": competition_r2(y, oof), "per_target_r2": per_target_r2(y, oof), **extra}


def baseline_rows(data: Path, f16: Path, table: pd.DataFrame, y: np.ndarray, folds: np.ndarray) -> list[dict]:
    """The mean predictor, the colour-statistics ridge (train/baseline.py) and ridge on pooled tokens, on `folds`."""
    colour_oof, alphas = ridge_inner_cv_oof(colour_stats_of([data / p for p in table["image_path"]]), y, folds)
    return [scored("mean predictor", y, mean_oof(y, folds)),
            scored(COLOUR_RIDGE, y, colour_oof, alphas=alphas),
            scored(f"ridge on mean-pooled view-0 tokens ({len(LAYERS)} layers)", y,
                   ridge_oof(pooled_tokens(f16, list(table["image_id"])), y, folds))]


def transfer_cell(work: Path, n_train: int, style: str, seed: int, cfg: dict, contenders: dict[str, dict],
                  threads: int) -> dict:
    """One (size, style, seed) cell: its own data, cache and grouped folds; every row scored on those folds."""
    sz = {"n_train": n_train, "photo": cfg["photo"], "size": cfg["size"], "int8": False}
    data, f16, _, extract_s = prepare(work, sz, style=style, seed=seed)
    table, y, folds = folds_of(data, work)
    rows = baseline_rows(data, f16, table, y, folds)
    if contenders:
        heads = train_heads(f16, data, work / "runs", work / "folds.csv", contenders, cfg["epochs"], threads,
                            plots=False)
        rows += [{"model": f"{name} head", **s} for name, s in heads.items()]
        rows += ensemble_rows(read_oofs(work / "runs", list(heads), list(table["image_id"])), y, folds)
    colour = rows[1]["competition_r2"]
    return {"n_train": n_train, "style": style, "seed": seed, "extract_s": extract_s, "rows": rows,
            "margin_vs_colour": {r["model"]: r["competition_r2"] - colour for r in rows if r["model"] != COLOUR_RIDGE}}


def transfer_summary(cells: list[dict]) -> dict[str, dict]:
    """Per model of the first cell: its mean score over the cells and its worst margin over the colour ridge."""
    summary = {}
    for model in [r["model"] for r in cells[0]["rows"]]:
        scores = [next(r["competition_r2"] for r in c["rows"] if r["model"] == model) for c in cells]
        margins = [c["margin_vs_colour"].get(model) for c in cells]
        summary[model] = {"mean": float(np.mean(scores)),
                          "worst_margin_vs_colour": None if None in margins else float(min(margins))}
    return summary


def run_transfer(args: argparse.Namespace, work: Path) -> None:
    """The transfer preset: every cell, then per model its mean score and its worst margin over the colour ridge."""
    cfg = {**TRANSFER, **(TRANSFER_QUICK if args.quick else {})}
    cfg.update({k: getattr(args, k) for k in ("sizes", "styles", "seeds", "epochs", "contenders")
                if getattr(args, k) is not None})
    contenders, skipped = pick_contenders(cfg["contenders"])
    for name, why in skipped.items():
        print(f"NOTE: contender {name} skipped: {why}")
    out = args.out or (work / "heads_transfer_quick.json" if args.quick else RESULTS / "heads_transfer.json")
    t0, cells = time.perf_counter(), []
    plan = [(n, style, seed) for n in cfg["sizes"] for style in cfg["styles"] for seed in cfg["seeds"]]
    for n, style, seed in plan:  # the results file is rewritten after every cell: a cut-short run keeps its cells
        cells.append(transfer_cell(work / f"{style}_seed{seed}_n{n}", n, style, seed, cfg, contenders, args.threads))
        summary = transfer_summary(cells)
        result = {
            "settings": {"photo": list(cfg["photo"]), "size": list(cfg["size"]),
                         "backbone": f"{BACKBONE} (random weights)", "layers": LAYERS, "views": VIEWS, "folds": FOLDS,
                         "epochs": cfg["epochs"], "tta": 0, "torch_threads": args.threads, "preset": "transfer",
                         "quick": bool(args.quick), "sizes": cfg["sizes"], "styles": cfg["styles"],
                         "seeds": cfg["seeds"], "colour_stats": len(STAT_NAMES), "cells_done": len(cells),
                         "cells_planned": len(plan),
                         "train_defaults": TRAIN_DEFAULTS},
            "contenders": contenders,
            "skipped": skipped,
            "cells": cells,
            "summary": summary,
            "wall_s": time.perf_counter() - t0,
            "machine": machine_info(),
            "work": str(work),
        }
        write_json(out, result)
    for c in cells:
        print(f"\n{c['style']} seed {c['seed']}, {c['n_train']} images (extraction {c['extract_s']:.0f} s)")
        print(markdown(c["rows"]))
    print("\n| model | mean competition_r2 | worst margin over colour ridge |\n|---|---:|---:|")
    for model, m in summary.items():
        worst = "" if m["worst_margin_vs_colour"] is None else f"{m['worst_margin_vs_colour']:+.3f}"
        print(f"| {model} | {m['mean']:.3f} | {worst} |")
    print(f"\nwall {result['wall_s']:.0f} s; results -> {out}")


def run_techniques(args: argparse.Namespace, work: Path) -> None:
    """The techniques preset: the full preset's training photos, cache and folds (its test photos are more, for the
    pseudo-labels), every technique of issue #15 beside the density head and the colour-statistics ridge."""
    from biomass_cache.submit.spec import EnsembleSpec, Member
    from biomass_cache.submit.pseudo import pseudo_train

    cfg, t0 = {**TECHNIQUES, **(TECHNIQUES_QUICK if args.quick else {})}, time.perf_counter()
    data, f16, _, extract_s = prepare(work, cfg)
    tiled = work / f"cache_tiles{cfg['tiles']}.zarr"
    tiles_s = extract_cache(data, tiled, cfg["size"], cfg["tiles"])
    table, y, folds = folds_of(data, work)
    rows = baseline_rows(data, f16, table, y, folds)
    run = work / "runs" / "heads"
    heads = train_heads(f16, data, run, work / "folds.csv", {n: CONTENDERS[n] for n in cfg["heads"]}, cfg["epochs"],
                        args.threads)
    rows += [{"model": f"{name} head", **s} for name, s in heads.items()]
    rows += ensemble_rows(read_oofs(run, list(heads), list(table["image_id"])), y, folds)
    spread = [heads["density"]["competition_r2"]]
    for seed in cfg["seeds"]:  # the density head again with other batches, views and initial weights: the noise
        again = train_heads(f16, data, work / "runs" / f"seed{seed}", work / "folds.csv",
                            {"density": CONTENDERS["density"]}, cfg["epochs"], args.threads, seed=seed)
        rows.append({"model": f"density head (seed {seed})", **again["density"]})
        spread.append(again["density"]["competition_r2"])
    got = train_heads(tiled, data, work / "runs" / "tiles", work / "folds.csv", {"density": CONTENDERS["density"]},
                      cfg["epochs"], args.threads)
    half = f"{cfg['size'][0] // cfg['tiles']}x{cfg['size'][1]}"
    rows.append({"model": f"density head, {cfg['tiles']} tiles ({half} each) per view", **got["density"],
                 "extract_s": tiles_s, "token_change_vs_whole_view": token_change(f16, tiled)})
    t = time.perf_counter()
    pseudo = pseudo_train(EnsembleSpec((Member(run, head="density"),)), data, work / "runs" / "pseudo", rounds=1,
                          weight=cfg["pseudo_weight"], work_dir=work / "submit", overwrite=True, progress=False)
    rows.append({"model": f"density head + pseudo-labels ({pseudo['pseudo']['n_test']} test photos, 1 round, weight "
                          f"{cfg['pseudo_weight']}, {pseudo['pseudo']['labels']})",
                 **pseudo["heads"]["density"], "train_s": time.perf_counter() - t})
    r2 = {r["model"]: r["competition_r2"] for r in rows}
    result = {
        "settings": {"n_train": cfg["n_train"], "n_test": cfg["n_test"], "photo": list(cfg["photo"]),
                     "size": list(cfg["size"]), "backbone": f"{BACKBONE} (random weights)", "layers": LAYERS,
                     "views": VIEWS, "folds": FOLDS, "epochs": cfg["epochs"], "tta": 0, "torch_threads": args.threads,
                     "preset": "techniques", "quick": bool(args.quick), "colour_stats": len(STAT_NAMES),
                     "train_defaults": TRAIN_DEFAULTS},
        "contenders": {n: CONTENDERS[n] for n in cfg["heads"]},
        "rows": rows,
        "margin_vs_density": {m: v - r2["density head"] for m, v in r2.items()},
        "margin_vs_colour": {m: v - r2[COLOUR_RIDGE] for m, v in r2.items()},
        "density_seeds": [0, *cfg["seeds"]],
        "density_seed_spread": float(max(spread) - min(spread)),
        "extract_s": extract_s,
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
        "work": str(work),
    }
    out = args.out or (work / "heads_techniques_quick.json" if args.quick else RESULTS / "heads_techniques.json")
    write_json(out, result)
    print("\n" + markdown(rows))
    print(f"\nwall {result['wall_s']:.0f} s; results -> {out}")


def main() -> None:
    keep_freed_memory()  # as every entry point does: benchmarks measure what users run
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted([*PRESETS, "transfer", "techniques"]), default="full",
                    help="full: the table; reduce / reduce_large: full vs reduced tokens at a 14 x 28 / 28 x 56 grid; "
                         "quick: a smoke run; transfer: cells of (size, style, seed), colour ridge in each; "
                         "techniques: issue #15's techniques on the full preset's photos and folds")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON results file [results/heads[_PRESET].json; transfer --quick: WORK/heads_transfer_quick"
                         ".json, never the results folder]")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: small heads train fastest single-threaded on a shared CPU)")
    ap.add_argument("--work", type=Path, default=None, help="folder for data, caches and runs (kept; reused)")
    transfer = ap.add_argument_group("transfer preset (defaults: TRANSFER, or TRANSFER_QUICK with --quick)")
    transfer.add_argument("--sizes", type=int, nargs="+", help=f"training images per cell {TRANSFER['sizes']}")
    transfer.add_argument("--styles", nargs="+", choices=STYLES, help=f"generator styles {TRANSFER['styles']}")
    transfer.add_argument("--seeds", type=int, nargs="+", help=f"generator seeds {TRANSFER['seeds']}")
    transfer.add_argument("--epochs", type=int, help=f"epochs of every head [{TRANSFER['epochs']}]")
    transfer.add_argument("--contenders", nargs="+", metavar="NAME",
                          help=f"heads to train in every cell, from {', '.join(CONTENDERS)} [{TRANSFER['contenders']}]")
    transfer.add_argument("--quick", action="store_true",
                          help=f"a smoke run: {TRANSFER_QUICK}; with --preset techniques: {TECHNIQUES_QUICK}")
    args = ap.parse_args()
    given = [k for k in ("sizes", "styles", "seeds", "epochs", "contenders") if getattr(args, k) is not None]
    if args.preset != "transfer" and given:
        ap.error(f"--{given[0]} applies to --preset transfer only")
    if args.quick and args.preset not in ("transfer", "techniques"):
        ap.error("--quick applies to --preset transfer or techniques only")
    torch.set_num_threads(args.threads)
    if args.preset == "transfer":
        run_transfer(args, args.work or Path(tempfile.mkdtemp(prefix="bench_heads_")))
        return
    if args.preset == "techniques":
        run_techniques(args, args.work or Path(tempfile.mkdtemp(prefix="bench_heads_")))
        return
    sz = PRESETS[args.preset]
    out = args.out or RESULTS / ("heads.json" if args.preset == "full" else f"heads_{args.preset}.json")
    threads = args.threads
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_heads_"))
    t0 = time.perf_counter()
    data, f16, i8, extract_s = prepare(work, sz)

    table, y, folds = folds_of(data, work)

    rows = [
        scored("mean predictor", y, mean_oof(y, folds)),
        scored(f"ridge on colour statistics ({len(STAT_NAMES)} features)", y,
               ridge_oof(colour_stats_of([data / p for p in table["image_path"]]), y, folds)),
        scored(f"ridge on mean-pooled view-0 tokens ({len(LAYERS)} layers)", y,
               ridge_oof(pooled_tokens(f16, list(table["image_id"])), y, folds)),
    ]
    heads = train_heads(f16, data, work / "runs" / "float16", work / "folds.csv", sz["heads"], sz["epochs"], threads)
    for name, s in heads.items():
        rows.append({"model": f"{name} head", **s})
    dens = heads["density"]["competition_r2"]
    margins = {"density - ridge(pooled tokens)": dens - rows[2]["competition_r2"],
               "density - ridge(colour stats)": dens - rows[1]["competition_r2"]}
    if sz["int8"]:
        heads_i8 = train_heads(i8, data, work / "runs" / "int8", work / "folds.csv", {"density": HEADS["density"]},
                               sz["epochs"], threads)
        rows.append({"model": "density head, int8 cache", **heads_i8["density"]})
        margins["density(float16) - density(int8)"] = heads_i8["density"]["competition_r2"] - dens
    for (dim, pool), members in sz["reduced"].items():
        cache, reduce_s = reduced_copy(f16, work, dim, pool)
        got = train_heads(cache, data, work / "runs" / f"pca{dim}_pool{pool}", work / "folds.csv", members,
                          sz["epochs"], threads)
        for name, s in got.items():
            margins[f"{name}(PCA {dim}, pool {pool}) - {name}(full tokens)"] = (s["competition_r2"]
                                                                                - heads[name]["competition_r2"])
            rows.append({"model": f"{name} head, reduced cache (PCA {dim}, pool {pool})", **s, "reduce_s": reduce_s})

    r2 = {r["model"]: r["competition_r2"] for r in rows}
    from biomass_cache.store.reduce import DEFAULT_DIM, auto_pool

    goals = dict(GOALS)
    if sz["reduced"]:  # the reduction `biomass reduce` picks by default at this grid
        grid = (sz["size"][1] // 16, sz["size"][0] // 16)
        goals[f"density(PCA {DEFAULT_DIM}, pool {auto_pool(grid)}) - density(full tokens)"] = REDUCED_GOAL
    result = {
        "settings": {"n_train": sz["n_train"], "photo": list(sz["photo"]), "size": list(sz["size"]),
                     "backbone": f"{BACKBONE} (random weights)", "layers": LAYERS, "views": VIEWS, "folds": FOLDS,
                     "epochs": sz["epochs"], "tta": 0, "torch_threads": threads, "preset": args.preset,
                     "train_defaults": TRAIN_DEFAULTS},
        "competition_r2": r2,
        "rows": rows,
        "margins": margins,
        "goals": {k: {"margin": margins[k], "goal": g, "met": bool(margins[k] >= g)} for k, g in goals.items()
                  if k in margins},
        "extract_s": extract_s,
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
        "work": str(work),
    }
    write_json(out, result)
    print("\n" + markdown(rows))
    print("\n| goal | margin | needed | met |\n|---|---:|---:|---|")
    for k, g in result["goals"].items():
        print(f"| {k} | {g['margin']:+.3f} | >= {g['goal']:+.3f} | {'yes' if g['met'] else 'NO'} |")
    print(f"\nwall {result['wall_s']:.0f} s (extraction {extract_s:.0f} s); results -> {out}")


if __name__ == "__main__":
    main()
