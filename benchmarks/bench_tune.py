"""The quality bar's tuning row: the density head tuned by `biomass tune` against its defaults, same folds and seeds.

On bench_heads.py's synthetic data and ViT-S cache (same 5 grouped folds, clean view 0): a study over the density
head's lr, weight decay, EMA decay, width and dropout, its second stage (top K re-run with fresh seeds), then the
winner (STUDY/best.toml) and the default config each trained with the same further seeds, which neither the search
nor the second stage saw, so the tuned score carries no selection bias. Both report mean and std over those seeds.

    python benchmarks/bench_tune.py [--quick] [--trials 40] [--seeds 3] [--out benchmarks/results/tune.json]
                                    [--work DIR]

--work keeps the data, the cache and the study (reused: a re-run continues the study).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from biomass_cache.train.crossval import run_training
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.folds import grouped_folds, write_folds
from biomass_cache.common.io import write_json
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.train.config import resolve
from biomass_cache.train.tune import Settings, toml_value, tune

# A sibling script, not a package module: run as `python benchmarks/bench_tune.py`, Python puts this script's own
# folder first on sys.path, so bench_heads imports as a top-level module (the one mechanism; no sys.path edits).
from bench_heads import FOLDS, PRESETS, prepare

OUT = Path(__file__).parent / "results" / "tune.json"
SPACE = """[space]
lr = {{ log_uniform = [1e-3, 2e-2] }}
weight_decay = {{ uniform = [0.0, 0.2] }}
ema_decay = {{ uniform = [0.95, 0.999] }}
head_kwargs.hidden = {{ int = [64, 512], log = true }}
head_kwargs.dropout = {{ uniform = [0.0, 0.3] }}
[fixed]
{fixed}
"""


def fixed(epochs: int, threads: int) -> dict:
    """What every run shares, the tuned ones and the default: bench_heads.py's settings."""
    return dict(head="density", epochs=epochs, folds=FOLDS, tta=0, preload=True, workers=0, device="cpu",
                threads=threads, plots=False)


def seeded_runs(cache: Path, data: Path, run: Path, folds_csv: Path, train: dict, seeds: list[int]) -> dict:
    scores = []
    for seed in seeds:
        cfg, members = resolve({**train, "seed": seed}, [], {}, None)
        scores.append(run_training(cache, data, run / f"seed{seed}", cfg, members, folds_csv=folds_csv)
                      ["competition_r2"])
    return {"seeds": seeds, "r2": scores, "mean": float(np.mean(scores)),
            "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None}


def main() -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bench_heads.py's quick data (80 small images, 6 epochs)")
    ap.add_argument("--trials", type=int, default=40, help="study size")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the second stage and of the final comparison")
    ap.add_argument("--top-k", type=int, default=3, help="trials re-run in the second stage")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: bench_heads.py's)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON results file")
    ap.add_argument("--work", type=Path, default=None, help="folder for data, cache and study (kept; reused)")
    args = ap.parse_args()
    sz = PRESETS["quick" if args.quick else "full"]
    epochs = args.epochs or sz["epochs"]
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_tune_"))
    t0 = time.perf_counter()
    data, cache, _, _ = prepare(work, sz)
    table = read_long_csv(data / "train.csv")
    folds_csv = work / "folds.csv"
    write_folds(folds_csv, table, grouped_folds(table, n_splits=FOLDS, seed=0))  # bench_heads.py's folds

    shared = fixed(epochs, args.threads)
    space = work / "space.toml"
    space.write_text(SPACE.format(fixed="\n".join(f"{k} = {toml_value(v)}" for k, v in shared.items())))
    study_dir = work / "study"
    t = time.perf_counter()
    summary = tune(cache, data, space, study_dir, Settings(trials=args.trials, top_k=args.top_k, seeds=args.seeds,
                                                           folds_csv=folds_csv))
    tune_s = time.perf_counter() - t
    best = tomllib.loads((study_dir / "best.toml").read_text())["train"]
    final_seeds = [100 + s for s in range(1, args.seeds + 1)]  # seen by neither the search nor the second stage
    tuned = seeded_runs(cache, data, work / "final" / "tuned", folds_csv, best, final_seeds)
    default = seeded_runs(cache, data, work / "final" / "default", folds_csv, shared, final_seeds)
    result = {
        "settings": {"n_train": sz["n_train"], "epochs": epochs, "folds": FOLDS, "tta": 0, "trials": args.trials,
                     "top_k": args.top_k, "seeds": args.seeds, "quick": args.quick, "space": space.read_text()},
        "tuned": {**tuned, "train": best}, "default": default,
        "gain": tuned["mean"] - default["mean"],
        "study": {k: summary.get(k) for k in ("finished", "rows", "winner")},
        "tune_s": tune_s, "wall_s": time.perf_counter() - t0, "work": str(work),
    }
    write_json(args.out, result)

    def cell(r: dict) -> str:
        return f"{r['mean']:.3f} +- {r['std']:.3f}" if r["std"] is not None else f"{r['mean']:.3f}"

    print(f"\n| model | competition_r2 (mean +- std over seeds {final_seeds}) |\n|---|---:|")
    print(f"| density head, defaults | {cell(default)} |")
    print(f"| density head, tuned ({args.trials} trials, top {args.top_k} x {args.seeds} seeds) | {cell(tuned)} |")
    print(f"\ngain {result['gain']:+.3f}; tuning {tune_s:.0f} s, wall {result['wall_s']:.0f} s; results -> {args.out}")


if __name__ == "__main__":
    main()
