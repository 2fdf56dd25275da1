"""One pass of stage one: decode -> forward -> write over a rank's images, into one or more stores.

The pass overlaps its three parts so the backbone never waits: DataLoader workers decode JPEGs and build the views,
the main process runs the forward pass, and writer threads (store/writer.py) write each image's shards. What a
batch's tokens become is a sink's business (`Sink`: stored as they are; extract/inpass.py: reduced in the pass), so
one loop serves a plain extraction and both phases of an in-pass reduction. Under torchrun each rank runs the pass
on its share of the images (all views of an image on one rank, the store's race-free rule); rank 0 prepares the
stores first and marks bad images after (extract/passes.py).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm import tqdm

from biomass_cache.backbone.precision import autocast, finite_rows, non_finite_error
from biomass_cache.backbone.views import load_photo, make_view
from biomass_cache.backbone.vit import Backbone, forward_tokens, place_backbone
from biomass_cache.common.distributed import Ranks
from biomass_cache.common.errors import DataError
from biomass_cache.common.signals import check_stop
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.store.fingerprint import Fingerprint
from biomass_cache.extract.transfer import Transfer
from biomass_cache.store.handle import TokenStore
from biomass_cache.store.writer import Writer

QUEUE_BATCHES = 4  # batches computed ahead of the writers (bounds the memory held by finished tokens)


@dataclass
class Run:
    """What every pass of one `extract` call shares: the settings, the ranks, the backbone in place, the CSV."""

    cfg: ExtractConfig
    ranks: Ranks
    devices: list[torch.device]
    precision: str
    backbone: Backbone
    layers: list[int]
    grid: tuple[int, int]
    table: pd.DataFrame
    csv: Path
    fingerprint: Fingerprint
    held: ExitStack  # rank 0's writer locks, held until the call ends
    progress: bool
    say: Callable[[str], None] = print
    placed: bool = False  # the backbone is on its devices (by the first pass that runs the loop)
    locks: dict = field(default_factory=dict)  # path -> rank 0's WriterLock of each store prepared


@dataclass(frozen=True)
class Item:
    """One image to extract: its row in the store and the views still missing."""

    index: int
    image_id: str
    path: Path
    views: tuple[int, ...]


Sample = tuple[int, "int | slice", torch.Tensor, Optional[torch.Tensor]]  # store row, views, tokens, prefix


class Sink:
    """Where a batch's tokens go: a store, the tokens as they come (prefix tokens too, when it holds them)."""

    def __init__(self, store: TokenStore):
        self.store = store
        self.rows = {image_id: k for k, image_id in enumerate(store.image_ids)}

    def samples(self, item: Item, tokens: torch.Tensor, prefix: torch.Tensor) -> list[Sample]:
        """The item's samples as this store keeps them, still on the compute device."""
        i = self.rows[item.image_id]
        return [(i, views, tokens[at], prefix[at] if self.store.n_prefix else None)
                for views, at in view_slices(item.views, self.store.n_views)]


def view_slices(views: tuple[int, ...], n_views: int) -> list[tuple[int | slice, slice]]:
    """(store views, rows of the item's tokens) to write: all views in one shard write, or view by view when another
    run already wrote some of them."""
    if tuple(views) == tuple(range(n_views)):
        return [(slice(None), slice(0, n_views))]
    return [(v, slice(k, k + 1)) for k, v in enumerate(views)]


# ---- data --------------------------------------------------------------------------------------------------------
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


