"""Where a process computes: `--device` as a torch device, and its place under torchrun.

Every entry point resolves its device here, so `auto`, `cpu`, `cuda` and `cuda:N` mean the same to every command,
and stage one (extraction) and the LoRA path join a torchrun process group the same way: gloo on CPU, nccl on CUDA,
each rank on its local GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from biomass_cache.common.errors import DataError


def resolve_device(name: str, local_rank: int | None = None, flag: str = "--device") -> torch.device:
    """auto | cpu | cuda | cuda:N as a torch device; with `local_rank` (under torchrun) CUDA means that local GPU.
    A device this machine lacks is a DataError naming `flag`."""
    if name == "auto":
        chosen: torch.device | None = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            chosen = torch.device(name)
        except (RuntimeError, TypeError):
            chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise DataError(f"{flag} {name!r}: not a cpu or cuda device; expected auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"{flag} {name}: no CUDA device is visible on this machine; use --device cpu or auto")
        if local_rank is not None:
            chosen = torch.device("cuda", local_rank)
        if (chosen.index or 0) >= torch.cuda.device_count():
            raise DataError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def resolve_devices(names: list[str]) -> list[torch.device]:
    """The devices of `--devices cuda:0,cuda:1` (one backbone split over them), all of one kind and visible."""
    devices = [resolve_device(name, flag="--devices") for name in names]
    devices = [torch.device("cuda", d.index or 0) if d.type == "cuda" else d for d in devices]
    if len({d.type for d in devices}) > 1:
        raise DataError(f"--devices {','.join(names)}: a split backbone runs on devices of one kind, all cuda or all "
                         "cpu")
    return devices


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

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def average_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Mean of every gradient over the ranks, in one all-reduce. A missing gradient counts as zero, so every rank
        sends the same tensor list."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)


def init_ranks(device: str) -> tuple[Ranks, torch.device]:
    """This process's ranks and device; under torchrun (WORLD_SIZE > 1) the device is the rank's local GPU (when
    CUDA) and the process group is joined (nccl on CUDA, gloo on CPU) unless already joined."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), resolve_device(device)
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    chosen = resolve_device(device, ranks.local_rank)
    if not dist.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
        ranks.owns_group = True
    return ranks, chosen


def parse_devices(text: str | None) -> list[str] | None:
    """`--devices cuda:0,cuda:1` as a list (None: one device)."""
    return [d.strip() for d in text.split(",") if d.strip()] if text else None
