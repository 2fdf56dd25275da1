"""Stage one: run the frozen backbone once per view of every image and cache its multi-layer patch tokens.

`extract` sets the run up (ranks, devices, precision, backbone, fingerprint) and makes the store in one pass
(extract/passes.py, the loop in extract/loop.py), or, with `reduce`, the reduced store in two (extract/inpass.py).
The forward pass runs in the precision of precision.py (by default bf16 or fp16 autocast on CUDA, fp32 on CPU), on
one device or split over several with `devices`. The store marks a sample done only after its data is on disk, so an
interrupted run resumes exactly where it stopped. Under torchrun the images are split across ranks; rank 0 creates
the stores and finalises their attributes.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import torch.distributed as dist
import zarr
from tqdm import tqdm

from biomass_cache.backbone.precision import resolve_precision
from biomass_cache.backbone.vit import create_backbone, resolve_layers
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.distributed import init_ranks, resolve_devices
from biomass_cache.common.errors import DataError
from biomass_cache.common.io import writing
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.extract.inpass import extract_reduced
from biomass_cache.extract.loop import Run, Sink
from biomass_cache.extract.passes import full_spec, items_of, missing_views, run_pass
from biomass_cache.store.fingerprint import of_extraction
from biomass_cache.store.handle import TokenStore


def default_layers(depth: int) -> list[int]:
    """The middle, three-quarter and last block (distinct, sorted)."""
    return sorted({depth // 2 - 1, 3 * depth // 4 - 1, depth - 1} - {-1})


# ---- the run -----------------------------------------------------------------------------------------------------
def extract(cfg: ExtractConfig, progress: bool = True, like_ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """Extract every missing (image, view) of `cfg.split` into `cfg.out`; returns the closing summary.

    Resumes an existing store with the same fingerprint (a different one is refused, naming the differences, unless
    `cfg.overwrite`) and appends images that are new in the CSV. Works alone or under torchrun. `like_ignore`:
    fingerprint keys in which the tokens may differ from those `cfg.like`'s projection was fitted on.
    """
    start = time.perf_counter()
    ranks, device = init_ranks(cfg.device)
    try:
        with ExitStack() as held, writing(cfg.out):  # rank 0 holds the stores' writer locks for the whole run
            run = _setup(cfg, ranks, device, progress, held)
            per_rank, store, already = extract_reduced(run, like_ignore) if cfg.reduce else _extract_full(run)
            return _finish(run, store, per_rank, already, time.perf_counter() - start)
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def _setup(cfg: ExtractConfig, ranks, device, progress: bool, held: ExitStack) -> Run:
    if cfg.devices is not None and ranks.world > 1:
        raise DataError("--devices splits one backbone over several devices; under torchrun every rank holds the "
                         "whole backbone: use one or the other")
    devices = resolve_devices(cfg.devices) if cfg.devices else [device]
    precision = resolve_precision(cfg.precision, devices[0])
    backbone = create_backbone(cfg.backbone, cfg.weights, seed=cfg.seed, overrides=cfg.overrides)
    layers = resolve_layers(cfg.layers if cfg.layers is not None else default_layers(backbone.depth), backbone.depth)
    grid = (cfg.size[1] // backbone.patch_size, cfg.size[0] // backbone.patch_size)
    csv = cfg.data_dir / f"{cfg.split}.csv"
    table = read_long_csv(csv, check_images=False)  # a missing file is a per-image error (--skip-bad)
    run = Run(cfg, ranks, devices, precision, backbone, layers, grid, table, csv,
              of_extraction(cfg, backbone, layers, grid, precision), held, progress and ranks.rank == 0,
              say=tqdm.write if ranks.rank == 0 else (lambda _msg: None))
    if backbone.weights_sha256 == "random":
        run.say("WARNING: RANDOM BACKBONE WEIGHTS: these tokens carry no pretrained features (demo / test use only)")
    return run


def _extract_full(run: Run) -> tuple[list[dict], TokenStore, int]:
    already = []

    def pending(stores: list[TokenStore]):
        already.append(int(stores[0].done().sum()))
        return items_of(run, stores[0], missing_views(run, stores[0], say_skipped=True))

    per_rank, (store,) = run_pass(run, [(run.cfg.out, full_spec(run))], lambda stores: [Sink(stores[0])], pending,
                                  f"extract {run.cfg.split}")
    return per_rank, store, already[0]


def _finish(run: Run, store: TokenStore, per_rank: list[dict], already: int, wall: float) -> dict[str, Any]:
    """Rank 0 records the timing (for `biomass bundle`'s estimates); every rank returns the summary."""
    views = sum(c["views"] for c in per_rank)
    if run.ranks.rank == 0 and views:
        zarr.open_group(store.path, mode="r+").update_attributes({"timing": {
            "seconds_per_view": max(c["loop_s"] for c in per_rank) * run.ranks.world / views,
            "on": f"{','.join(map(str, run.devices))}, {run.precision}"}})
    if not views and int(store.done().sum()) == already:  # (an in-pass reduction may write without a forward)
        run.say(f"all {already} samples of {store.path} are already done: nothing to do")
    return _summary(store, per_rank, already, wall, run.ranks.world)


def _summary(store: TokenStore, per_rank: list[dict], already: int, wall: float, world: int) -> dict[str, Any]:
    done = store.done()
    n_done = int(done.sum())
    views = sum(c["views"] for c in per_rank)
    images = sum(c["images"] for c in per_rank)
    nbytes = store.nbytes_on_disk()
    return {
        "store": str(store.path),
        "split": store.split,
        "shape": [len(store.image_ids), store.n_views, len(store.layers), store.grid[0] * store.grid[1],
                  store.channels],
        "layers": store.layers,
        "storage_dtype": store.storage_dtype,
        "samples_done": n_done,
        "samples_total": int(done.size),
        "views_extracted": views,
        "images_extracted": images,
        "already_done": already,
        "bad_ids": store.bad_ids,
        "bytes_on_disk": nbytes,
        "bytes_per_image_view": nbytes / n_done if n_done else None,
        "wall_s": wall,  # the whole call: backbone creation, store preparation, the loop, finalisation
        "loop_s": max(c["loop_s"] for c in per_rank),  # decode -> forward -> write, until the last write is done
        "stages_s": per_rank[0].get("stages", {}),  # rank 0's loop, part by part (loop.Stages)
        "views_per_s": views / wall,
        "images_per_s": images / wall,
        "ranks": world,
        "random_weights": store.random_weights,
    }
