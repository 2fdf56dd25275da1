"""`biomass reduce` at the ViT-L shape: pooling before projecting against projecting before pooling, side by side.

A float16 store of ViT-L-shaped tokens (3 layers x 1800 tokens (30 x 60 grid) x 1024 channels, 4 views) is reduced
with the defaults (PCA 128 channels, 2 x 2 pooling) twice in one process, in alternating order per rep:

- before: the previous command: the projection applied to every token, then pooled, each image read, reduced and
  written in turn on one thread;
- now: `reduce_store`: pooled first, then projected (`Reduction.apply`), with a thread reading ahead and writer
  threads writing behind.

Per arm: the whole `reduce_store` (read, layer norm, pooling, projection, write) and the transform alone, per image;
beside them the store's read rate alone (the limit of a reduction that does no arithmetic) and the largest
difference between the two arms' stores (they compute the same linear map in another order).

    python benchmarks/bench_reduce.py [--images 24] [--reps 3]

Writes benchmarks/results/reduce.json. The tokens are random (shaped like ViT features), not DINOv3 features.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from biomass_cache.common.io import write_json
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.store.layout import StoreSpec, create_store, open_store
from biomass_cache.store.reduce import Reduction, fit_reduction, pool_tokens, reduce_store

LAYERS, GRID, C, VIEWS = [11, 17, 23], (30, 60), 1024, 4


def project_then_pool(red: Reduction, tokens: torch.Tensor) -> torch.Tensor:
    """The previous order: every token projected, then pooled."""
    comps = torch.from_numpy(red.components)
    projected = F.layer_norm(tokens, tokens.shape[-1:]) @ comps
    return pool_tokens(projected, red.parent_grid, red.pool) - (torch.from_numpy(red.mean)[:, None] @ comps)


def previous_loop(src, red: Reduction, out: Path) -> None:
    """The previous command's loop: read, transform and write one image after another on the main thread."""
    store = create_store(out, StoreSpec(image_ids=src.image_ids, n_views=VIEWS, layers=LAYERS, grid=red.grid,
                                        channels=red.dim, fingerprint={"bench": "before"}, split="train",
                                        dtype="float16", random_weights=True), overwrite=True)
    for i in range(len(src.image_ids)):
        store.write_image(i, torch.stack([project_then_pool(red, torch.from_numpy(src.read(i, v)))
                                          for v in range(VIEWS)]))


def make_store(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    spec = StoreSpec(image_ids=[f"img{i}" for i in range(n)], n_views=VIEWS, layers=LAYERS, grid=GRID, channels=C,
                     fingerprint={"bench": "reduce"}, split="train", dtype="float16", random_weights=True)
    store = create_store(path, spec, overwrite=True)
    basis = rng.standard_normal((32, C)).astype(np.float32)
    for i in range(n):
        coeff = rng.standard_normal((VIEWS, len(LAYERS), GRID[0] * GRID[1], 32)).astype(np.float32)
        noise = rng.standard_normal((VIEWS, len(LAYERS), GRID[0] * GRID[1], C), dtype=np.float32)
        store.write_image(i, coeff @ basis / 4 + 0.5 * noise)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_reduce"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "reduce.json")
    args = ap.parse_args()
    keep_freed_memory()
    args.dir.mkdir(parents=True, exist_ok=True)
    src_path = args.dir / "full.zarr"
    make_store(src_path, args.images)
    src = open_store(src_path)
    red = fit_reduction(src, progress=False)
    arms = {"before": project_then_pool, "now": Reduction.apply}
    times: dict[str, dict[str, list[float]]] = {a: {"store_s": [], "transform_s": []} for a in arms}
    read_s = []
    sample = torch.from_numpy(src.read(0, 0))
    for rep in range(args.reps):
        t = time.perf_counter()
        for i in range(args.images):
            for v in range(VIEWS):
                src.read(i, v)
        read_s.append((time.perf_counter() - t) / args.images)
        for arm in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            fn = arms[arm]
            t = time.perf_counter()
            for _ in range(VIEWS * 4):
                fn(red, sample)
            times[arm]["transform_s"].append((time.perf_counter() - t) / 4)
            t = time.perf_counter()
            if arm == "now":
                reduce_store(src, red, args.dir / "now.zarr", overwrite=True, progress=False)
            else:
                previous_loop(src, red, args.dir / "before.zarr")
            times[arm]["store_s"].append((time.perf_counter() - t) / args.images)
    a, b = open_store(args.dir / "before.zarr"), open_store(args.dir / "now.zarr")
    diff = max(float(np.abs(a.read(i, v) - b.read(i, v)).max()) for i in range(args.images) for v in range(VIEWS))
    scale = max(float(np.abs(b.read(i, 0)).max()) for i in range(args.images))
    med = {arm: {k: float(np.median(v)) for k, v in t.items()} for arm, t in times.items()}
    result = {
        "what": "biomass reduce defaults (PCA 128, pool 2) on a float16 ViT-L-shaped store, per image of 4 views",
        "shape": {"layers": LAYERS, "grid": list(GRID), "channels": C, "views": VIEWS, "images": args.images},
        "reduced": {"grid": list(red.grid), "channels": red.dim},
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "reps": args.reps,
        "per_image_s": med,
        "read_only_per_image_s": float(np.median(read_s)),
        "speedup_store": med["before"]["store_s"] / med["now"]["store_s"],
        "speedup_transform": med["before"]["transform_s"] / med["now"]["transform_s"],
        "max_abs_difference": diff, "max_abs_value": scale,
        "tokens": "random, shaped like ViT features (not DINOv3 features)",
    }
    write_json(args.out, result)
    before, now = med["before"], med["now"]
    print(f"per image: before {before['store_s'] * 1e3:.0f} ms (transform {before['transform_s'] * 1e3:.0f}"
          f" ms), now {now['store_s'] * 1e3:.0f} ms (transform {now['transform_s'] * 1e3:.0f} ms), "
          f"reading alone {result['read_only_per_image_s'] * 1e3:.0f} ms; {result['speedup_store']:.2f}x whole, "
          f"{result['speedup_transform']:.2f}x transform; max |diff| {diff:.2e} of values up to {scale:.1f}")
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