# ---- the loop ----------------------------------------------------------------------------------------------------
def run_views(run: Run, sinks: list[Sink], items: list[Item], desc: str) -> dict[str, Any]:
    """The overlapped decode -> forward -> write loop over this rank's images."""
    cfg, backbone, devices = run.cfg, run.backbone, run.devices
    if not run.placed:
        starts = place_backbone(backbone, devices, cfg.split_at)
        run.placed = True
        if len(devices) > 1:
            tqdm.write("backbone split: " + ", ".join(f"blocks {a}..{b - 1} on {d}" for a, b, d in
                                                       zip(starts, [*starts[1:], backbone.depth], devices)))
    device = devices[0]
    per_batch = max(1, cfg.batch_size // max(len(it.views) for it in items))  # views per forward: batch_size
    loader = DataLoader(_ViewsDataset(items, cfg), batch_size=per_batch, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    counts: dict[str, Any] = {"views": 0, "images": 0, "bad": {}}
    start = time.perf_counter()
    writers = [Writer(sink.store, QUEUE_BATCHES * per_batch) for sink in sinks]
    transfer = Transfer(device)
    bar = tqdm(total=sum(len(it.views) for it in items), unit="view", disable=not run.progress, dynamic_ncols=True,
               desc=desc + (f" (rank 0 of {run.ranks.world})" if run.ranks.world > 1 else ""))
    stages = Stages(device)
    batches = iter(loader)
    try:
        while True:
            with stages.host("data_wait_s"):  # the decoders are behind
                batch = next(batches, None)
            if batch is None:
                break
            check_stop()
            for item, reason in batch["bad"]:
                if not cfg.skip_bad:
                    raise DataError(f"{reason} (image {item.image_id!r}; nothing was written for it; "
                                    "--skip-bad records such images and goes on)")
                counts["bad"][item.image_id] = reason
                tqdm.write(f"skipping bad image {item.image_id!r}: {reason}")
            if batch["pixels"] is None:
                continue
            with stages.host("forward_s"), stages.device("forward_device_s"), torch.inference_mode(), \
                    autocast(run.precision, device):
                tokens, prefix = forward_tokens(backbone, batch["pixels"].to(device, non_blocking=True), run.layers,
                                                cfg.norm, cfg.tiles)
            offset = 0
            with torch.inference_mode():
                with stages.host("transform_s"):
                    finite = finite_rows(tokens, prefix)  # checked by the writer threads, once on the host
                for item in batch["items"]:
                    at = slice(offset, offset + len(item.views))
                    on_bad = partial(non_finite_error, image_ids=[item.image_id], views_per_image=[len(item.views)],
                                     layers=run.layers, precision=run.precision)
                    for sink, writer in zip(sinks, writers):
                        with stages.host("transform_s"):  # a reduction in the pass, on the device
                            samples = sink.samples(item, tokens[at], prefix[at])
                        for i, views, x, p in samples:
                            with stages.host("encode_send_s"):
                                sample = transfer.send(sink.store, i, views, x, p, finite[at], on_bad)
                            with stages.host("writer_blocked_s"):  # the writer threads are behind
                                writer.put(sample)
                    offset += len(item.views)
            counts["views"] += offset
            counts["images"] += len(batch["items"])
            bar.update(offset)
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix(img_s=f"{counts['images'] / elapsed:.2f}", refresh=False)
    finally:
        with stages.host("drain_s"):  # the writes still queued when the last batch was sent
            for writer in writers:
                writer.close()
        bar.close()
    for writer in writers:
        writer.check()
    return counts | {"loop_s": time.perf_counter() - start, "stages": stages.report(), "pinned_buffers":
                     transfer.pool.pinned if transfer.pool else 0}


class Stages:
    """Where the loop's time goes: host seconds per part (blocked on decoded batches, in the forward call, in the
    finite flags and the sinks' transforms, encoding and sending, blocked on full writer queues, draining them at
    the end) and, on CUDA, the device's own seconds in the forward (events read once, at the end: no sync in the
    loop). On CUDA the host parts only launch work; the device's parts overlap them."""

    def __init__(self, device: torch.device):
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda, self.on = device.type == "cuda", device
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = defaultdict(list)

    @contextmanager
    def host(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t

    @contextmanager
    def device(self, name: str) -> Iterator[None]:
        if not self.cuda:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(self.on))
        yield
        end.record(torch.cuda.current_stream(self.on))
        self.events[name].append((start, end))

    def report(self) -> dict[str, float]:
        out = dict(self.seconds)
        for name, pairs in self.events.items():
            if pairs:
                pairs[-1][1].synchronize()
                out[name] = sum(a.elapsed_time(b) for a, b in pairs) / 1e3
        return {k: round(v, 4) for k, v in out.items()}
