"""Stage one's host pipeline at the real shape, with a zero-cost stand-in for the backbone.

`extract()` runs as it does for real (DataLoader workers decoding synthetic 2000 x 1000 JPEGs and building 960 x 480
views, the transfer, the sinks, the writer threads, fsync), but the backbone's forward returns a fixed tensor of
ViT-L's output shape (3 layers x 1800 patches + 5 prefix tokens x 1024 channels) without computing anything. So the
views/s measured is what the host side can feed, the ceiling of any GPU's end-to-end rate on this machine, per core:

- full: the full float16 store (11.1 MB per view), beside this disk's own write rate (plain 64 MB writes + fsync);
- reduced: `--reduce` (PCA 128 channels, 2 x 2 pooling; the layer norm, pooling and projection run on this CPU,
  where a GPU would run them on the device), and the bytes it writes per view.

Per arm: views/s, views/s per core, the loop's time by part (`stages_s`), bytes on disk per view. The tokens are
random (the stand-in's), so nothing here says anything about features.

    python benchmarks/bench_host.py [--images 48] [--workers N] [--dir /tmp/bench_host]

Writes benchmarks/results/host.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from biomass_cache.common.io import write_json
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.extract import loop
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.extract.pipeline import extract
from biomass_cache.store.layout import open_store
from biomass_cache.synth.generate import generate

STANDIN = dict(depth=3, embed_dim=1024, num_heads=16)  # ViT-L's width; the blocks never run
SIZE, VIEWS, LAYERS, BATCH = (960, 480), 4, [0, 1, 2], 16


def standin_forward(tokens: torch.Tensor, prefix: torch.Tensor):
    """forward_tokens' replacement: the fixed output, expanded to the batch (no arithmetic, no copy)."""
    def forward(backbone, pixels, layers, norm=True, tiles=1):
        b = pixels.shape[0]
        return tokens.expand(b, *tokens.shape[1:]), prefix.expand(b, *prefix.shape[1:])
    return forward


def disk_write_rate(folder: Path, total: int = 1 << 30, chunk: int = 64 << 20) -> float:
    """Bytes/s of plain writes of `chunk` bytes into one file, fsynced at the end (this disk's limit for a store)."""
    path, data = folder / "disk_rate.bin", os.urandom(chunk)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(total // chunk):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    rate = total / (time.perf_counter() - t)
    path.unlink()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the extract default)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_host"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "host.json")
    args = ap.parse_args()
    keep_freed_memory()
    data = args.dir / "data"
    if not (data / "train.csv").is_file():
        generate(data, n_train=args.images, n_test=1, seed=0, size=(2000, 1000), progress=False)
    grid = (SIZE[1] // 16, SIZE[0] // 16)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, len(LAYERS), grid[0] * grid[1], STANDIN["embed_dim"], generator=g)
    prefix = torch.randn(1, len(LAYERS), 5, STANDIN["embed_dim"], generator=g)
    loop.forward_tokens = standin_forward(tokens, prefix)
    cores = len(os.sched_getaffinity(0))
    workers = {} if args.workers is None else {"num_workers": args.workers}
    result = {"settings": {"images": args.images, "views": VIEWS, "size": list(SIZE), "layers": len(LAYERS),
                           "channels": STANDIN["embed_dim"], "batch_size": BATCH, "photos": "synthetic 2000 x 1000",
                           "workers": args.workers or ExtractConfig(data_dir=".", out=".").num_workers},
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores,
                          "torch_threads": torch.get_num_threads()},
              "disk_write_bytes_per_s": disk_write_rate(args.dir),
              "backbone": "stand-in: a fixed ViT-L-shaped output, no forward computed", "arms": {}}
    for arm, extra in (("full", {}), ("reduced", {"reduce": True, "dim": 128, "pool": 2})):
        out = args.dir / f"{arm}.zarr"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ExtractConfig(data_dir=data, out=out, backbone="vit_large_patch16_dinov3", weights="random",
                            overrides=STANDIN, size=SIZE, layers=LAYERS, views=VIEWS, batch_size=BATCH,
                            device="cpu", precision="fp32", **workers, **extra)
        s = extract(cfg, progress=False)
        views = args.images * VIEWS
        store = open_store(out)
        row = {"loop_s": s["loop_s"], "views_per_s": views / s["loop_s"],
               "views_per_s_per_core": views / s["loop_s"] / cores, "stages_s": s["stages_s"],
               "bytes_per_view": store.nbytes_on_disk() / views,
               "write_bytes_per_s": store.nbytes_on_disk() / s["loop_s"]}
        result["arms"][arm] = row
        print(arm, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        shutil.rmtree(out, ignore_errors=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
