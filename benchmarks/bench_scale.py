"""Stage two at the real scale: the default 5-fold head run on token stores of ViT-L and ViT-7B shape, full vs reduced.

For each shape (960 x 480 views: 30 x 60 = 1800 tokens, 3 layers, 4 views, float16) it builds a store whose tokens
carry a planted, learnable signal (an anisotropic noise bank plus per-patch component densities along fixed random
directions; not real DINOv3 features), then measures side by side in one run, each arm in its own process:

- full: today's unreduced path. One epoch of fold 0 and its OOF prediction are measured; the default run (5 folds x
  120 epochs + OOF) is extrapolated from them;
- reduce: `biomass reduce` with its defaults (PCA 128 channels, 2 x 2 pooling), measured;
- reduced: `biomass train --head H --folds 5` with its defaults on the reduced store, measured whole.

Per arm: wall seconds, seconds per epoch, peak RSS (the child's maxrss from wait4: Linux counts the resident memory
this process had when it started the child, so it is an upper bound), store bytes read per epoch (the tokens the
epoch touches) and the compute limit: the head's FLOPs per epoch (counted by torch's FlopCounterMode) over the
fp32 matmul GFLOP/s measured in this run at the head's shape.

    python benchmarks/bench_scale.py [--quick] [--images N] [--images-vit7b N] [--shapes vitl,vit7b] [--work DIR]

`--images` below 357 scales the per-image figures (reduction, epochs, whole runs) up to 357 and says so in the
results. Needs free disk for the stores (ViT-L: 15.8 GB at 357 images; ViT-7B: 63 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from biomass_cache.common.io import write_json
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.store.layout import StoreSpec, create_store, open_store
from biomass_cache.synth.blades import sample_labels
from biomass_cache.common.targets import TARGETS, to_density

ROOT = Path(__file__).resolve().parents[1]

OUT = Path(__file__).parent / "results" / "scale.json"
SHAPES = {"vitl": ("ViT-L", 1024, [11, 17, 23]), "vit7b": ("ViT-7B", 4096, [23, 31, 39])}
GRID, VIEWS, REAL_IMAGES, FOLDS, EPOCHS, BATCH = (30, 60), 4, 357, 5, 120, 16
BANK = 8  # noise blocks per layer, drawn once and reused with shuffled token order


# ---------------------------------------------------------------------------------------------- the data
def write_data(data: Path, n: int) -> pd.DataFrame:
    """A Kaggle-format train.csv with the synthetic label distribution (no photos: the store stands in for them)."""
    table, _ = sample_labels(n, np.random.default_rng(0))
    table.insert(0, "image_id", [f"ID{1000000 + k}" for k in range(n)])
    rows = [dict(sample_id=f"{r.image_id}__{t}", image_path=f"train/{r.image_id}.jpg", Sampling_Date=r.Sampling_Date,
                 State=r.State, Species=r.Species, Pre_GSHH_NDVI=r.Pre_GSHH_NDVI, Height_Ave_cm=r.Height_Ave_cm,
                 target_name=t, target=getattr(r, t)) for r in table.itertuples() for t in sorted(TARGETS)]
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(data / "train.csv", index=False)
    return table


def build_store(path: Path, table: pd.DataFrame, channels: int, layers: list[int]) -> float:
    """Tokens = shuffled anisotropic noise + per-patch densities along 3 random directions per layer."""
    if path.exists():
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    n_tok = GRID[0] * GRID[1]
    spectrum = (1.0 + np.arange(channels)) ** -0.5 * 4.0
    bank = (rng.standard_normal((len(layers), BANK, n_tok, channels), dtype=np.float32) * spectrum).astype(np.float32)
    directions = rng.standard_normal((len(layers), 3, channels)).astype(np.float32)
    directions *= 3.0 / np.linalg.norm(directions, axis=-1, keepdims=True)
    comps = to_density(table[list(TARGETS)].to_numpy(float))[:, :3]
    z = (comps / comps.std(axis=0)).astype(np.float32)
    fingerprint = {"backbone": {"name": f"planted signal, {channels} channels", "weights_sha256": "random"},
                   "size": [960, 480], "layers": layers, "split": "train", "n_views": VIEWS}
    store = create_store(path, StoreSpec(image_ids=list(table["image_id"]), n_views=VIEWS, layers=layers, grid=GRID,
                                         channels=channels, fingerprint=fingerprint))
    x = np.empty((VIEWS, len(layers), n_tok, channels), np.float32)
    for i in range(len(table)):
        for v in range(VIEWS):
            patch = z[i] * rng.gamma(4.0, 0.25, size=(n_tok, 3)).astype(np.float32)  # per-patch variation
            for l in range(len(layers)):
                x[v, l] = bank[l, rng.integers(BANK)][rng.permutation(n_tok)] + patch @ directions[l]
        store.write_image(i, x)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- measuring
def child(args: list[str]) -> dict:
    """Run a command in its own process; wall seconds, its own peak RSS (GB), its JSON report if it prints one."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1]) if out.strip().endswith("}") else {}
    return {"wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 1e6, **report}


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def head_flops(head_name: str, channels: int, grid: tuple[int, int], batch: int) -> tuple[int, int]:
    """(training step FLOPs at `batch`, forward FLOPs per image) of a head at its defaults."""
    from torch.utils.flop_counter import FlopCounterMode

    from biomass_cache.common.targets import ZScore, components_to_targets
    from biomass_cache.heads import create_head

    zs = ZScore.fit(components_to_targets(np.random.default_rng(0).gamma(2.0, 20.0, (64, 3))))
    head = create_head(head_name, n_layers=3, channels=channels, grid=grid, zscore=zs)
    x = torch.randn(batch, 3, grid[0] * grid[1], channels)
    with FlopCounterMode(display=False) as step:
        head(x)["components"].sum().backward()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        head(x[:1])
    return step.get_total_flops(), fwd.get_total_flops()


def step_ms(head_name: str, channels: int, grid: tuple[int, int], batch: int, bf16: bool, reps: int = 12) -> float:
    """Median milliseconds of one training step (forward, backward, AdamW) of a head at its defaults, in fp32 or
    under CPU bf16 autocast: whether bf16 pays at this shape."""
    from biomass_cache.common.targets import ZScore, components_to_targets
    from biomass_cache.heads import create_head

    zs = ZScore.fit(components_to_targets(np.random.default_rng(0).gamma(2.0, 20.0, (64, 3))))
    head = create_head(head_name, n_layers=3, channels=channels, grid=grid, zscore=zs)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, grid[0] * grid[1], channels)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = head(x)["components"].float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:])) * 1000


