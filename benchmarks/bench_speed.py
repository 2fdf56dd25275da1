"""Cache vs live: epoch time of the same head trained on cached tokens or with the backbone run live.

Both arms run stage two's own loop (`train.loop.train_fold`) over the same loader, so the batches, head, optimizer,
losses (mixup, UW, PCGrad, aux tasks) and EMA are identical; only `tokens_fn` differs: the cached arm moves the
preloaded float16 tokens of the batch, the live arm decodes the batch's photos, makes the clean view and runs the
frozen ViT-S (random weights, no grad) on them. For the `density` head (a per-patch MLP on every token of 3 layers:
the heaviest head step) and the `mlp` head (pooled tokens), each with the default recipe and the reference one.
The first epoch pays for warm-up; the median of the others is reported. The cached arm runs 6 epochs (they are
cheap and, at a fraction of a second each, noisy), the live arm 2.

    python benchmarks/bench_speed.py [--quick] [--out benchmarks/results/speed.json] [--threads N]
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
import torch

from biomass_cache.backbone.vit import create_backbone, forward_tokens
from biomass_cache.common.data import read_long_csv
from biomass_cache.train.dataset import AuxSpec, TokenDataset, make_loader
from biomass_cache.extract.pipeline import extract
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.common.io import write_json
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.store.layout import open_store
from biomass_cache.synth.generate import generate
from biomass_cache.train.loop import build_member, fit_zscore, train_fold
from biomass_cache.train.config import TrainConfig
from biomass_cache.backbone.views import ViewPolicy, load_photo, make_view

OUT = Path(__file__).parent / "results" / "speed.json"
BACKBONE, SIZE, LAYERS, PHOTO = "vit_small_patch16_dinov3", (448, 224), [5, 8, 11], (1000, 500)
GOAL = 50.0
RECIPES = {"default": {},  # TrainConfig's (plain losses)
           "reference (mixup, UW, PCGrad, aux)": dict(mixup=True, uw=True, pcgrad=True, aux=True)}


class LiveTokens:
    """tokens_fn of the live arm: batch rows -> photos -> clean view -> frozen backbone -> (B, L, T, C)."""

    def __init__(self, table, data: Path):
        self.table, self.data = table, data
        self.bb = create_backbone(BACKBONE, "random", seed=0)
        self.policy = ViewPolicy()

    @torch.no_grad()
    def __call__(self, batch: dict) -> torch.Tensor:
        views = []
        for r in batch["index"].tolist():
            image = load_photo(self.data / self.table["image_path"].iloc[r], SIZE, self.policy)
            views.append(make_view(image, self.table["image_id"].iloc[r], 0, 0, SIZE, self.policy))
        return forward_tokens(self.bb, torch.stack(views), LAYERS, norm=True)[0]


def epoch_seconds(cache: Path, data: Path, cfg: TrainConfig, tokens_fn, desc: str) -> list[float]:
    """Train one `cfg.head` member for `cfg.epochs` on every image (one shuffled loader, view 0); return each
    epoch's seconds."""
    store, table = open_store(cache), read_long_csv(data / "train.csv")
    rows = np.arange(len(table))
    aux = AuxSpec.fit(table, rows)
    ds = TokenDataset(store, table, rows, LAYERS, train=True, seed=0, preload=True, aux=aux)
    loader = make_loader(ds, cfg.batch_size, shuffle=True, seed=0, workers=0)
    member = build_member(cfg.head, cfg, LAYERS, {"channels": store.channels, "grid": list(store.grid)},
                          fit_zscore(table, rows), aux, cfg.epochs * len(loader), seed=1, device=torch.device("cpu"))
    history = train_fold([member], loader, None, None, tokens_fn, cfg.epochs, desc=desc)
    return [row["seconds"] for row in history]


def main() -> None:
    keep_freed_memory()  # as every entry point does: benchmarks measure what users run
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 images, 3 cached and 2 live epochs")
    ap.add_argument("--out", type=Path, default=OUT, help="JSON results file")
    ap.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))), help="torch CPU threads")
    args = ap.parse_args()
    n_images, cache_epochs, live_epochs = (16, 3, 2) if args.quick else (32, 6, 2)
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    data, cache = tmp / "data", tmp / "cache.zarr"
    generate(data, n_train=n_images, n_test=1, seed=0, size=PHOTO, progress=False)
    t = time.perf_counter()
    extract(ExtractConfig(data_dir=data, out=cache, backbone=BACKBONE, weights="random", size=SIZE, layers=LAYERS,
                          views=1, seed=0, device="cpu", num_workers=1), progress=False)
    extract_s = time.perf_counter() - t
    live = LiveTokens(read_long_csv(data / "train.csv"), data)
    base = TrainConfig(device="cpu", workers=0, threads=args.threads)
    rows = []
    for head, recipe in [(h, r) for h in ("density", "mlp") for r in RECIPES]:
        cfg = replace(base, head=head, **RECIPES[recipe])
        cached = epoch_seconds(cache, data, replace(cfg, epochs=cache_epochs), lambda b: b["tokens"],
                               f"cache {head} {recipe}")
        running = epoch_seconds(cache, data, replace(cfg, epochs=live_epochs), live, f"live {head} {recipe}")
        cache_s, live_s = float(np.median(cached[1:])), float(np.median(running[1:]))
        rows.append({"head": head, "recipe": recipe, "cache_epoch_s": cache_s, "live_epoch_s": live_s,
                     "speedup": live_s / cache_s, "all_cache_epochs_s": cached, "all_live_epochs_s": running})
    result = {
        "settings": {"backbone": f"{BACKBONE} (random weights)", "size": list(SIZE), "photo": list(PHOTO),
                     "layers": LAYERS, "images": n_images, "batch_size": base.batch_size,
                     "epochs": {"cache": cache_epochs, "live": live_epochs},
                     "heads": "density (hidden 128), mlp (hidden 512); TrainConfig defaults + EMA",
                     "torch_threads": args.threads, "device": "cpu"},
        "rows": rows,
        "goal": GOAL,
        "extract_s": extract_s,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__},
    }
    write_json(args.out, result)
    print("\n| head | recipe | epoch from cache (s) | epoch live backbone (s) | speed-up | goal |\n"
          "|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['head']} | {r['recipe']} | {r['cache_epoch_s']:.2f} | {r['live_epoch_s']:.2f} | "
              f"{r['speedup']:.0f}x | {'met' if r['speedup'] >= GOAL else 'NOT met'} (>= {GOAL:.0f}x) |")
    print(f"\n{n_images} images, one-off extraction {extract_s:.1f} s; results -> {args.out}")


if __name__ == "__main__":
    main()
