"""The handle on an open token store (`TokenStore`, from `layout.open_store` or `layout.create_store`): its attributes,
encoding and durable writes of samples, reads of tokens and prefix tokens by layer, and the rank-0 changes to the
group attributes (appending, resetting and marking images, content hashes, the weights path).

The layout the handle reads and writes is described in store/layout.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from biomass_cache.common.errors import StoreError
from biomass_cache.store import fingerprint as fingerprints
from biomass_cache.store.codec import CodecError, decode, encode
from biomass_cache.store.shards import ShardError, ShardGeometry, read_inner_chunks, write_shard

# Chunk files side by side (tokens/c.12.0.0.0.0): one directory per array, nothing nested to create or fsync.
FLAT_KEYS = {"name": "default", "separator": "."}
SCALES_OF = {"tokens": "scales", "prefix": "prefix_scales"}  # int8 only
EXPECTED_NAMES = ("tokens", "prefix", "scales", "prefix_scales", "done")
_WRITE_CONFIG = {"write_empty_chunks": True}  # every written chunk exists on disk, so verify can see holes
MAX_DIFFERENCES = 8  # differences a refused fingerprint lists


@dataclass(frozen=True)
class EncodedSample:
    """Views of one image encoded for storage (`TokenStore.encode`), ready for `TokenStore.write_encoded`."""

    index: int
    views: int | slice  # one view index, or slice(None): all views
    parts: list[tuple[str, np.ndarray, np.ndarray | None]]  # (array name, stored values, int8 scales or None)

    def ready(self) -> EncodedSample:
        """A writer thread's job is anything with `ready` and `done` (extract/transfer.py: one still in flight)."""
        return self

    def done(self) -> None:
        pass