def full_epoch(store_path: str, data: str, head: str) -> None:
    """Child mode: today's unreduced path, one epoch of fold 0 and its OOF prediction; prints a JSON report."""
    from biomass_cache.train.crossval import cache_source
    from biomass_cache.common.data import read_long_csv
    from biomass_cache.train.dataset import AuxSpec
    from biomass_cache.common.folds import grouped_folds
    from biomass_cache.train.loop import build_member, fit_zscore, train_fold
    from biomass_cache.train.config import resolve

    keep_freed_memory()
    t0 = time.perf_counter()
    table = read_long_csv(Path(data) / "train.csv", check_images=False)
    cfg, members = resolve({}, [], {"device": "cpu"}, [head])
    store = open_store(store_path)
    source = cache_source(store, table, cfg, members)
    folds = grouped_folds(table, FOLDS, seed=cfg.seed)
    tr, va = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    zscore, aux = fit_zscore(table, tr), AuxSpec.fit(table, tr)
    loader = source.train_loader(tr, 1, aux)
    member = build_member(head, members[head], source.layers, source.signature, zscore, aux,
                          EPOCHS * len(loader), 1, source.device)
    prep = time.perf_counter() - t0
    truth = table[list(TARGETS)].to_numpy(float)
    rows = train_fold([member], loader, source.val_loader(va, aux), truth[va], source.tokens_fn, 1, desc="full fold0",
                      baseline_grams=np.nanmean(truth, axis=0))
    t = time.perf_counter()
    meta = {"head": member.eval_head.config, "aux": aux.to_dict(), "fingerprint": store.fingerprint,
            "layers": source.layers, **source.signature, "tta": cfg.tta}
    source.predict(member.eval_head, meta, va)
    print(json.dumps({"prep_s": prep, "epoch_s": rows[0]["seconds"], "predict_s": time.perf_counter() - t,
                      "n_train": len(tr), "n_val": len(va), "preloaded": source.config.get("preloaded")}))


def bytes_per_epoch(store_path: Path, n_images: int, preloaded: bool) -> int:
    """Token bytes one epoch touches: a view of every training image plus view 0 of every validation image (all
    images once), read from disk unless the run holds the tokens in RAM."""
    store = open_store(store_path)
    sample = len(store.layers) * store.grid[0] * store.grid[1] * store.channels * 2
    return 0 if preloaded else n_images * sample


