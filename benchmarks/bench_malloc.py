"""Allocator benchmark: glibc's default malloc against the fixed thresholds that every entry point sets
(`biomass_cache.common.runtime.keep_freed_memory`), for the bare ViT-S forward on the CPU and for a whole extract() call.

The setting lasts a process's lifetime, so each measurement is a child process that runs several passes in a row:
the forward over the same pre-built batches, or extract() over the same synthetic photos (overwriting its store).
Children alternate between the two settings; the ratio of their median pass times is the speed-up. Page faults and
kernel time are the main process's (extract()'s DataLoader workers are not counted).

    python benchmarks/bench_malloc.py [--quick]

Writes benchmarks/results/malloc.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from biomass_cache.common.io import write_json
from biomass_cache.synth.generate import generate

BACKBONE, SIZE, LAYERS, BATCH = "vit_small_patch16_dinov3", (448, 224), [5, 8, 11], 8
CHILD = """
import json, resource, sys, time
from pathlib import Path
import torch
from biomass_cache.backbone.vit import create_backbone, forward_tokens
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.extract.pipeline import extract
from biomass_cache.common.runtime import keep_freed_memory
mode, what, views, passes, data = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
tuned = keep_freed_memory() if mode == "tuned" else False
if what == "forward":
    backbone = create_backbone({backbone!r}, "random", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn({batch}, 3, {h}, {w}, generator=g) for _ in range(views // {batch})]
    with torch.inference_mode():
        forward_tokens(backbone, batches[0], {layers}, True)
    def one_pass():
        with torch.inference_mode():
            for x in batches:
                forward_tokens(backbone, x, {layers}, True)
else:  # the whole extract() call, workers and writers included, over views // 2 images
    cfg = ExtractConfig(data_dir=data, out=data.parent / f"tokens_{{mode}}.zarr", size=({w}, {h}), layers={layers},
                        views=2, batch_size={batch}, num_workers=2, device="cpu", overwrite=True)
    def one_pass():
        extract(cfg, progress=False)
out = []
for _ in range(passes):
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    one_pass()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.append({{"s": time.perf_counter() - t, "sys_s": r1.ru_stime - r0.ru_stime, "faults": r1.ru_minflt - r0.ru_minflt}})
print(json.dumps({{"tuned": tuned, "passes": out, "max_rss_mb": r1.ru_maxrss / 1024}}))
""".format(backbone=BACKBONE, batch=BATCH, h=SIZE[1], w=SIZE[0], layers=LAYERS)


def child(mode: str, what: str, views: int, passes: int, data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CHILD, mode, what, str(views), str(passes), str(data)], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]], views: int) -> dict:
    out = {}
    for mode, rs in runs.items():
        ps = [p for r in rs for p in r["passes"]]
        out[mode] = {"median_pass_s": statistics.median(p["s"] for p in ps),
                     "ms_per_view": 1e3 * statistics.median(p["s"] for p in ps) / views,
                     "faults_per_view": statistics.median(p["faults"] for p in ps) / views,
                     "kernel_share": statistics.median(p["sys_s"] / p["s"] for p in ps) / torch.get_num_threads(),
                     "max_rss_mb": statistics.median(r["max_rss_mb"] for r in rs),
                     "pass_s": [[round(p["s"], 3) for p in r["passes"]] for r in rs]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one child per setting, 2 passes of 16 views")
    ap.add_argument("--children", type=int, default=3, help="child processes per setting")
    ap.add_argument("--passes", type=int, default=4, help="passes over the batches in each child")
    ap.add_argument("--views", type=int, default=48, help="views per pass (multiple of the batch of 8)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_malloc"), help="scratch folder (deleted)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "malloc.json")
    args = ap.parse_args()
    children, passes, views = (1, 2, 16) if args.quick else (args.children, args.passes, args.views)

    shutil.rmtree(args.dir, ignore_errors=True)
    generate(args.dir / "data", n_train=views // 2, n_test=1, seed=0, size=(2000, 1000), progress=False)
    results = {}
    for what in ("forward", "extract"):
        runs: dict[str, list[dict]] = {"default": [], "tuned": []}
        for k in range(children):  # alternating order: drift hits both settings alike
            for mode in ("default", "tuned") if k % 2 == 0 else ("tuned", "default"):
                runs[mode].append(child(mode, what, views, passes, args.dir / "data"))
        if not all(r["tuned"] for r in runs["tuned"]):
            sys.exit("keep_freed_memory() did not apply here (not glibc, or MALLOC_* settings in the environment)")
        summary = summarise(runs, views)
        results[what] = {"speedup": summary["default"]["median_pass_s"] / summary["tuned"]["median_pass_s"],
                         "settings": summary}
    shutil.rmtree(args.dir, ignore_errors=True)
    result = {"backbone": BACKBONE, "weights": "random", "size": list(SIZE), "batch_views": BATCH,
              "views_per_pass": views, "passes_per_child": passes, "children_per_setting": children,
              "torch_threads": torch.get_num_threads(), "results": results,
              "machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
                          "torch": torch.__version__}}
    write_json(args.out, result)
    print(f"ViT-S random weights, {SIZE[0]}x{SIZE[1]}, batches of {BATCH} views, {views} views per pass, "
          f"{passes} passes in each of {children} child processes per setting\n")
    print("| measured | malloc | ms per view (median pass) | minor faults per view | kernel time / (wall x threads) "
          "| peak RSS (main process) | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for what, r in results.items():
        name = "bare forward" if what == "forward" else "whole extract() call (2 workers)"
        for mode, s in r["settings"].items():
            speedup = f"{r['speedup']:.3f}x" if mode == "tuned" else ""
            print(f"| {name} | {mode} | {s['ms_per_view']:.1f} | {s['faults_per_view']:,.0f} | "
                  f"{100 * s['kernel_share']:.1f} % | {s['max_rss_mb']:.0f} MB | {speedup} |")


if __name__ == "__main__":
    main()
