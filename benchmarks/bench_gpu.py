"""Stage one and LoRA on a GPU at the real input size: throughput per compute precision, agreement with fp32, and
the split-backbone path (`--devices`).

On synthetic photos (2000 x 1000, `biomass synth`) with a randomly initialised backbone (default ViT-L/16, 960 x 480
views = 1800 tokens, 4 views, 3 layers), side by side in one process:

- extraction (`extract()`: decode workers -> forward -> encode -> Zarr) per precision fp32 / bf16 / fp16, and bf16
  with `--reduce` (the recipe's default): views/s of the loop (the backbone built and placed outside the timing)
  with its time by part (waiting for decoded batches, the forward on the device, transforms, sending, writers
  blocked), against the bare backbone forward over the same batch shape already on the GPU (the physical limit),
  and the full stores' write rate against this disk's (plain writes + fsync, measured in the same run);
- agreement of each half-precision store with the fp32 one (view 0, every layer): relative RMS error and the
  cosine similarity of tokens, after float16 storage;
- the backbone split in two (`devices=[cuda:0, cuda:0]`: the code path of several GPUs on the one GPU there is)
  against one device: the largest token difference;
- `biomass lora` at the same size (`--full`, 2 epochs): wall seconds per epoch and peak GPU memory, with and
  without gradient checkpointing;
- stage two on the device (`--stage2`, or the last step): bench_stage2.py with `--device cuda` on the reduced and
  unreduced tokens of a ViT-L-shaped store (bench_scale.py's planted signal), into stage2_gpu.json.

Random weights: the throughputs hold for the real weights (same shapes), the agreement figures do not exactly.

    python benchmarks/bench_gpu.py [--backbone NAME] [--images 357] [--work DIR] [--out FILE]
    python benchmarks/bench_gpu.py --stage2 [--stage2-epochs 20] [--stage2-heads density]
        [--stage2-arms before,bf16,seeds5]

Writes benchmarks/results/gpu.json. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from biomass_cache.backbone.vit import create_backbone, forward_tokens
from biomass_cache.extract.pipeline import default_layers, extract
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.common.io import write_json
from biomass_cache.backbone.precision import autocast
from biomass_cache.store.layout import open_store
from biomass_cache.synth.generate import generate
from bench_host import disk_write_rate  # noqa: E402  (benchmarks/ is the script's folder)

ROOT = Path(__file__).resolve().parents[1]

OUT = Path(__file__).parent / "results" / "gpu.json"
VIEWS, BATCH = 4, 32


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(backbone, layers: list[int], precision: str, size: tuple[int, int], device: torch.device,
                 reps: int = 5) -> float:
    """Views/s of the backbone alone on a batch already on the device (median of `reps` timed batches)."""
    x = torch.randn(BATCH, 3, size[1], size[0], device=device)
    times = []
    with torch.inference_mode(), autocast(precision, device):
        for k in range(reps + 1):
            sync(device)
            t = time.perf_counter()
            forward_tokens(backbone, x, layers, norm=True)
            sync(device)
            if k:  # the first batch warms up kernels and the allocator
                times.append(time.perf_counter() - t)
    return BATCH / float(np.median(times))


def extraction(args: argparse.Namespace, name: str, precision: str, **kw) -> tuple[Path, dict]:
    """One `extract()` call; its summary: the loop's seconds (decode -> forward -> write until the last write is on
    disk; the backbone's construction and placement are outside it) and its time by part (`stages_s`)."""
    out = args.work / f"{name}.zarr"
    device = {} if "devices" in kw else {"device": args.device.type}
    cfg = ExtractConfig(data_dir=args.work / "data", out=out, backbone=args.backbone, size=args.size, views=VIEWS,
                        precision=precision, batch_size=BATCH, overwrite=True, **device, **kw)
    summary = extract(cfg)
    views = args.images * VIEWS
    return out, {"loop_s": round(summary["loop_s"], 2), "wall_s": round(summary["wall_s"], 1),
                 "views_per_s": round(views / summary["loop_s"], 1), "stages_s": summary["stages_s"],
                 "bytes_per_view": round(open_store(out).nbytes_on_disk() / views),
                 "write_bytes_per_s": round(open_store(out).nbytes_on_disk() / summary["loop_s"])}


