"""Epoch time of the three ways to train on the same images (ViT-S/16 random weights, small images, CPU or GPU):

- frozen cache: stage two on tokens extracted once (no backbone in the loop);
- LoRA live: the whole backbone forward + backward through the adapted blocks, fresh augmentations every epoch;
- LoRA prefix cache: only the adapted blocks run, on stored hidden states.

Writes benchmarks/results/lora.json and prints a markdown table. `python benchmarks/bench_lora.py` (< 3 min on CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from biomass_cache.backbone.vit import create_backbone
from biomass_cache.train.crossval import run_training
from biomass_cache.common.data import read_long_csv
from biomass_cache.extract.pipeline import extract
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.common.io import write_json
from biomass_cache.lora import LiveTokens, LoraSettings, build_prefix_cache, inject_lora, run_lora
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.synth.generate import generate
from biomass_cache.train.config import TrainConfig

N_IMAGES, SIZE, LAYERS, BLOCKS, EPOCHS = 16, (224, 112), [7, 9, 11], 4, 2
OUT = Path(__file__).parent / "results"


def epoch_seconds(run_dir: Path) -> float:
    """The last epoch (the first pays for warm-up)."""
    return float(pd.read_csv(run_dir / "history.csv")["seconds"].iloc[-1])


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    keep_freed_memory()  # as every entry point does: benchmarks measure what users run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))
    data = tmp / "data"
    generate(data, n_train=N_IMAGES, n_test=1, seed=0, size=(448, 224), progress=False)
    cfg = TrainConfig(head="density", full=True, epochs=EPOCHS, batch_size=8, workers=0, device=device)
    s = LoraSettings(size=SIZE, layers=LAYERS, blocks=BLOCKS, prefix_views=2)
    rows = []

    t = time.perf_counter()
    extract(ExtractConfig(data_dir=data, out=tmp / "cache", size=SIZE, layers=LAYERS, views=2, device=device,
                          num_workers=0), progress=False)
    build = time.perf_counter() - t
    run_training(tmp / "cache", data, tmp / "frozen", cfg, {"density": cfg})
    rows.append({"method": "frozen cache (stage two)", "epoch_s": epoch_seconds(tmp / "frozen"), "build_s": build})

    run_lora(data, tmp / "live", cfg, s, progress=False)
    rows.append({"method": f"LoRA live (last {BLOCKS} blocks)", "epoch_s": epoch_seconds(tmp / "live"), "build_s": 0.0})

    bb = create_backbone(s.backbone, s.weights)
    inject_lora(bb, s)
    t = time.perf_counter()
    build_prefix_cache(tmp / "prefix", read_long_csv(data / "train.csv"), data, LiveTokens(bb, s, torch.device(device)),
                       progress=False)
    build = time.perf_counter() - t
    run_lora(data, tmp / "prefix_run", cfg, replace(s, prefix_cache=str(tmp / "prefix")), progress=False)
    rows.append({"method": "LoRA prefix cache", "epoch_s": epoch_seconds(tmp / "prefix_run"), "build_s": build})

    live = rows[1]["epoch_s"]
    for r in rows:
        r["speedup_vs_live"] = live / r["epoch_s"]
    result = {"device": device, "torch_threads": torch.get_num_threads(), "backbone": s.backbone + " (random)",
              "images": N_IMAGES, "size": list(SIZE), "layers": LAYERS, "adapted_blocks": BLOCKS,
              "batch_size": cfg.batch_size, "epochs": EPOCHS, "rows": rows}
    write_json(OUT / "lora.json", result)
    print(f"\n{N_IMAGES} images {SIZE[0]}x{SIZE[1]}, {s.backbone} random, {device}, batch {cfg.batch_size}\n")
    print("| method | epoch (s) | speed-up vs live | one-off build (s) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['epoch_s']:.2f} | {r['speedup_vs_live']:.1f}x | {r['build_s']:.1f} |")


if __name__ == "__main__":
    main()
