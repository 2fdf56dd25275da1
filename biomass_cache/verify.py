"""`biomass verify`: read a token store back chunk by chunk through zarr; report what is corrupt or missing.

Corrupt = fails to decode or its CRC32C checksum, or holes (fill values) in a sample marked done; missing = samples
not marked done. Images marked bad at extraction are reported apart, and so are temp files of interrupted writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import typer
import zarr
from tqdm import tqdm

from biomass_cache.store import BF16_NAN_BITS, TokenStore, open_store


@dataclass
class VerifyReport:
    """Result of `verify`. Images marked bad are listed in `bad`, not in `missing`."""

    path: Path
    n_samples: int
    n_done: int
    missing: list[tuple[str, int]]
    corrupt: list[tuple[str, str]]
    ok: bool
    bad: dict[str, str] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)  # temp files of writes killed midway (harmless)


def verify(path: str | Path, progress: bool = True) -> VerifyReport:
    """Read every chunk back: corrupt = fails to decode or its checksum, or holes in a done sample;
    missing = samples not marked done (images marked bad are reported apart)."""
    store = open_store(path)
    ids, bad = store.image_ids, store.bad_ids
    corrupt: list[tuple[str, str]] = []
    missing: list[tuple[str, int]] = []
    n_done = 0
    for i in tqdm(range(len(ids)), desc="verify", unit="img", disable=not progress):
        done = _verify_done_row(store, i, corrupt)
        n_done += int(done.sum())
        missing += [(ids[i], int(v)) for v in np.flatnonzero(~done) if ids[i] not in bad]
        for name, arr in store.arrays.items():
            if name == "done":
                continue
            data = _verify_image(store, arr, name, i, corrupt)
            for v in np.flatnonzero(done) if data is not None else []:
                if _is_unwritten(data[v]):
                    corrupt.append((_key(store, name, i, v), f"view {v} of image {ids[i]!r} is marked done but "
                                                             "has unwritten data"))
    stray = sorted(str(p.relative_to(store.path)) for p in store.path.rglob("*.partial"))
    return VerifyReport(store.path, len(ids) * store.n_views, n_done, missing, corrupt,
                        ok=not missing and not corrupt, bad=bad, stray=stray)


def _verify_done_row(store: TokenStore, i: int, corrupt: list) -> np.ndarray:
    arr = store.arrays["done"]
    try:
        return np.asarray(arr[i], dtype=bool)
    except Exception as e:  # a corrupt chunk may fail in any codec: report it, whatever it is
        corrupt.append((f"done/{arr.metadata.encode_chunk_key((i, 0))}", f"{type(e).__name__}: {e}"))
        return np.zeros(store.n_views, dtype=bool)


def _key(store: TokenStore, name: str, i: int, view: int) -> str:
    return str(store.shard_path(name, i, view).relative_to(store.path))


def _verify_image(store: TokenStore, arr: zarr.Array, name: str, i: int, corrupt: list) -> np.ndarray | None:
    """Decode all of image i through zarr; on failure, inner chunk by inner chunk to name the broken ones."""
    layers_per_chunk = arr.chunks[2]  # inner chunk of one layer, or of all layers of a view
    try:
        return arr[i]
    except Exception as e:  # a corrupt chunk may fail in any codec: report it, whatever it is
        image_error = f"{type(e).__name__}: {e}"
    broken = []
    for v in range(store.n_views):
        for start in range(0, arr.shape[2], layers_per_chunk):
            try:
                arr[i, v, start: start + layers_per_chunk]
            except Exception as e:
                broken.append((f"{_key(store, name, i, v)} (view {v}, layers from position {start})",
                               f"{type(e).__name__}: {e}"))
    corrupt.extend(broken or [(f"{name} image {i}", image_error)])
    return None


def _is_unwritten(x: np.ndarray) -> bool:
    """Fill values of a never-written chunk: NaN, or bfloat16 NaN bits (int8 holes show in their float scales)."""
    if x.dtype == np.uint16:
        return bool((x == BF16_NAN_BITS).any())
    return x.dtype.kind == "f" and bool(np.isnan(x).any())


def verify_command(
    store: Path = typer.Argument(..., help="Path of the token store (a .zarr folder) to check."),
) -> None:
    """Read back every chunk of a token store; report corrupt chunks and samples not extracted.

    Exits with status 1 when any sample is missing or any chunk is corrupt (2: no readable store there).
    """
    report = verify(store)
    typer.echo(f"{report.path}: {report.n_done}/{report.n_samples} samples done, {len(report.missing)} missing, "
               f"{len(report.corrupt)} corrupt chunk(s), {len(report.bad)} image(s) marked bad")
    for iid, v in report.missing[:20]:
        typer.echo(f"  missing: image {iid!r} view {v}")
    for key, err in report.corrupt[:20]:
        typer.echo(f"  corrupt: {key}: {err}")
    for iid, reason in list(report.bad.items())[:20]:
        typer.echo(f"  bad: image {iid!r}: {reason}")
    if report.stray:
        typer.echo(f"  {len(report.stray)} leftover temp file(s) of interrupted writes (harmless), e.g. "
                   f"{report.stray[0]}")
    typer.echo("OK" if report.ok else "FAILED")
    if not report.ok:
        raise typer.Exit(1)
