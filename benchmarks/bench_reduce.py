"""`biomass reduce` at the ViT-L shape: this tree against the command when issue #29 was filed, side by side.

A float16 store of ViT-L-shaped tokens (3 layers x 1800 tokens (30 x 60 grid) x 1024 channels, 4 views) is reduced
with the defaults (PCA 128 channels, 2 x 2 pooling) by two arms, each in its own process, in alternating order per
rep:

- before: the code of `--baseline` (commit 1ba0193, a git worktree in --dir): every token projected, then pooled;
  each image read as float32, reduced and written in turn on the main thread, torch's threads within each op;
- now: this tree, as `biomass reduce` runs it: the stored float16 values normed and pooled in float16, then
  projected (`Reduction.apply`), whole images on one thread per core (`in_threads`), writer threads behind; the
  fit's Gram matrices in bf16 where the CPU has it, computed in those threads, and its normed, pooled clean views
  kept and projected in the reduction instead of read again.

Per arm, per image: the whole command (`fit_reduction` + `reduce_store`: read, layer norm, pooling, projection,
write) and its two parts, and the transform alone on one view as the arm reads it (float32 before, stored values
now); beside them the store's read rate alone (the limit of a reduction that does no arithmetic), and the largest
difference between the now arm's store and the before arm's order (every token projected, in float32) under the
now arm's projection (each arm fits its own PCA, and random tokens have no stable minor components). `--cores 1` runs
both arms on one core (taskset).

    python benchmarks/bench_reduce.py [--images 64] [--reps 3] [--cores 2]

Writes benchmarks/results/reduce.json (reduce_1core.json for --cores 1). The tokens are random (shaped like ViT
features), not DINOv3 features.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_stage2 import worktree  # noqa: E402

from biomass_cache.common.io import write_json  # noqa: E402
from biomass_cache.store.layout import StoreSpec, create_store, open_store  # noqa: E402
from biomass_cache.store.reduce import Reduction, pool_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS, GRID, C, VIEWS = [11, 17, 23], (30, 60), 1024, 4

# Run by each arm's process, with that arm's code on sys.path: per-image seconds of its fit, reduce and read.
ARM = r"""
import json, sys, time
from pathlib import Path
import torch
import biomass_cache
from biomass_cache.common.runtime import keep_freed_memory
from biomass_cache.store.layout import open_store
import biomass_cache.store.reduce as R
keep_freed_memory()
src, out = open_store(sys.argv[1]), Path(sys.argv[2])
n = len(src.image_ids)
# as `biomass reduce` runs them: the fit's clean views kept for the reduction where the arm's code does that
clean = {} if hasattr(R, "keep_clean_views") and R.keep_clean_views(src) else None
kept = {} if clean is None else {"keep": clean}
t = time.perf_counter(); red = R.fit_reduction(src, progress=False, **kept); fit = time.perf_counter() - t
t = time.perf_counter()
R.reduce_store(src, red, out, overwrite=True, progress=False, **({} if clean is None else {"clean": clean}))
reduce = time.perf_counter() - t
reader = getattr(src, "read_values", None) or (lambda i, v: torch.from_numpy(src.read(i, v)))
t = time.perf_counter()
for i in range(n):
    for v in range(src.n_views):
        reader(i, v)
read = time.perf_counter() - t
sample = reader(0, 0)
red.apply(sample)
t = time.perf_counter()
for _ in range(16):
    red.apply(sample)
transform = (time.perf_counter() - t) / 16
print(json.dumps({"fit_s": fit / n, "reduce_s": reduce / n, "whole_s": (fit + reduce) / n, "read_s": read / n,
                  "transform_per_view_s": transform, "torch_threads": torch.get_num_threads(),
                  "code": str(Path(biomass_cache.__file__).parents[1])}))
"""


def project_then_pool(red: Reduction, tokens: torch.Tensor) -> torch.Tensor:
    """The before arm's order, in float32: every token layer-normed and projected, then pooled."""
    comps = torch.from_numpy(red.components)
    projected = F.layer_norm(tokens, tokens.shape[-1:]) @ comps
    return pool_tokens(projected, red.parent_grid, red.pool) - (torch.from_numpy(red.mean)[:, None] @ comps)


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


