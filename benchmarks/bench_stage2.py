"""Stage two against the hardware's limit: the default 5-fold run on a ViT-L-shaped token store, side by side with the
loop of an earlier commit, with each run's achieved FLOP rate against the matmul rate measured in the same process.

The store is bench_scale.py's (357 images x 4 views of 960 x 480: 30 x 60 tokens x 1024 channels x 3 layers, a
planted learnable signal, not DINOv3 tokens), reduced by `biomass reduce` with its defaults (PCA 128 channels, 2 x 2
pooling). On it, each arm is `biomass train --head H --folds 5` with the defaults, in its own process:

- `before`: the code of `--baseline` (a git commit; a worktree of it is made in --work), seed 0;
- `fp32`: this code in fp32 (tokens held in RAM or on the GPU, the density head's LayerNorm applied once);
- `bf16`: this code in bf16 (autocast; `precision = "auto"` where the device computes bf16 natively);
- `stacked`: bf16 with the folds trained as one stacked model (`--stack-folds`; "auto" stacks on a GPU only);
- `seeds5`: bf16, a seed ensemble of 5 seeds in one command (`--seeds 0,1,2,3,4`: every fold of every seed stacked
  where the folds stack, a GPU; one seed after another elsewhere), against one seed's run (the goal: <= 2x).

`--tune before,1,4` adds `biomass tune` trials per hour on the same store: the code of `--baseline`, this code with
trials alone and 4 side by side (`--parallel`).

Per arm: wall seconds of the whole command, seconds in training epochs (history.csv) and per epoch, the pooled OOF
competition_r2 per seed (the seed spread of fp32 is the yardstick for bf16), and the limit: FLOPs of the training
steps (torch's FlopCounterMode on one step of the head, times the steps) over the fp32 and bf16 matmul rates
measured here at the head's first-layer shape, just before and just after that arm (the mean of the two medians:
the VM's rate moves within minutes). Token loading (the bank) is timed on its own.

    python benchmarks/bench_stage2.py [--device cpu|cuda] [--stores reduced,full] [--heads density]
        [--seeds 0,1,2] [--arms before,fp32,bf16,stacked] [--baseline REF] [--images 357] [--epochs 120]
        [--tune before,1,4] [--tune-trials 8] [--tune-epochs 20] [--work DIR] [--out FILE]

CPU results go to benchmarks/results/stage2_cpu.json; `--device cuda` (bench_gpu.py --stage2) to stage2_gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench_scale import (BATCH, EPOCHS, FOLDS, REAL_IMAGES, SHAPES, build_store, child, head_flops, matmul_gflops,
                         write_data)
from biomass_cache.common.io import write_json
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.store.layout import open_store
from biomass_cache.train.bank import DTYPES, TokenBank, plan_bank

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
HIDDEN = {"density": 128, "mlp": 512, "vitdet": 512}  # the default width of each head's first layer


def worktree(ref: str, work: Path) -> Path | None:
    """A checkout of `ref` (kept in --work): the `before` arm runs its code. None where there is no git history
    (a copy of the working tree without .git): the `before` arms are then left out, and the results say so."""
    path = work / f"baseline-{ref[:12]}"
    if not path.exists():
        proc = subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT, capture_output=True,
                              text=True)
        if proc.returncode:
            print(f"no checkout of {ref} ({proc.stderr.strip()[:200]}): the `before` arms are left out", flush=True)
            return None
    return path


def limits(head: str, store, device: torch.device) -> dict:
    """The head's FLOPs per training step and per validated image, and the matmul rates at its first layer's shape."""
    step, forward = head_flops(head, store.channels, tuple(store.grid), BATCH)
    return {"step_flops": step, "forward_flops_per_image": forward, "matmul_gflops": matmul_rates(head, store, device)}


def matmul_rates(head: str, store, device: torch.device, samples: int = 5) -> dict:
    """fp32 and bf16 matmul GFLOP/s at the head's first-layer shape: the median of `samples` measurements (a shared
    VM's rate moves 1.5x within minutes; each arm is compared with the rates measured just before and after it)."""
    rows = BATCH * store.grid[0] * store.grid[1] * 3 if head == "density" else BATCH * 3
    rates = {}
    for name in ("fp32", "bf16"):
        a = torch.randn(rows, store.channels, device=device, dtype=DTYPES[name])
        b = torch.randn(store.channels, HIDDEN[head], device=device, dtype=DTYPES[name])
        rates[name] = float(np.median([matmul_rate(a, b) for _ in range(samples)]))
    return rates


