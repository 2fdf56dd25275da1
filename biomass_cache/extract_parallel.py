"""Stage one's concurrency around the forward pass: torchrun ranks and the shard-writer threads.

Under torchrun every rank takes a share of the images (all views of an image on one rank, the store's race-free
rule) and the ranks exchange small Python objects (`Ranks.broadcast`, `Ranks.gather`). Each rank's finished tokens
go to writer threads through a bounded queue (`Writer`), so the backbone never waits on the disk. Decoding runs in
DataLoader workers (extract.py).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from biomass_cache.data import DataError
from biomass_cache.store import EncodedSample, TokenStore


@dataclass(frozen=True)
class Item:
    """One image to extract: its row in the store and the views still missing."""

    index: int
    image_id: str
    path: Path
    views: tuple[int, ...]


# ---- distributed -------------------------------------------------------------------------------------------------
@dataclass
class Ranks:
    """This process's place under torchrun (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run initialised the process group (and so destroys it)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def init_ranks(device_name: str) -> Ranks:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = resolve_device(device_name, ranks.local_rank).type == "cuda"
        if cuda:
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        ranks.owns_group = True
    return ranks


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The device `--device name` means on this rank (under torchrun: the rank's local GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DataError("--device cuda, but no CUDA device is visible (use --device cpu or auto)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_devices(names: list[str]) -> list[torch.device]:
    """The devices of `--devices cuda:0,cuda:1` (one backbone split over them), all of one kind and visible."""
    devices = []
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise DataError(f"--devices: {name!r} is not a device (cpu, cuda, cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise DataError(f"--devices: {name!r} is not a cpu or cuda device")
        if device.type == "cuda":
            index = 0 if device.index is None else device.index
            if index >= torch.cuda.device_count():
                raise DataError(f"--devices {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
            device = torch.device("cuda", index)
        devices.append(device)
    if len({d.type for d in devices}) > 1:
        raise DataError(f"--devices {','.join(names)}: a split backbone runs on devices of one kind, all cuda or all "
                         "cpu")
    return devices


# ---- writing -----------------------------------------------------------------------------------------------------
class Writer:
    """Writer threads behind a bounded queue. A failure is kept and re-raised in the main thread; after one, the
    threads keep draining (without writing) so the producer never blocks on a full queue."""

    def __init__(self, store: TokenStore, n_threads: int, max_jobs: int):
        self.store, self.error = store, None
        self.jobs: queue.Queue = queue.Queue(max_jobs)
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"store-writer-{k}")
                        for k in range(n_threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_encoded(job)
                except BaseException as e:  # re-raised by the main thread
                    self.error = e

    def put(self, sample: EncodedSample) -> None:
        self.check()
        self.jobs.put(sample)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Let the queued writes finish (they are complete images), then stop the threads."""
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()