def run_shape(key: str, n: int, work: Path, heads: list[str], quick: bool) -> dict:
    name, channels, layers = SHAPES[key]
    scale = REAL_IMAGES / n
    data, full, reduced = work / key / "data", work / key / "full.zarr", work / key / "reduced.zarr"
    table = write_data(data, n)
    build_s = build_store(full, table, channels, layers)
    full_store = open_store(full)
    print(f"{name}: store {full_store.nbytes_on_disk() / 1e9:.1f} GB ({n} images) built in {build_s:.0f} s",
          flush=True)
    shutil.rmtree(reduced, ignore_errors=True)
    red = child([sys.executable, "-m", "biomass_cache", "reduce", "--cache", str(full), "--out", str(reduced)])
    red_store = open_store(reduced)
    n_train = round(n * (FOLDS - 1) / FOLDS)
    steps = -(-n_train // BATCH)
    result = {"shape": name, "channels": channels, "grid": list(GRID), "layers": layers, "views": VIEWS,
              "images": n, "scaled_to": REAL_IMAGES, "store_gb": full_store.nbytes_on_disk() / 1e9,
              "reduced_store_gb": red_store.nbytes_on_disk() / 1e9, "reduced_grid": list(red_store.grid),
              "reduced_channels": red_store.channels,
              "reduce": {**red, "wall_s_at_357": red["wall_s"] * scale}, "heads": {}}
    for head in heads:
        row = {}
        for arm, path, grid, c in (("full", full, GRID, channels), ("reduced", reduced, red_store.grid,
                                                                     red_store.channels)):
            step_flops, fwd_flops = head_flops(head, c, tuple(grid), BATCH)
            epoch_flops = step_flops * steps + fwd_flops * (n - n_train)
            tokens = BATCH * grid[0] * grid[1] * 3 if head == "density" else BATCH * 3
            fp32 = matmul_gflops(tokens, c, 128 if head == "density" else 512, torch.float32)
            bf16 = matmul_gflops(tokens, c, 128 if head == "density" else 512, torch.bfloat16)
            row[arm] = {"flops_per_epoch": epoch_flops * scale, "matmul_gflops_fp32": fp32,
                        "matmul_gflops_bf16": bf16, "compute_limit_epoch_s": epoch_flops * scale / fp32 / 1e9,
                        "step_ms_fp32": step_ms(head, c, tuple(grid), BATCH, False),
                        "step_ms_bf16_autocast": step_ms(head, c, tuple(grid), BATCH, True)}
        f = child([sys.executable, __file__, "--full-epoch", str(full), str(data), head])
        row["full"].update(f, epoch_s_at_357=f["epoch_s"] * scale,
                           bytes_read_per_epoch=bytes_per_epoch(full, n, bool(f.get("preloaded"))) * scale,
                           default_run_s="extrapolated",
                           default_run_s_at_357=(f["prep_s"] + FOLDS * (EPOCHS * f["epoch_s"] + f["predict_s"]))
                           * scale)
        run = work / key / f"run_{head}"
        shutil.rmtree(run, ignore_errors=True)
        epochs = ["--epochs", "2"] if quick else []
        r = child([sys.executable, "-m", "biomass_cache", "train", "--cache", str(reduced), "--data", str(data),
                   "--head", head, "--folds", str(FOLDS), "--out", str(run), "--no-plots", *epochs])
        hist = pd.read_csv(run / "history.csv")
        metrics = json.loads((run / "metrics.json").read_text())
        run_epochs = int(hist["epoch"].max())
        row["reduced"].update(r, epoch_s=float(hist["seconds"].median()), epochs=run_epochs,
                              epoch_s_at_357=float(hist["seconds"].median()) * scale, bytes_read_per_epoch=0,
                              default_run_s="measured" if not quick and scale == 1 else "extrapolated",
                              default_run_s_at_357=r["wall_s"] * scale * EPOCHS / run_epochs,
                              oof_competition_r2=metrics["competition_r2"])
        row["reduced"]["with_reduce_s_at_357"] = row["reduced"]["default_run_s_at_357"] + red["wall_s"] * scale
        row["speedup"] = row["full"]["default_run_s_at_357"] / row["reduced"]["with_reduce_s_at_357"]
        result["heads"][head] = row
        print(f"{name} {head}: full {row['full']['default_run_s_at_357'] / 60:.1f} min (extrapolated), reduced "
              f"{row['reduced']['with_reduce_s_at_357'] / 60:.1f} min with the reduction "
              f"({row['reduced']['default_run_s']}), {row['speedup']:.1f}x", flush=True)
    return result


def main() -> None:
    keep_freed_memory()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="24 images, ViT-L only, 2 epochs (a smoke run)")
    ap.add_argument("--images", type=int, default=None, help=f"images per store ({REAL_IMAGES}; --quick: 24)")
    ap.add_argument("--images-vit7b", type=int, default=None, help="images of the ViT-7B store (--images)")
    ap.add_argument("--shapes", default="vitl,vit7b", help="comma-separated: vitl, vit7b")
    ap.add_argument("--heads", default="density,mlp")
    ap.add_argument("--work", type=Path, default=None, help="folder for the stores (kept; a store is reused)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--full-epoch", nargs=3, metavar=("STORE", "DATA", "HEAD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full_epoch:
        full_epoch(*args.full_epoch)
        return
    n = args.images or (24 if args.quick else REAL_IMAGES)
    shapes = ["vitl"] if args.quick else [s.strip() for s in args.shapes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    t0 = time.perf_counter()
    sizes = {s: (args.images_vit7b or n) if s == "vit7b" else n for s in shapes}
    results = [run_shape(s, sizes[s], work, [h.strip() for h in args.heads.split(",")], args.quick) for s in shapes]
    write_json(args.out, {
        "settings": {"images": sizes, "scaled_to": REAL_IMAGES, "folds": FOLDS, "epochs": EPOCHS, "batch_size": BATCH,
                     "quick": args.quick, "signal": "planted (noise bank + per-patch densities), not DINOv3 tokens",
                     "train": "biomass train defaults", "reduce": "biomass reduce defaults"},
        "shapes": results,
        "wall_s": time.perf_counter() - t0,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
    })
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