def matmul_rate(a: torch.Tensor, b: torch.Tensor, reps: int = 20) -> float:
    if a.device.type == "cpu":
        return matmul_gflops(a.shape[0], a.shape[1], b.shape[1], a.dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(a.device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(a.device)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] * reps / (time.perf_counter() - t) / 1e9


def token_load(store, device: torch.device, precision: str) -> dict:
    """Seconds to hold the store's tokens as a run does (every view, every layer), and where they went."""
    rows, views = list(range(len(store.image_ids))), list(range(store.n_views))
    plan, refused = plan_bank(store, len(rows), len(views), len(store.layers), device, precision, norm=True)
    if plan is None:
        return {"held": None, "refused": refused}
    t = time.perf_counter()
    bank = TokenBank.load(store, rows, views, store.layers, plan)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    del bank
    return {"held": plan.describe(), "seconds": round(seconds, 2), "gb_per_s": round(plan.nbytes / seconds / 1e9, 2)}


def run_arm(arm: str, code: Path, cache: Path, data: Path, run: Path, head: str, seed: int, device: str,
            epochs: int) -> dict:
    """One default 5-fold run in its own process; its wall time, epoch times and pooled OOF score."""
    shutil.rmtree(run, ignore_errors=True)
    extra = {"before": [], "stacked": ["--precision", "bf16", "--stack-folds"],
             "seeds5": ["--precision", "bf16", "--seeds", ",".join(str(seed + k) for k in range(5))]
             }.get(arm, ["--precision", arm])
    env = {**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "biomass_cache", "train", "--cache", str(cache), "--data", str(data),
                           "--head", head, "--folds", str(FOLDS), *([] if arm == "seeds5" else ["--seed", str(seed)]),
                           "--device", device,
                           "--epochs", str(epochs), "--out", str(run), "--no-plots", *extra], cwd=code, env=env,
                          capture_output=True,
                          text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{arm} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    if arm == "seeds5":  # "auto" stacks the folds of every seed on a GPU: one fold's rows carry the epoch then
        stacked = device.startswith("cuda")
        figures = [run_figures(r, stacked) for r in sorted(run.glob("seed*"))]
        times = [f["train_epochs_s"] for f in figures]
        return {"seed": seed, "wall_s": round(wall, 1), "seeds": len(figures), "stacked": stacked,
                "train_epochs_s": round(times[0] if stacked else sum(times), 1), "epochs": figures[0]["epochs"],
                "oof_competition_r2": float(np.mean([f["oof_competition_r2"] for f in figures])),
                "precision": figures[0]["precision"], "tokens": figures[0]["tokens"]}
    return {"seed": seed, "wall_s": round(wall, 1), **run_figures(run, stacked=arm == "stacked")}


def run_figures(run: Path, stacked: bool) -> dict:
    """A run folder's epoch times and score. A stacked epoch trains every fold at once: each fold's history row
    carries that epoch's time, so one fold's rows add up to the run's."""
    history = pd.read_csv(run / "history.csv")
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    timed = history[history["fold"] == "fold0"] if stacked else history
    return {"train_epochs_s": round(float(timed["seconds"].sum()), 1),
            "epoch_s": round(float(history["seconds"].median()), 4), "epochs": int(history["epoch"].max()),
            "oof_competition_r2": metrics["competition_r2"], "precision": config.get("precision", "fp32"),
            "tokens": config.get("tokens", "preloaded in RAM" if config.get("preloaded") else "streamed")}


def tune_rate(code: Path, cache: Path, data: Path, work: Path, parallel: str, trials: int, epochs: int,
              device: str) -> dict:
    """`biomass tune` on the store, `trials` trials of `epochs` epochs (lr and weight decay searched, no pruning, no
    second stage), `parallel` trials side by side ("before": the code of `code`, one trial at a time): trials per
    hour."""
    out = work / f"tune_p{parallel}"
    shutil.rmtree(out, ignore_errors=True)
    space = work / "space.toml"
    space.write_text(f'[space]\nlr = {{ log_uniform = [1e-3, 1e-2] }}\nweight_decay = {{ uniform = [0.0, 0.1] }}\n'
                     f'[fixed]\nhead = "density"\nepochs = {epochs}\ndevice = "{device}"\n')
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "biomass_cache", "tune", "--cache", str(cache), "--data", str(data),
                           "--space", str(space), "--trials", str(trials), "--out", str(out), "--pruner", "none",
                           "--seeds", "0", "--top-k", "1", *([] if parallel == "before" else ["--parallel", parallel])],
                          cwd=code, env={**os.environ, "PYTHONPATH": str(code), "TQDM_DISABLE": "1"},
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"tune --parallel {parallel} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return {"parallel": parallel, "trials": trials, "epochs": epochs, "wall_s": round(wall, 1),
            "trials_per_hour": round(trials * 3600 / wall, 1)}