class TokenStore:
    """Handle on an open store. Writers: `write`/`write_image` from any rank (one image per rank);
    rank 0 only: `append_images`, `mark_bad` (they rewrite the group attributes)."""

    def __init__(self, path: Path, group: zarr.Group, attrs: dict, mode: str):
        self.path, self._group, self._attrs, self._mode = path, group, attrs, mode
        n, v, n_layers = len(attrs["image_ids"]), attrs["n_views"], len(attrs["layers"])
        t, c, p = attrs["grid"][0] * attrs["grid"][1], attrs["channels"], attrs["n_prefix"]
        expected = {"tokens": (n, v, n_layers, t, c), "done": (n, v)}
        if p:
            expected["prefix"] = (n, v, n_layers, p, c)
        if attrs["storage_dtype"] == "int8":
            expected["scales"] = (n, v, n_layers, t)
            if p:
                expected["prefix_scales"] = (n, v, n_layers, p)
        self._arrays: dict[str, zarr.Array] = {}
        for name, shape in expected.items():
            try:
                arr = group[name]
            except KeyError:
                raise StoreError(f"{path}: array {name!r} is missing") from None
            got = getattr(arr, "shape", None)
            if not isinstance(arr, zarr.Array) or got[1:] != shape[1:] or got[0] < n:  # rows past n: see top
                raise StoreError(f"{path}: array {name!r} has shape {got}, attributes say {shape}")
            self._arrays[name] = arr.with_config(_WRITE_CONFIG)
        self._geometry = {name: ShardGeometry.of(arr) for name, arr in self._arrays.items() if name != "done"}
        self._layer_pos = {b: k for k, b in enumerate(attrs["layers"])}
        self._done_cache: np.ndarray | None = None

    # ---- attributes -------------------------------------------------------------------------------------------
    fingerprint = property(lambda self: self._attrs["fingerprint"])
    image_ids = property(lambda self: list(self._attrs["image_ids"]))
    split = property(lambda self: self._attrs["split"])
    n_views = property(lambda self: self._attrs["n_views"])
    layers = property(lambda self: list(self._attrs["layers"]))
    grid = property(lambda self: tuple(self._attrs["grid"]))
    channels = property(lambda self: self._attrs["channels"])
    n_prefix = property(lambda self: self._attrs["n_prefix"])
    storage_dtype = property(lambda self: self._attrs["storage_dtype"])
    random_weights = property(lambda self: self._attrs["random_weights"])
    bad_ids = property(lambda self: dict(self._attrs["bad_ids"]))
    attrs = property(lambda self: dict(self._attrs))  # every group attribute, the optional ones included
    content_hashes = property(lambda self: dict(self._attrs.get("content_sha256") or {}))
    # the weights file the tokens came from (None: random weights, or a store from before it was recorded)
    weights_path = property(lambda self: self._attrs.get("weights_path"))

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, images={len(self._attrs['image_ids'])}, views={self.n_views}, "
                f"layers={self.layers}, grid={self.grid}, channels={self.channels}, dtype={self.storage_dtype})")

    def done(self, fresh: bool = True) -> np.ndarray:
        """(N, V) completion mask, read fresh from disk; a corrupt `done` chunk is an error naming its file.
        `fresh=False`: the mask this handle read last, if any (one file per image: a training run that builds
        a dataset per fold and split would read them all 30 times, 4 s of a ViT-L run)."""
        if not fresh and self._done_cache is not None:
            return self._done_cache.copy()
        n = len(self._attrs["image_ids"])
        try:
            self._done_cache = np.asarray(self._arrays["done"][:n], dtype=bool)
        except Exception:  # a corrupt chunk may fail in any codec: find and name it
            for i in range(n):
                self._done_row(i)
            raise
        return self._done_cache.copy()

    def _done_row(self, i: int) -> np.ndarray:
        """Row i of `done`; a chunk that fails to decode is a StoreError naming the file and the way out."""
        try:
            return np.asarray(self._arrays["done"][i], dtype=bool)
        except Exception as e:
            raise StoreError(f"{self.done_path(i)}: `done` chunk of image {self._attrs['image_ids'][i]!r} is "
                             f"corrupt ({type(e).__name__}: {e}); `biomass extract --recheck` (or `biomass "
                             "verify --repair`, then extract) re-extracts that image") from e

    def done_path(self, i: int) -> Path:
        """The file holding row i of `done`."""
        return self.path / "done" / self._arrays["done"].metadata.encode_chunk_key((i, 0))

    def check_fingerprint(self, fingerprint: fingerprints.Fingerprint | dict, option: str = "--out") -> None:
        """Refuse a store extracted with another configuration, naming its differences (the first few: a reduced
        store against a full one differs in every key); `option` is the flag that named the store."""
        diff = fingerprints.diff(self.fingerprint, fingerprint)
        if diff:
            more = f"; and {len(diff) - MAX_DIFFERENCES} more" if len(diff) > MAX_DIFFERENCES else ""
            raise StoreError(f"{self.path}: this store was extracted with a different configuration: "
                             + "; ".join(diff[:MAX_DIFFERENCES]) + more
                             + f" (use --overwrite to replace it, or another {option})")

    @property
    def arrays(self) -> dict[str, zarr.Array]:
        """The zarr arrays by name (`done` included), for checks that decode them raw (verify.py)."""
        return dict(self._arrays)

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # ---- writing ----------------------------------------------------------------------------------------------
    def write(self, i: int, view: int, tokens: np.ndarray | torch.Tensor,
              prefix: np.ndarray | torch.Tensor | None = None) -> None:
        """Write one sample (L, T, C); marked done only after its data is fsynced."""
        self.write_encoded(self.encode(i, view, tokens[None], None if prefix is None else prefix[None]))

    def write_image(self, i: int, tokens: np.ndarray | torch.Tensor,
                    prefix: np.ndarray | torch.Tensor | None = None) -> None:
        """Write all views (V, L, T, C) of image i in one shard write (no read-modify-write of the shard)."""
        self.write_encoded(self.encode(i, slice(None), tokens, prefix))

    def encode(self, i: int, views: int | slice, tokens: Any, prefix: Any) -> EncodedSample:
        """Check and encode image i's views (a view index, or slice(None) for all) for `write_encoded`.

        Split from the writing so extraction encodes on the compute device, in the thread that ran the forward (a
        GPU tensor then crosses to the host at storage width), and its writer threads do nothing but I/O.
        """
        where, parts = self.sample_parts(i, views, tokens, prefix)
        encoded = []
        for name, x in parts:
            try:
                encoded.append((name, *encode(x, self.storage_dtype, f"{name} of {where}")))
            except CodecError as e:  # not storable faithfully: NaN/inf, beyond the float16 range, ...
                raise StoreError(str(e)) from e
        return EncodedSample(i, views, encoded)

    def sample_parts(self, i: int, views: int | slice, tokens: Any, prefix: Any) -> tuple[str, list[tuple[str, Any]]]:
        """Image i's views checked for writing: (where, [(array name, values)]), shapes and mode refused here."""
        self._check_index(i, 0 if isinstance(views, slice) else views)
        if self._mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open_store(path, mode='r+') to write")
        n_views = self.n_views if isinstance(views, slice) else 1
        where = f"image {self._attrs['image_ids'][i]!r} (#{i}) of {self.path}"
        parts = [("tokens", tokens, (n_views, len(self.layers), self.grid[0] * self.grid[1], self.channels))]
        if (prefix is None) != (self.n_prefix == 0):
            raise StoreError(f"{where}: prefix {'missing' if prefix is None else 'given'} but the store has "
                             f"n_prefix={self.n_prefix}")
        if prefix is not None:
            parts.append(("prefix", prefix, (n_views, len(self.layers), self.n_prefix, self.channels)))
        for name, x, shape in parts:
            if tuple(x.shape) != shape:
                raise StoreError(f"{where}: {name} has shape {tuple(x.shape)}, expected {shape}")
        return where, [(name, x) for name, x, _ in parts]

    def write_encoded(self, sample: EncodedSample) -> None:
        """Write an encoded sample's shards, fsync them, then mark its views done (never before)."""
        i, views = sample.index, sample.views
        sel = (i, views) if isinstance(views, slice) else (i, slice(views, views + 1))
        for name, data, scales in sample.parts:
            self._write_stored(name, i, views, sel, data)
            if scales is not None:
                self._write_stored(SCALES_OF[name], i, views, sel, scales)
        self._fsync_shards(i, range(self.n_views)[views] if isinstance(views, slice) else [views])
        self._arrays["done"][sel] = True
        if self._done_cache is not None:
            self._done_cache[sel] = True

    def _write_stored(self, name: str, i: int, views: int | slice, sel: tuple, data: np.ndarray) -> None:
        """Whole uncompressed shards are written by `write_shard`, at a fraction of the CPU zarr's async pipeline takes
        (CPU the forward pass would otherwise lose). Anything else goes through zarr, which merges a partly covered
        shard."""
        g = self._geometry[name]
        if not g.plain or not (isinstance(views, slice) or g.views_per_shard == 1):
            self._arrays[name][sel] = data
            return
        first, step = (0 if isinstance(views, slice) else views), g.views_per_shard
        for k in range(0, len(data), step):
            write_shard(self.shard_path(name, i, first + k), g.split(data[k:k + step]), g.index_at_start)

    def shard_path(self, name: str, i: int, view: int) -> Path:
        """The shard file holding sample (i, view) of array `name`."""
        g = self._geometry[name]
        return self.path / name / g.key((i, view // g.views_per_shard) + (0,) * (g.ndim - 2))

    def _fsync_shards(self, i: int, views: Sequence[int]) -> None:
        """LocalStore writes each shard to a temp file and renames it (atomic) but never fsyncs: do it here, so
        `done` never outlives the data it vouches for, even across a power cut."""
        files = {self.shard_path(name, i, v) for name in self._geometry for v in views}
        for f in sorted(files) + sorted({f.parent for f in files}):
            _fsync(f)

    # ---- reading ----------------------------------------------------------------------------------------------
    def read(self, i: int, view: int, layers: Sequence[int] | None = None) -> np.ndarray:
        """Tokens (L_sel, T, C) float32 of a done sample; `layers` are block indices from `self.layers`."""
        return self._read("tokens", i, view, layers).float().numpy()

    def read_values(self, i: int, view: int, layers: Sequence[int] | None = None) -> torch.Tensor:
        """`read` without the float32 copy: the stored values at their own precision (float16, bfloat16; int8
        stores as float32), for arithmetic that runs on them directly (store/reduce.py `norm_pool`)."""
        return self._read("tokens", i, view, layers)

    def read_prefix(self, i: int, view: int, layers: Sequence[int] | None = None) -> np.ndarray:
        """Prefix tokens (L_sel, n_prefix, C) float32 (CLS + registers)."""
        if not self.n_prefix:
            raise StoreError(f"{self.path} has no prefix tokens (extracted without --prefix)")
        return self._read("prefix", i, view, layers).float().numpy()

    def _read(self, name: str, i: int, view: int, layers: Sequence[int] | None) -> torch.Tensor:
        self._check_index(i, view)
        self._check_done(i, view)
        pos = self._layer_positions(layers)
        try:
            data = self._read_stored(name, i, view, pos)
            scales = self._read_stored(SCALES_OF[name], i, view, pos) if self.storage_dtype == "int8" else None
        except ShardError as e:  # missing, truncated or corrupt shard file
            raise StoreError(str(e)) from e
        return decode(data, scales, self.storage_dtype)

    def _read_stored(self, name: str, i: int, view: int, pos: list[int]) -> np.ndarray:
        """Stored values (len(pos), ...) of one sample. Uncompressed shards are read by `read_inner_chunks`
        (a fraction of the overhead of zarr's async pipeline; docs: Benchmarks); anything else goes through zarr."""
        arr, g = self._arrays[name], self._geometry[name]
        if not g.plain:
            try:
                if pos == list(range(pos[0], pos[0] + len(pos))):
                    return arr[i, view, pos[0]: pos[0] + len(pos)]
                return arr.get_orthogonal_selection((i, view, pos))
            except Exception as e:  # a corrupt chunk may fail in any codec
                raise ShardError(f"{self.shard_path(name, i, view)}: corrupt shard ({type(e).__name__}: {e})") from e
        path, v, rest = self.shard_path(name, i, view), view % g.views_per_shard, (0,) * (g.ndim - 3)
        if g.layers_per_chunk == 1:  # read just the wanted layers
            out = np.empty((len(pos), *arr.shape[3:]), arr.dtype)
            read_inner_chunks(path, g.grid, [(0, v, p, *rest) for p in pos], list(out), g.index_at_start)
            return out
        out = np.empty(arr.shape[2:], arr.dtype)  # one inner chunk holds all layers of the view
        read_inner_chunks(path, g.grid, [(0, v, 0, *rest)], [out], g.index_at_start)
        return out if pos == list(range(len(out))) else out[pos]

    def _layer_positions(self, layers: Sequence[int] | None) -> list[int]:
        """Positions in the layer axis of the requested block indices (None = all, in stored order)."""
        if layers is None:
            return list(range(len(self._layer_pos)))
        unknown = [b for b in layers if b not in self._layer_pos]
        if unknown or len(set(layers)) != len(layers) or not layers:
            raise StoreError(f"{self.path}: layers {list(layers)} must be distinct block indices from the stored "
                             f"layers {self.layers}" + (f" (unknown: {unknown})" if unknown else ""))
        return [self._layer_pos[b] for b in layers]

    def _check_index(self, i: int, view: int) -> None:
        n = len(self._attrs["image_ids"])
        if not (0 <= i < n and 0 <= view < self.n_views):
            raise IndexError(f"{self.path}: sample (image {i}, view {view}) out of range ({n} images, "
                             f"{self.n_views} views)")

    def _check_done(self, i: int, view: int) -> None:
        if self._done_cache is None:
            self.done()
        if not self._done_cache[i, view]:
            self._done_cache[i] = self._done_row(i)  # another process may have finished it since
            if not self._done_cache[i, view]:
                raise StoreError(f"{self.path}: sample (image {self._attrs['image_ids'][i]!r} #{i}, view {view}) "
                                 "is not extracted (not marked done)")

    # ---- arrays that describe the tokens (a reduced store's projection) ----------------------------------------
    def write_extra(self, name: str, data: np.ndarray) -> None:
        """A small array beside the tokens, stored whole in one chunk with a checksum (rank 0, before writers)."""
        self._require_writable()
        if name in self._arrays or name in EXPECTED_NAMES:
            raise StoreError(f"{self.path}: {name!r} is a token array, not an extra one")
        arr = self._group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape,
                                       compressors=(Crc32cCodec(),), chunk_key_encoding=FLAT_KEYS, overwrite=True)
        arr[...] = data

    def read_extra(self, name: str) -> np.ndarray:
        try:
            arr = self._group[name]
        except KeyError:
            raise StoreError(f"{self.path}: array {name!r} is missing") from None
        return np.asarray(arr[...])

    def set_attrs(self, **kw: Any) -> None:
        """Add or replace group attributes (rank 0 only); the required ones keep their meaning."""
        self._require_writable()
        self._set_attrs(**kw)

    # ---- rank-0-only attribute changes ------------------------------------------------------------------------
    def append_images(self, new_ids: list[str]) -> None:
        """Grow the image axis of every array for new images (not done). Rank 0 only, with no writer running;
        other processes must reopen the store afterwards."""
        self._require_writable()
        new_ids = list(new_ids)
        old = set(self._attrs["image_ids"])
        dup = sorted({x for x in new_ids if x in old or new_ids.count(x) > 1})
        if dup or not all(isinstance(x, str) and x for x in new_ids):
            raise StoreError(f"{self.path}: append_images refused: duplicate or empty image ids {dup[:10]}")
        self._resize(len(self._attrs["image_ids"]) + len(new_ids))
        self._set_attrs(image_ids=self._attrs["image_ids"] + new_ids)  # last: arrays first, then the ids
        self._done_cache = None

    def trim_unrecorded_tail(self) -> bool:
        """Shrink arrays grown by an append that was killed before it recorded the ids; True if there was one."""
        self._require_writable()
        n = len(self._attrs["image_ids"])
        if all(arr.shape[0] == n for arr in self._arrays.values()):
            return False
        self._resize(n)
        return True

    def _resize(self, n: int) -> None:
        for name, arr in self._arrays.items():
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
                self._arrays[name] = self._group[name].with_config(_WRITE_CONFIG)

    def reset_images(self, image_ids: Sequence[str]) -> None:
        """Forget images so the next extraction redoes them: `done` cleared first, then their shard files deleted,
        then their `bad_ids` entries dropped (rank 0 only, no writer running)."""
        self._require_writable()
        position = {x: k for k, x in enumerate(self._attrs["image_ids"])}
        unknown = [x for x in image_ids if x not in position]
        if unknown:
            raise StoreError(f"{self.path}: reset_images: unknown image id(s) {unknown[:10]}")
        for x in image_ids:
            i = position[x]
            self._arrays["done"][i] = False
            _fsync(self.done_path(i))
            for name in self._geometry:
                for v in range(self.n_views):
                    self.shard_path(name, i, v).unlink(missing_ok=True)
        bad = self._attrs["bad_ids"]
        if any(x in bad for x in image_ids):
            self._set_attrs(bad_ids={k: r for k, r in bad.items() if k not in set(image_ids)})
        self._done_cache = None

    def record_content_hashes(self, hashes: dict[str, str | None]) -> None:
        """Set attribute `content_sha256` for these images (the photos their tokens come from); no write when
        nothing changes, so a finished re-run leaves the store untouched."""
        self._require_writable()
        merged = {**self.content_hashes, **hashes}
        if merged != self.content_hashes:
            self._set_attrs(content_sha256=merged)

    def record_weights_path(self, path: str | None, write: bool = True) -> bool:
        """Set attribute `weights_path`: the absolute path of the weights file the tokens came from (None for random
        weights), so later stages can rebuild the backbone without being told. Not in the fingerprint: the file's
        sha256 is, and the same weights may sit at another path on another machine. Written only when it changes
        (and `write`: False asks whether it would); returns whether it needed to."""
        if "weights_path" in self._attrs and self._attrs["weights_path"] == path:
            return False
        if write:
            self._require_writable()
            self._set_attrs(weights_path=path)
        return True

    def mark_bad(self, image_id: str, reason: str) -> None:
        """Record an image that could not be extracted (rank 0 only)."""
        self._require_writable()
        if image_id not in self._attrs["image_ids"]:
            raise StoreError(f"{self.path}: mark_bad: unknown image id {image_id!r}")
        self._set_attrs(bad_ids={**self._attrs["bad_ids"], image_id: str(reason)})

    def _require_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"{self.path} is open read-only; open_store(path, mode='r+') to change it")

    def _set_attrs(self, **kw: Any) -> None:
        self._group.update_attributes(kw)  # LocalStore replaces zarr.json atomically (temp file + rename)
        self._attrs.update(kw)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
