"""Finished samples from the device to the writer threads without making the device wait on the host.

On CUDA, each sample is encoded on the device (storage dtype, int8 scales, validity flags: codec.encode_on_device)
and copied on a side stream into pinned host buffers, reused from a pool so that after the first batches nothing is
pinned anew; the copy waits for the forward pass through the stream order, the caching allocator is told the
stream still reads the device tensors (`record_stream`), and an event marks the copy done. The writer thread that
takes the sample waits on that event, checks the flags (non-finite tokens, float16 overflow: the errors name the
image) and writes. So the main thread never synchronises with the device: no `.cpu()`, no `bool()` of a device
tensor per batch. On a CPU the same code runs without streams, events or pinning.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from biomass_cache.common.errors import StoreError
from biomass_cache.store.codec import CodecError, check_encoded, encode_on_device, host_array
from biomass_cache.store.handle import EncodedSample, TokenStore


class PinnedPool:
    """Pinned host buffers by (shape, dtype), taken by the main thread and given back by the writer threads."""

    def __init__(self) -> None:
        self.free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self.lock = threading.Lock()
        self.pinned = 0  # buffers pinned so far (a steady state stops pinning)

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype)
        with self.lock:
            if self.free[key]:
                return self.free[key].pop()
            self.pinned += 1
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self.lock:
            for b in buffers:
                self.free[(tuple(b.shape), b.dtype)].append(b)


@dataclass
class InFlight:
    """A sample on its way to the host: a writer thread calls `ready` (wait, check, numpy) then `done`."""

    index: int
    views: int | slice
    names: list[str]
    host: list[torch.Tensor]  # per part: stored values, then scales when int8
    ok: torch.Tensor  # (parts, 2) bool: finite input, finite stored values
    finite: Optional[torch.Tensor]  # (rows, layers) bool of the backbone's output, or None
    dtype: str
    where: str
    on_bad: Callable[[torch.Tensor], Exception | None]  # the error for `finite`, naming the image
    event: Optional[torch.cuda.Event] = None
    pool: Optional[PinnedPool] = None
    buffers: list[torch.Tensor] = field(default_factory=list)

    def ready(self) -> EncodedSample:
        if self.event is not None:
            self.event.synchronize()
        if self.finite is not None and (error := self.on_bad(self.finite)) is not None:
            raise error
        parts, k = [], 0
        for name, ok in zip(self.names, self.ok):
            try:
                check_encoded(ok, self.dtype, f"{name} of {self.where}")
            except CodecError as e:
                raise StoreError(str(e)) from e
            values = host_array(self.host[k], self.dtype)
            scales = self.host[k + 1].numpy() if self.dtype == "int8" else None
            k += 2 if self.dtype == "int8" else 1
            parts.append((name, values, scales))
        return EncodedSample(self.index, self.views, parts)

    def done(self) -> None:
        """The buffers back to the pool (the writer has written, or dropped, the sample)."""
        if self.pool is not None:
            self.pool.give(self.buffers)
            self.buffers = []


class Transfer:
    """Sends samples from `device` to the host: `send` returns at once with an `InFlight` for a writer thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = PinnedPool() if self.cuda else None

    def send(self, store: TokenStore, i: int, views: int | slice, tokens: torch.Tensor,
             prefix: Optional[torch.Tensor], finite: Optional[torch.Tensor] = None,
             on_bad: Callable[[torch.Tensor], Exception | None] = lambda _f: None) -> InFlight:
        where, parts = store.sample_parts(i, views, tokens, prefix)
        dtype, names, values, oks = store.storage_dtype, [], [], []
        for name, x in parts:
            stored, scales, ok = encode_on_device(x.detach(), dtype, f"{name} of {where}", checked=finite is not None)
            names.append(name)
            values += [stored] if scales is None else [stored, scales]
            oks.append(ok)
        flags = [torch.stack(oks), *([] if finite is None else [finite])]
        if not self.cuda:
            return InFlight(i, views, names, values, flags[0], finite, dtype, where, on_bad)
        device_tensors = values + flags
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after the forward that made them
        with torch.cuda.stream(self.stream):
            host = [self.pool.take(t).copy_(t, non_blocking=True) for t in device_tensors]
            for t in device_tensors:
                t.record_stream(self.stream)  # not reused by the allocator before the copy has read it
            event = torch.cuda.Event(blocking=True)  # a writer thread waiting on it sleeps, leaving the CPU to others
            event.record(self.stream)
        n = len(values)
        return InFlight(i, views, names, host[:n], host[n], host[n + 1] if finite is not None else None, dtype,
                        where, on_bad, event, self.pool, host)
