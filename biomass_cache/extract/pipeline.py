"""Stage one: run the frozen backbone once per view of every image and cache its multi-layer patch tokens.

The pipeline overlaps its three parts so the backbone never waits: DataLoader workers decode JPEGs and build the
views, the main process runs the forward pass (in the precision of precision.py: by default bf16 or fp16
autocast on CUDA, fp32 on CPU; on one device, or split over several with `devices`), and writer threads fed through
a bounded queue encode and write each image's shard. The store marks a sample done only after its data is on disk,
so an interrupted run resumes exactly where it stopped. Under torchrun the images are split across ranks (all views
of an image on one rank, the store's race-free rule); rank 0 creates the store and finalises its attributes.
The writer threads are in store/writer.py.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import zarr
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from biomass_cache.backbone.precision import autocast, check_finite, resolve_precision
from biomass_cache.backbone.views import load_photo, make_view
from biomass_cache.backbone.vit import Backbone, create_backbone, forward_tokens, place_backbone, resolve_layers
from biomass_cache.common.content import content_hashes
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.distributed import Ranks, init_ranks, resolve_devices
from biomass_cache.common.errors import DataError, StoreError
from biomass_cache.common.io import writing
from biomass_cache.common.signals import check_stop
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.store.fingerprint import Fingerprint, of_extraction
from biomass_cache.store.handle import TokenStore
from biomass_cache.store.layout import StoreSpec, create_store, open_store, remove_leftovers
from biomass_cache.store.writer import Writer
from biomass_cache.common.lock import WriterLock
from biomass_cache.store.verify import verify

WRITER_THREADS = 2  # shards of different images are independent files: two writers keep up with a fast GPU
QUEUE_BATCHES = 4  # batches computed ahead of the writers (bounds the memory held by finished tokens)



def default_layers(depth: int) -> list[int]:
    """The middle, three-quarter and last block (distinct, sorted)."""
    return sorted({depth // 2 - 1, 3 * depth // 4 - 1, depth - 1} - {-1})


# ---- data --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One image to extract: its row in the store and the views still missing."""

    index: int
    image_id: str
    path: Path
    views: tuple[int, ...]


@dataclass
class _Loaded:
    item: Item
    views: Optional[list[torch.Tensor]]  # (3, H, W) per view in item.views, None when the image could not be read
    error: Optional[str] = None


class _ViewsDataset(Dataset):
    """Decodes one image and builds its missing views (in a DataLoader worker). A corrupt or missing file comes
    back as an error marker instead of killing the worker, so the main process can name it or skip it."""

    def __init__(self, items: list[Item], cfg: ExtractConfig):
        self.items, self.cfg = items, cfg

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> _Loaded:
        item, cfg = self.items[k], self.cfg
        try:
            image = load_photo(item.path, cfg.size, cfg.policy)
        except DataError as e:
            return _Loaded(item, None, str(e))
        return _Loaded(item, [make_view(image, item.image_id, v, cfg.seed, cfg.size, cfg.policy, cfg.split)
                              for v in item.views])


def _collate(batch: list[_Loaded]) -> dict[str, Any]:
    """The batch's views in one tensor. default_collate stacks them straight into shared memory when it runs in a
    worker, so they cross to the main process without another copy."""
    good = [b for b in batch if b.error is None]
    return {
        "items": [b.item for b in good],
        "pixels": default_collate([v for b in good for v in b.views]) if good else None,
        "bad": [(b.item, b.error) for b in batch if b.error is not None],
    }


# ---- the run -----------------------------------------------------------------------------------------------------
def extract(cfg: ExtractConfig, progress: bool = True) -> dict[str, Any]:
    """Extract every missing (image, view) of `cfg.split` into `cfg.out`; returns the closing summary.

    Resumes an existing store with the same fingerprint (a different one is refused, naming the differences, unless
    `cfg.overwrite`) and appends images that are new in the CSV. Works alone or under torchrun.
    """
    start = time.perf_counter()
    ranks, device = init_ranks(cfg.device)
    try:
        with ExitStack() as held, writing(cfg.out):  # rank 0 holds the store's writer lock for the whole run
            return _extract(cfg, ranks, device, progress, start, held)
    finally:
        if ranks.owns_group:
            dist.destroy_process_group()


