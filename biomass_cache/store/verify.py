"""`biomass verify`: read a token store back chunk by chunk through zarr; report what is corrupt or missing.

Corrupt = fails to decode or its CRC32C checksum, or holes (fill values) in a sample marked done; missing = samples
not marked done. Images marked bad at extraction are reported apart, and so are temp files of interrupted writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr
from tqdm import tqdm

from biomass_cache.common.errors import StoreError
from biomass_cache.store.handle import TokenStore
from biomass_cache.store.layout import BF16_NAN_BITS, open_store
from biomass_cache.common.lock import WriterLock


@dataclass
class VerifyReport:
    """Result of `verify`. Images marked bad are listed in `bad`, not in `missing`; `broken_images` are the images
    with any corrupt chunk (what `repair` makes extraction redo)."""

    path: Path
    n_samples: int
    n_done: int
    missing: list[tuple[str, int]]
    corrupt: list[tuple[str, str]]
    ok: bool
    bad: dict[str, str] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)  # temp files of writes killed midway (harmless)
    broken_images: list[str] = field(default_factory=list)


def verify(path: str | Path, progress: bool = True) -> VerifyReport:
    """Read every chunk back: corrupt = fails to decode or its checksum, or holes in a done sample;
    missing = samples not marked done (images marked bad are reported apart)."""
    store = open_store(path)
    ids, bad = store.image_ids, store.bad_ids
    corrupt: list[tuple[str, str]] = []
    missing: list[tuple[str, int]] = []
    broken: list[str] = []
    n_done = 0
    for i in tqdm(range(len(ids)), desc="verify", unit="img", disable=not progress):
        before = len(corrupt)
        done = _verify_done_row(store, i, corrupt)
        n_done += int(done.sum())
        missing += [(ids[i], int(v)) for v in np.flatnonzero(~done) if ids[i] not in bad]
        for name, arr in store.arrays.items():
            if name != "done":
                corrupt += _verify_image(store, arr, name, i, done)
        if len(corrupt) > before:
            broken.append(ids[i])
    stray = sorted(str(p.relative_to(store.path)) for p in store.path.rglob("*.partial"))
    return VerifyReport(store.path, len(ids) * store.n_views, n_done, missing, corrupt,
                        ok=not missing and not corrupt, bad=bad, stray=stray, broken_images=broken)


def repair(report: VerifyReport) -> None:
    """Make the next extraction redo every broken image (its `done` row cleared, its shard files deleted) and
    delete leftover temp files; holds the store's writer lock while it does."""
    with WriterLock(report.path) as lock:
        if not lock.held:
            raise StoreError(f"{report.path} is read-only: cannot repair it")
        store = open_store(report.path, mode="r+")
        store.reset_images(report.broken_images)
        for name in report.stray:
            (report.path / name).unlink(missing_ok=True)


def _verify_done_row(store: TokenStore, i: int, corrupt: list) -> np.ndarray:
    try:
        return np.asarray(store.arrays["done"][i], dtype=bool)
    except Exception as e:  # a corrupt chunk may fail in any codec: report it, whatever it is
        corrupt.append((str(store.done_path(i).relative_to(store.path)), f"{type(e).__name__}: {e}"))
        return np.zeros(store.n_views, dtype=bool)


def _key(store: TokenStore, name: str, i: int, view: int) -> str:
    return str(store.shard_path(name, i, view).relative_to(store.path))


def _verify_image(store: TokenStore, arr: zarr.Array, name: str, i: int, done: np.ndarray) -> list[tuple[str, str]]:
    """Decode all of image i through zarr; on failure, inner chunk by inner chunk to name every broken one (a
    chunk cut off by a truncated shard decodes as fill values: a hole, reported too when its view is done)."""
    what = f"of image {store.image_ids[i]!r} is marked done but has unwritten data"
    try:
        data = arr[i]
        return [(_key(store, name, i, v), f"view {v} {what}") for v in np.flatnonzero(done) if _is_unwritten(data[v])]
    except Exception as e:  # a corrupt chunk may fail in any codec: report it, whatever it is
        image_error = f"{type(e).__name__}: {e}"
    layers_per_chunk = arr.chunks[2]  # inner chunk of one layer, or of all layers of a view
    broken = []
    for v in range(store.n_views):
        for start in range(0, arr.shape[2], layers_per_chunk):
            where = f"{_key(store, name, i, v)} (view {v}, layers from position {start})"
            try:
                chunk = arr[i, v, start: start + layers_per_chunk]
            except Exception as e:
                broken.append((where, f"{type(e).__name__}: {e}"))
                continue
            if done[v] and _is_unwritten(chunk):
                broken.append((where, f"view {v} {what} (chunk missing from the shard)"))
    return broken or [(_key(store, name, i, 0), image_error)]


def _is_unwritten(x: np.ndarray) -> bool:
    """Fill values of a never-written chunk: NaN, or bfloat16 NaN bits (int8 holes show in their float scales)."""
    if x.dtype == np.uint16:
        return bool((x == BF16_NAN_BITS).any())
    return x.dtype.kind == "f" and bool(np.isnan(x).any())