def agreement(ref: Path, other: Path) -> dict:
    a, b = open_store(ref), open_store(other)
    rel, cos = [], []
    for i in range(len(a.image_ids)):
        x, y = a.read(i, 0).astype(np.float64), b.read(i, 0).astype(np.float64)  # (L, T, C)
        rel.append(np.sqrt(((x - y) ** 2).mean(axis=(1, 2)) / (x ** 2).mean(axis=(1, 2))))
        cos.append(((x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1) + 1e-12)).mean(-1))
    return {"rel_rms_per_layer": np.mean(rel, axis=0).round(5).tolist(),
            "cosine_per_layer": np.mean(cos, axis=0).round(6).tolist(),
            "max_abs_diff": float(max(np.abs(a.read(i, 0).astype(np.float32) - b.read(i, 0).astype(np.float32)).max()
                                      for i in range(len(a.image_ids))))}


def lora_epochs(args: argparse.Namespace, checkpointing: bool) -> dict:
    """`biomass lora --full --epochs 2` in a child process; seconds per epoch from its wall time and peak memory."""
    out = args.work / f"lora_{int(checkpointing)}"
    flag = "--grad-checkpointing" if checkpointing else "--no-grad-checkpointing"
    code = ("import sys, torch; sys.argv = ['biomass'] + sys.argv[1:]; "
            "from biomass_cache.cli import main\n"
            "try: main()\nexcept SystemExit as e: code = e.code\nelse: code = 0\n"
            "print('PEAK_GB', torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0)\n"
            "sys.exit(code)")
    cmd = [sys.executable, "-c", code, "lora", "--data", str(args.work / "data"), "--out", str(out),
           "--backbone", args.backbone, "--weights", "random", "--size", f"{args.size[0]}x{args.size[1]}",
           "--layers", ",".join(map(str, args.layers)), "--full",
           "--epochs", "2", flag, "--batch-size", "16", "--device", args.device.type, "--no-plots", "--overwrite"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    peak = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("PEAK_GB")]
    if proc.returncode:
        return {"error": (proc.stdout + proc.stderr)[-1500:]}
    return {"wall_s": round(wall, 1), "peak_gpu_gb": round(peak[0], 2) if peak else None}