def run_arm(code: Path, src: Path, out: Path, cores: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-c", ARM, str(src), str(out)]
    if cores < (os.cpu_count() or 1):
        cmd = ["taskset", "-c", ",".join(str(c) for c in range(cores)), *cmd]
    proc = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--baseline", default="1ba0193")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_reduce"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = args.out or Path(__file__).parent / "results" / ("reduce.json" if args.cores > 1 else "reduce_1core.json")
    args.dir.mkdir(parents=True, exist_ok=True)
    code = {"before": worktree(args.baseline, args.dir), "now": ROOT}
    if code["before"] is None:
        raise SystemExit("the before arm needs the git history (a clone, not a copy of the tree)")
    src = args.dir / "full.zarr"
    make_store(src, args.images)
    runs: dict[str, list[dict]] = {arm: [] for arm in code}
    for rep in range(args.reps):
        for arm in (list(code) if rep % 2 == 0 else list(code)[::-1]):
            runs[arm].append(run_arm(code[arm], src, args.dir / f"{arm}.zarr", args.cores))
            if Path(runs[arm][-1].pop("code")).resolve() != code[arm].resolve():
                raise SystemExit(f"the {arm} arm imported another biomass_cache than {code[arm]}")
            print(arm, {k: round(v * 1e3, 1) if k.endswith("_s") else v for k, v in runs[arm][-1].items()},
                  flush=True)
    full, now = open_store(src), open_store(args.dir / "now.zarr")
    red = Reduction.of_store(now)  # each arm fits its own PCA: compare the orders under one projection
    diff = scale = 0.0
    for i in range(args.images):
        for v in range(VIEWS):
            expected = project_then_pool(red, torch.from_numpy(full.read(i, v)))
            diff = max(diff, float((torch.from_numpy(now.read(i, v)) - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
    med = {arm: {k: float(np.median([r[k] for r in rs])) for k in rs[0]} for arm, rs in runs.items()}
    result = {
        "what": "biomass reduce defaults (PCA 128, pool 2) on a float16 ViT-L-shaped store: seconds per image of "
                "4 views (transform: per view)",
        "shape": {"layers": LAYERS, "grid": list(GRID), "channels": C, "views": VIEWS, "images": args.images},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": args.cores},
        "baseline": args.baseline, "reps": args.reps,
        "per_image_s": med,
        "speedup_whole": med["before"]["whole_s"] / med["now"]["whole_s"],
        "speedup_reduce": med["before"]["reduce_s"] / med["now"]["reduce_s"],
        "speedup_fit": med["before"]["fit_s"] / med["now"]["fit_s"],
        "speedup_transform": med["before"]["transform_per_view_s"] / med["now"]["transform_per_view_s"],
        "max_abs_difference": diff, "max_abs_value": scale,
        "tokens": "random, shaped like ViT features (not DINOv3 features)",
    }
    write_json(out, result)
    before, now = med["before"], med["now"]
    print(f"per image on {args.cores} core(s): before {before['whole_s'] * 1e3:.0f} ms (fit {before['fit_s'] * 1e3:.0f}"
          f", reduce {before['reduce_s'] * 1e3:.0f}), now {now['whole_s'] * 1e3:.0f} ms (fit {now['fit_s'] * 1e3:.0f}"
          f", reduce {now['reduce_s'] * 1e3:.0f}); reading alone {before['read_s'] * 1e3:.0f} ms as float32, "
          f"{now['read_s'] * 1e3:.0f} ms as stored; {result['speedup_whole']:.2f}x whole, "
          f"{result['speedup_transform']:.2f}x transform; max |diff| {diff:.2e} of values up to {scale:.1f}")
    shutil.rmtree(src, ignore_errors=True)
    for arm in code:
        shutil.rmtree(args.dir / f"{arm}.zarr", ignore_errors=True)


if __name__ == "__main__":
    main()
