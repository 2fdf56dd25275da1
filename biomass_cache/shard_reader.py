"""Direct reads of uncompressed Zarr v3 shards, a tenth of the overhead of zarr's async pipeline (measured).

The shard index is read from the start of the shard file (or, in stores written before it moved there, the end),
then the wanted inner chunks go straight into the caller's buffers, one preadv per run of adjacent chunks, checking
the CRC32C of the index and of every chunk as zarr does.
The token store (store.py) reads through here whenever `ShardGeometry.plain` says the layout allows it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.codecs.bytes import Endian

_NO_CHUNK = 2**64 - 1  # shard index offset of an absent inner chunk


class ShardError(ValueError):
    """A shard file that is missing, truncated or corrupt (the store reports it as a StoreError)."""


@dataclass(frozen=True)
class ShardGeometry:
    """How an array's samples map to shard files and inner chunks, and whether `read_inner_chunks` can read it:
    uncompressed inner chunks and index (raw little-endian bytes, each followed by its CRC32C), index at the end of
    the shard, as the Zarr v3 sharding spec lays them out."""

    ndim: int
    views_per_shard: int
    layers_per_chunk: int
    grid: tuple[int, ...]  # inner chunks per shard
    plain: bool
    key: Any  # chunk coordinates -> key relative to the array folder
    index_at_start: bool = False  # the shard index precedes the chunks (else it ends the file)

    @classmethod
    def of(cls, arr: zarr.Array) -> ShardGeometry:
        codec = arr.metadata.codecs[0]
        plain = (sys.byteorder == "little" and len(arr.metadata.codecs) == 1 and isinstance(codec, ShardingCodec)
                 and [type(c) for c in codec.codecs] == [type(c) for c in codec.index_codecs]
                 == [BytesCodec, Crc32cCodec] and codec.codecs[0].endian in (None, Endian.little))
        shards = arr.shards or arr.chunks
        return cls(arr.ndim, shards[1], arr.chunks[2], tuple(s // c for s, c in zip(shards, arr.chunks)), plain,
                   arr.metadata.encode_chunk_key, plain and codec.index_location == ShardingCodecIndexLocation.start)


def read_inner_chunks(path: Path, grid: tuple[int, ...], coords: list[tuple[int, ...]],
                      out: list[np.ndarray], index_at_start: bool = False) -> None:
    """Read inner chunks (coordinates within the shard) of one shard file straight into `out`, one preadv per run
    of adjacent chunks, checking the CRC32C of the index and of every chunk as zarr does."""
    n_index = int(np.prod(grid)) * 16
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file missing for a sample marked done") from None
    try:
        size = os.fstat(fd).st_size
        at = 0 if index_at_start else size - n_index - 4
        raw = os.pread(fd, n_index + 4, at) if size >= n_index + 4 else b""
        _check_crc(raw[:-4], raw[-4:], path, "shard index")
        index = np.frombuffer(raw, "<u8", count=n_index // 8).reshape(*grid, 2)
        chunks = sorted((int(index[c][0]), int(index[c][1]), c, target) for c, target in zip(coords, out))
        crcs = [bytearray(4) for _ in chunks]
        run: list[int] = []
        for k, (offset, length, c, target) in enumerate(chunks):
            if offset == _NO_CHUNK or length != target.nbytes + 4:
                raise ShardError(f"{path}: inner chunk {c} missing or of the wrong size")
            run.append(k)
            if k + 1 == len(chunks) or chunks[k + 1][0] != offset + length:  # end of a run of adjacent chunks
                start = chunks[run[0]][0]
                buffers = [b for j in run for b in (chunks[j][3], crcs[j])]
                if os.preadv(fd, buffers, start) != offset + length - start:
                    raise ShardError(f"{path}: truncated shard")
                run = []
        for (_, _, c, target), crc in zip(chunks, crcs):
            _check_crc(target, crc, path, f"inner chunk {c}")
    finally:
        os.close(fd)


def _check_crc(data: bytes | np.ndarray, crc: bytes | bytearray, path: Path, what: str) -> None:
    if len(crc) != 4 or google_crc32c.value(data) != int.from_bytes(crc, "little"):
        raise ShardError(f"{path}: {what} is corrupt (CRC32C mismatch)")
