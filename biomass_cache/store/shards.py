"""Direct reads and writes of uncompressed Zarr v3 shards, around zarr's async pipeline, whose per-call overhead
dominates small reads and costs the forward pass CPU on writes (benchmarks/bench_store.py; docs: Benchmarks).

Reads take the shard index from the start of the shard file (or, in stores written before it moved there, the end),
then put the wanted inner chunks straight into the caller's buffers, one preadv per run of adjacent chunks, checking
the CRC32C of the index and of every chunk as zarr does. Writes build a whole shard (index, then every inner chunk
in C order, each followed by its CRC32C) with one writev to a temporary file that is renamed into place, as zarr's
LocalStore does. Plain zarr reads both back: the index says where every chunk is.
The token store (store/handle.py) goes through here whenever `ShardGeometry.plain` says the layout allows it.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.codecs.bytes import Endian

_NO_CHUNK = 2**64 - 1  # shard index offset of an absent inner chunk
_MAX_BUFFERS = 512  # per writev call, below every platform's IOV_MAX


class ShardError(ValueError):
    """A shard file that is missing, truncated or corrupt (the store reports it as a StoreError)."""


@dataclass(frozen=True)
class ShardGeometry:
    """How an array's samples map to shard files and inner chunks, and whether this module can read and write it
    directly: uncompressed inner chunks and index (raw little-endian bytes, each followed by its CRC32C), as the
    Zarr v3 sharding spec lays them out, on a little-endian machine."""

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

    def split(self, shard: np.ndarray) -> list[np.ndarray]:
        """One shard's data (views_per_shard, layers, ...) as its inner chunks in C order of the chunk grid."""
        shard, step = np.ascontiguousarray(shard), self.layers_per_chunk
        return [shard[v, k:k + step] for v in range(shard.shape[0]) for k in range(0, shard.shape[1], step)]


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


def write_shard(path: Path, chunks: list[np.ndarray], index_at_start: bool) -> None:
    """Write a whole shard whose inner chunks, every one of them, are `chunks` in C order of the shard's chunk grid
    (contiguous little-endian arrays). Written to a temporary file and renamed, so a reader sees the old shard or
    the new one, never a mix; the caller fsyncs (store/handle.py marks a sample done only after that)."""
    crcs = [crc32c.crc32c(c).to_bytes(4, "little") for c in chunks]
    n_index = len(chunks) * 16
    index = np.empty((len(chunks), 2), "<u8")
    index[:, 1] = [c.nbytes + 4 for c in chunks]
    index[:, 0] = np.cumsum(index[:, 1]) - index[:, 1] + (n_index + 4 if index_at_start else 0)
    index_bytes = index.tobytes() + crc32c.crc32c(index.tobytes()).to_bytes(4, "little")
    body = [b for c, crc in zip(chunks, crcs) for b in (memoryview(c).cast("B"), crc)]
    buffers = [index_bytes, *body] if index_at_start else [*body, index_bytes]
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            while buffers:  # writev takes at most IOV_MAX buffers and may write less than asked
                buffers = _advance(buffers, os.writev(fd, buffers[:_MAX_BUFFERS]))
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _advance(buffers: list, n: int) -> list:
    """The buffers left after writing the first n bytes of them."""
    while buffers and n >= len(buffers[0]):
        n -= len(buffers[0])
        buffers = buffers[1:]
    return [memoryview(buffers[0])[n:], *buffers[1:]] if buffers and n else buffers


def _check_crc(data: bytes | np.ndarray, crc: bytes | bytearray, path: Path, what: str) -> None:
    if len(crc) != 4 or crc32c.crc32c(data) != int.from_bytes(crc, "little"):
        raise ShardError(f"{path}: {what} is corrupt (CRC32C mismatch)")