def stage_two(args: argparse.Namespace) -> dict:
    """bench_stage2.py on this GPU: the reduced and the unreduced ViT-L-shaped store (357 images), `--stage2-heads`,
    `--stage2-arms` (an earlier commit's loop against this code), `--stage2-epochs` per run (a lent machine's device
    time is short). Writes benchmarks/results/stage2_gpu.json; returns its summaries."""
    out = OUT.with_name("stage2_gpu.json")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_stage2.py"), "--device", str(args.device), "--stores",
           "reduced,full", "--heads", args.stage2_heads, "--arms", args.stage2_arms, "--seeds", "0", "--epochs",
           str(args.stage2_epochs), "--images", str(args.stage2_images),
           "--work", str(args.work / "stage2"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT / "benchmarks")
    if proc.returncode or not out.is_file():
        return {"error": f"bench_stage2.py exited {proc.returncode}"}
    stores = json.loads(out.read_text())["stores"]
    return {name: {head: h.get("summary") for head, h in store["heads"].items()} for name, store in stores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vit_large_patch16_dinov3")
    ap.add_argument("--images", type=int, default=357)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--size", default="960x480", help="backbone input WxH")
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run of the script)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: extract (and split), split, lora, stage2")
    ap.add_argument("--stage2", action="store_true", help="stage two only (bench_stage2.py on this GPU)")
    ap.add_argument("--stage2-epochs", type=int, default=20, help="epochs per stage-two run (the default run: 120)")
    ap.add_argument("--stage2-heads", default="density", help="heads of the stage-two runs (density,mlp,vitdet)")
    ap.add_argument("--stage2-arms", default="before,bf16,seeds5",
                    help="stage-two arms (before,fp32,bf16,stacked,seeds5)")
    ap.add_argument("--stage2-images", type=int, default=357, help="images of the stage-two stores")
    args = ap.parse_args()
    args.size, args.device = tuple(int(v) for v in args.size.split("x")), torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: bench_gpu.py needs a CUDA GPU (or --device cpu for a smoke run)")
    if args.stage2:  # stage two alone: its own results file, gpu.json untouched
        print("stage2", json.dumps(stage_two(args)), flush=True)
        return
    skip = set(filter(None, args.skip.split(",")))
    if not (args.work / "data" / "train.csv").is_file():
        generate(args.work / "data", n_train=args.images, n_test=4, seed=0, size=(2000, 1000))
    gpu = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "none (cpu smoke run)"
    result = {"settings": {"backbone": args.backbone, "weights": "random", "size": list(args.size), "views": VIEWS,
                           "batch_size": BATCH, "images": args.images, "photos": "synthetic 2000 x 1000"},
              "machine": {"gpu": gpu, "torch": torch.__version__,
                          "cuda": torch.version.cuda, "python": platform.python_version()}}

    backbone = create_backbone(args.backbone)
    layers = args.layers = default_layers(backbone.depth)  # the extraction default; LoRA reads the same blocks
    backbone.model.to(args.device)
    result["extract"] = {}
    stores = {}
    result["disk_write_bytes_per_s"] = round(disk_write_rate(args.work))
    for precision in ("fp32", "bf16", "fp16"):
        if "extract" in skip:
            break
        bare = bare_forward(backbone, layers, precision, args.size, args.device)
        stores[precision], row = extraction(args, precision, precision)
        row = {"bare_views_per_s": round(bare, 1), **row, "of_bare": round(row["views_per_s"] / bare, 3),
               "of_disk_rate": round(row["write_bytes_per_s"] / result["disk_write_bytes_per_s"], 3)}
        result["extract"][precision] = row
        print(precision, json.dumps(row), flush=True)
        write_json(args.out, result)  # after every step: a run cut short keeps what it measured
    if "extract" not in skip:  # the recipe's default: reduced in the pass (both phases in the loop's seconds)
        bare = bare_forward(backbone, layers, "bf16", args.size, args.device)
        _, row = extraction(args, "bf16_reduce", "bf16", reduce=True)
        result["extract"]["bf16_reduce"] = {"bare_views_per_s": round(bare, 1), **row,
                                            "of_bare": round(row["views_per_s"] / bare, 3)}
        print("bf16 --reduce", json.dumps(result["extract"]["bf16_reduce"]), flush=True)
        write_json(args.out, result)
    del backbone
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    for precision in ("bf16", "fp16") if "extract" not in skip else ():
        result["extract"][precision]["vs_fp32"] = agreement(stores["fp32"], stores[precision])
        print(precision, "vs fp32", json.dumps(result["extract"][precision]["vs_fp32"]), flush=True)

    if "split" not in skip and "extract" not in skip:
        devices = [str(args.device)] * 2
        split, row = extraction(args, "split", "fp32", devices=devices)
        result["split"] = {"devices": devices, "loop_s": row["loop_s"],
                           "vs_one_device": agreement(stores["fp32"], split)}
        print("split", json.dumps(result["split"]), flush=True)
        write_json(args.out, result)
    if "lora" not in skip:
        result["lora"] = {"epochs": 2, "images": args.images, "batch_size": 16}
        for ckpt in (True, False):
            row = lora_epochs(args, ckpt)
            result["lora"]["grad_checkpointing" if ckpt else "no_checkpointing"] = row
            print("lora", ckpt, json.dumps(row), flush=True)
            write_json(args.out, result)
    if "stage2" not in skip:
        result["stage2"] = stage_two(args)
        print("stage2", json.dumps(result["stage2"]), flush=True)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