def achieved(row: dict, lim: dict, n_train: int, stacked: bool = False) -> dict:
    """The run's training FLOP rate and its share of the matmul limits; `typical_*` from its median epoch (one epoch
    of one fold, of every fold when stacked), which a shared VM's pauses (an epoch of 7 s among epochs of 0.2 s,
    seen) do not move."""
    steps = FOLDS * row["epochs"] * -(-n_train // BATCH) * row.get("seeds", 1)
    flops = steps * lim["step_flops"]
    rate = flops / row["train_epochs_s"] / 1e9
    out = {"train_gflops": round(flops / 1e9), "achieved_gflops_per_s": round(rate, 1),
           "share_of_fp32_matmul_limit": round(rate / lim["matmul_gflops"]["fp32"], 3),
           "share_of_bf16_matmul_limit": round(rate / lim["matmul_gflops"]["bf16"], 3)}
    if "epoch_s" in row:
        typical = (FOLDS if stacked else 1) * -(-n_train // BATCH) * lim["step_flops"] / row["epoch_s"] / 1e9
        out.update(typical_gflops_per_s=round(typical, 1),
                   typical_share_of_fp32_matmul_limit=round(typical / lim["matmul_gflops"]["fp32"], 3))
    return out


def main() -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stores", default="reduced", help="comma-separated: reduced, full (unreduced tokens)")
    ap.add_argument("--heads", default="density")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the fp32 and bf16 arms (before: the first)")
    ap.add_argument("--arms", default="before,fp32,bf16",
                    help="before, fp32, bf16 and stacked (bf16 with the folds stacked, --stack-folds)")
    ap.add_argument("--tune", default="", help="`biomass tune` trials per hour: comma-separated --parallel values, "
                    "`before` for the code of --baseline")
    ap.add_argument("--tune-trials", type=int, default=8)
    ap.add_argument("--tune-epochs", type=int, default=20)
    ap.add_argument("--baseline", default="1ba0193", help="the commit whose loop is `before`")
    ap.add_argument("--images", type=int, default=REAL_IMAGES)
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="per run (the default run: 120)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_stage2"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    out = args.out or RESULTS / f"stage2_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    seeds, arms = [int(s) for s in args.seeds.split(",")], args.arms.split(",")
    _, channels, layers = SHAPES["vitl"]
    data, full, reduced = args.work / "data", args.work / "full.zarr", args.work / "reduced.zarr"
    table = write_data(data, args.images)
    build_store(full, table, channels, layers)
    if not reduced.exists():
        child([sys.executable, "-m", "biomass_cache", "reduce", "--cache", str(full), "--out", str(reduced)])
    code = {"before": worktree(args.baseline, args.work) if "before" in arms + args.tune.split(",") else None}
    if code["before"] is None:
        arms = [a for a in arms if a != "before"]
        args.tune = ",".join(k for k in args.tune.split(",") if k and k != "before")
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    result = {"settings": {"images": args.images, "folds": FOLDS, "epochs": args.epochs, "batch_size": BATCH,
                           "baseline": args.baseline if code["before"] else f"{args.baseline} (no checkout: not run)",
                           "seeds": seeds, "device": str(device),
                           "signal": "planted (bench_scale.py), not DINOv3 tokens: scores say nothing about real "
                                     "photos",
                           "train": "biomass train defaults (eval_every 5 since this change; before: every epoch)"},
              "machine": machine, "stores": {}}
    n_train = round(args.images * (FOLDS - 1) / FOLDS)
    for name in args.stores.split(","):
        store = open_store(reduced if name == "reduced" else full)
        entry = {"grid": list(store.grid), "channels": store.channels, "gb": round(store.nbytes_on_disk() / 1e9, 2),
                 "token_load": {p: token_load(store, device, p) for p in ("fp32", "bf16")}, "heads": {}}
        result["stores"][name] = entry
        for head in args.heads.split(","):
            lim = limits(head, store, device)
            rows = {"limits": lim}
            for arm in arms:
                rows[arm] = []
                for seed in seeds[:1] if arm == "before" else seeds:
                    around = [matmul_rates(head, store, device)]
                    row = run_arm(arm, code.get(arm) or ROOT, store.path, data, args.work / f"run_{name}_{head}_{arm}",
                                  head, seed, args.device, args.epochs)
                    around.append(matmul_rates(head, store, device))
                    rates = {k: float(np.mean([r[k] for r in around])) for k in ("fp32", "bf16")}
                    row["matmul_gflops_around"] = {k: [round(r[k]) for r in around] for k in ("fp32", "bf16")}
                    rows[arm].append({**row, **achieved(row, {**lim, "matmul_gflops": rates}, n_train,
                                                        stacked=arm == "stacked")})
                    print(name, head, arm, json.dumps(rows[arm][-1]), flush=True)
                    entry["heads"][head] = rows
                    write_json(out, result)  # after every run: a benchmark cut short keeps what it measured
            r2 = {arm: [r["oof_competition_r2"] for r in rows[arm]] for arm in arms}
            rows["summary"] = {
                "wall_s_seed0": {arm: rows[arm][0]["wall_s"] for arm in arms},
                "speedup_vs_before": {arm: round(rows["before"][0]["wall_s"] / rows[arm][0]["wall_s"], 2)
                                      for arm in arms if "before" in rows},
                "speedup_vs_first_arm": {arm: round(rows[arms[0]][0]["wall_s"] / rows[arm][0]["wall_s"], 2)
                                         for arm in arms},
                "oof_r2": {arm: {"mean": float(np.mean(v)), "min": min(v), "max": max(v)} for arm, v in r2.items()},
                **({"seeds5_over_one_seed": round(rows["seeds5"][0]["wall_s"] / rows["bf16"][0]["wall_s"], 2)}
                   if "seeds5" in rows and "bf16" in rows else {}),
            }
            write_json(out, result)
        if args.tune:
            entry["tune"] = [tune_rate(code.get(k) or ROOT, store.path, data, args.work, k, args.tune_trials,
                                       args.tune_epochs, args.device) for k in args.tune.split(",")]
            print(name, "tune", json.dumps(entry["tune"]), flush=True)
            write_json(out, result)
    print(f"results -> {out}")


if __name__ == "__main__":
    main()