def _extract(cfg: ExtractConfig, ranks: Ranks, device: torch.device, progress: bool, start: float, held: ExitStack
             ) -> dict[str, Any]:
    say = tqdm.write if ranks.rank == 0 else (lambda _msg: None)
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
    fingerprint = of_extraction(cfg, backbone, layers, grid, precision)
    if backbone.weights_sha256 == "random":
        say("WARNING: RANDOM BACKBONE WEIGHTS: these tokens carry no pretrained features (demo / test use only)")

    error = None
    if ranks.rank == 0:
        try:
            _prepare_store(cfg, table, layers, grid, backbone, fingerprint, csv, say, held)
        except (StoreError, FileExistsError, ValueError) as e:
            error = e
    message = ranks.broadcast(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:  # the other ranks stop with rank 0's message
        raise StoreError(f"rank 0 could not prepare the store: {message}")
    store = open_store(cfg.out, mode="r+")

    items, already, skipped_bad = _pending(store, table, cfg.data_dir)
    mine = [it for k, it in enumerate(items) if k % ranks.world == ranks.rank]  # by image: all views on one rank
    if skipped_bad:
        say(f"{skipped_bad} image(s) marked bad in an earlier run are skipped: {list(store.bad_ids)[:5]} (a photo "
            "whose content changed is retried by itself; --retry-bad retries them all)")
    counts = {"views": 0, "images": 0, "bad": {}, "loop_s": 0.0}
    if not items:
        say(f"all {already} samples of {cfg.out} are already done: nothing to do")
    else:
        say(f"extracting {sum(len(it.views) for it in items)} views of {len(items)} images on {ranks.world} "
            f"rank(s), {','.join(map(str, devices))}, {precision} compute; {already} samples already done")
        counts = _run(cfg, backbone, layers, store, mine, devices, precision, ranks, progress and ranks.rank == 0)

    per_rank = ranks.gather(counts)
    bad = {k: v for c in per_rank for k, v in c["bad"].items()}
    if ranks.rank == 0:
        for image_id, reason in bad.items():
            store.mark_bad(image_id, reason)
        views = sum(c["views"] for c in per_rank)
        if views:  # for time estimates (biomass bundle): one device's seconds per view, decode and write included
            zarr.open_group(cfg.out, mode="r+").update_attributes({"timing": {
                "seconds_per_view": max(c["loop_s"] for c in per_rank) * ranks.world / views,
                "on": f"{','.join(map(str, devices))}, {precision}"}})
    return _summary(open_store(cfg.out), per_rank, bad, already, time.perf_counter() - start, ranks.world)


def _prepare_store(cfg: ExtractConfig, table, layers: list[int], grid: tuple[int, int], backbone: Backbone,
                   fingerprint: Fingerprint, csv: Path, say, held: ExitStack) -> None:
    """Rank 0: create the store, or check an existing one's fingerprint and append images new in the CSV; then,
    holding the writer lock (entered on `held`), redo images whose photo changed and record the photos' hashes.
    A finished store on a read-only file system is used as it is; any change it would need is refused."""
    image_ids = table["image_id"].tolist()
    for leftover in remove_leftovers(cfg.out):
        say(f"removed {leftover}, left behind by an interrupted run")
    if cfg.out.exists() and not cfg.overwrite:
        lock = held.enter_context(WriterLock(cfg.out))
        store = open_store(cfg.out, mode="r+")
        store.check_fingerprint(fingerprint)
        listed = set(image_ids)
        gone = [i for i in store.image_ids if i not in listed]
        if gone:
            raise StoreError(f"{cfg.out}: {len(gone)} stored image(s) are not in {csv}: {gone[:5]}; extract to "
                             "another --out or rebuild with --overwrite")
        if store.trim_unrecorded_tail() if lock.held else False:
            say(f"{cfg.out}: trimmed the arrays of an append that was interrupted before it recorded its images")
        stored = set(store.image_ids)
        new = [i for i in image_ids if i not in stored]
        if new:
            _writable(lock, cfg.out, f"append {len(new)} new image(s)")
            say(f"appending {len(new)} new image(s) from {csv} to {cfg.out}")
            store.append_images(new)
    else:
        lock = held.enter_context(WriterLock(cfg.out))  # before replacing a store another run may be writing
        spec = StoreSpec(image_ids=image_ids, n_views=cfg.views, layers=layers, grid=grid, channels=backbone.embed_dim,
                         fingerprint=fingerprint.to_dict(), split=cfg.split, dtype=cfg.dtype,
                         n_prefix=backbone.n_prefix * cfg.tiles if cfg.store_prefix else 0,
                         random_weights=backbone.weights_sha256 == "random")
        create_store(cfg.out, spec, overwrite=cfg.overwrite)
        store = open_store(cfg.out, mode="r+")
    if lock.held:
        for stray in store.path.rglob("*.partial"):  # temp files of writes killed midway
            stray.unlink(missing_ok=True)
    _refresh(store, cfg, table, lock, say)
    weights = None if backbone.weights_sha256 == "random" else str(Path(backbone.weights).resolve())
    if store.record_weights_path(weights, write=lock.held):
        _writable(lock, cfg.out, "record the weights file")
    if not lock.held and _pending(store, table, cfg.data_dir)[0]:
        _writable(lock, cfg.out, "extract the samples not done yet")


def _writable(lock: WriterLock, path: Path, what: str) -> None:
    if not lock.held:
        raise StoreError(f"{path} is read-only: cannot {what}; make it writable or extract to another --out")


def _refresh(store: TokenStore, cfg: ExtractConfig, table, lock: WriterLock, say) -> None:
    """Reset the images to redo (corrupt data with `recheck`, a photo changed since it was extracted or marked
    bad, every bad image with `retry_bad`), then record every photo's content hash."""
    if cfg.recheck:  # first: a corrupt `done` chunk stops everything that reads it
        report = verify(store.path, progress=False)
        if report.broken_images:
            say(f"--recheck: {len(report.corrupt)} corrupt or missing chunk(s) in {len(report.broken_images)} "
                f"image(s), re-extracting {report.broken_images[:5]}: "
                + "; ".join(f"{key}: {err}" for key, err in report.corrupt[:3]))
            _writable(lock, store.path, f"re-extract {len(report.broken_images)} image(s)")
            store.reset_images(report.broken_images)
    paths = {i: cfg.data_dir / p for i, p in zip(table["image_id"], table["image_path"])}
    current, recorded, done, bad = content_hashes(paths), store.content_hashes, store.done(), store.bad_ids
    changed = [i for k, i in enumerate(store.image_ids)  # a photo deleted after extraction keeps its tokens
               if current.get(i) is not None and recorded.get(i, current[i]) != current[i]
               and (done[k].any() or i in bad)]
    if changed:
        say(f"{len(changed)} photo(s) changed since they were extracted (content sha256 differs): re-extracting "
            f"{changed[:5]}")
    if cfg.retry_bad and bad:
        say(f"--retry-bad: retrying {len(bad)} image(s) marked bad: {list(bad)[:5]}")
    redo = list(dict.fromkeys(changed + (list(bad) if cfg.retry_bad else [])))
    if redo:
        _writable(lock, store.path, f"re-extract {len(redo)} image(s)")
        store.reset_images(redo)
    fresh = {i: h for i, h in current.items() if i not in recorded or (h is not None and recorded[i] != h)}
    if fresh:
        _writable(lock, store.path, "record the photos' content hashes")
        store.record_content_hashes(fresh)


def _pending(store: TokenStore, table, data_dir: Path) -> tuple[list[Item], int, int]:
    """Images with views not yet done (store order), the number of done samples, and images skipped as bad."""
    done, bad = store.done(), store.bad_ids
    paths = dict(zip(table["image_id"], table["image_path"]))
    items, skipped = [], 0
    for i, image_id in enumerate(store.image_ids):
        views = tuple(int(v) for v in np.flatnonzero(~done[i]))
        if not views:
            continue
        if image_id in bad:
            skipped += 1
            continue
        items.append(Item(i, image_id, data_dir / paths[image_id], views))
    return items, int(done.sum()), skipped


def _run(cfg: ExtractConfig, backbone: Backbone, layers: list[int], store: TokenStore, items: list[Item],
         devices: list[torch.device], precision: str, ranks: Ranks, progress: bool) -> dict[str, Any]:
    """The overlapped decode -> forward -> write loop over this rank's images."""
    starts = place_backbone(backbone, devices, cfg.split_at)
    if len(devices) > 1:
        tqdm.write("backbone split: " + ", ".join(f"blocks {a}..{b - 1} on {d}" for a, b, d in
                                                   zip(starts, [*starts[1:], backbone.depth], devices)))
    device = devices[0]
    loader = DataLoader(_ViewsDataset(items, cfg), batch_size=max(1, cfg.batch_size // cfg.views), shuffle=False,
                        num_workers=cfg.num_workers, collate_fn=_collate, pin_memory=device.type == "cuda")
    view_bytes = _payload_bytes_per_view(store)
    counts: dict[str, Any] = {"views": 0, "images": 0, "bad": {}}
    start = time.perf_counter()
    writer = Writer(store, WRITER_THREADS, QUEUE_BATCHES * max(1, cfg.batch_size // cfg.views))
    bar = tqdm(total=sum(len(it.views) for it in items), unit="view", disable=not progress, dynamic_ncols=True,
               desc=f"extract {cfg.split}" + (f" (rank 0 of {ranks.world})" if ranks.world > 1 else ""))
    try:
        for batch in loader:
            check_stop()
            for item, reason in batch["bad"]:
                if not cfg.skip_bad:
                    raise DataError(f"{reason} (image {item.image_id!r}; nothing was written for it; "
                                    "--skip-bad records such images and goes on)")
                counts["bad"][item.image_id] = reason
                tqdm.write(f"skipping bad image {item.image_id!r}: {reason}")
            if batch["pixels"] is None:
                continue
            with torch.inference_mode(), autocast(precision, device):
                tokens, prefix = forward_tokens(backbone, batch["pixels"].to(device, non_blocking=True), layers,
                                                cfg.norm, cfg.tiles)
            check_finite(tokens, prefix, [it.image_id for it in batch["items"]],
                         [len(it.views) for it in batch["items"]], layers, precision)
            offset = 0
            for item in batch["items"]:  # encoded here, on the device; the writer threads only do I/O
                for views, at in _view_slices(item, store.n_views, offset):
                    writer.put(store.encode(item.index, views, tokens[at], prefix[at] if store.n_prefix else None))
                offset += len(item.views)
            counts["views"] += offset
            counts["images"] += len(batch["items"])
            bar.update(offset)
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix(img_s=f"{counts['images'] / elapsed:.2f}",
                            MB=f"{counts['views'] * view_bytes / 1e6:.0f}", refresh=False)
    finally:
        writer.close()
        bar.close()
    writer.check()
    return counts | {"loop_s": time.perf_counter() - start}


def _view_slices(item: Item, n_views: int, offset: int) -> list[tuple[int | slice, slice]]:
    """(store views, rows of the batch) to write for an image: all views in one shard write, or view by view
    when another run already wrote some of them."""
    if len(item.views) == n_views:
        return [(slice(None), slice(offset, offset + n_views))]
    return [(v, slice(offset + k, offset + k + 1)) for k, v in enumerate(item.views)]


def _payload_bytes_per_view(store: TokenStore) -> int:
    """Bytes of data (tokens, prefix, int8 scales) one view puts on disk before container overhead."""
    n_layers, t = len(store.layers), store.grid[0] * store.grid[1]
    values = n_layers * (t + store.n_prefix) * store.channels
    if store.storage_dtype == "int8":
        return values + 4 * n_layers * (t + store.n_prefix)
    return 2 * values


def _summary(store: TokenStore, per_rank: list[dict], bad: dict[str, str], already: int, wall: float,
             world: int) -> dict[str, Any]:
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
        "bad_ids": {**store.bad_ids, **bad},
        "bytes_on_disk": nbytes,
        "bytes_per_image_view": nbytes / n_done if n_done else None,
        "wall_s": wall,  # the whole call: backbone creation, store preparation, the loop, finalisation
        "loop_s": max(c["loop_s"] for c in per_rank),  # decode -> forward -> write, until the last write is done
        "views_per_s": views / wall,
        "images_per_s": images / wall,
        "ranks": world,
        "random_weights": store.random_weights,
    }
