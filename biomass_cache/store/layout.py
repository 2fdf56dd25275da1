"""The token store: frozen-backbone patch tokens in a Zarr v3 group, the contract between extraction and training.

Layout (plain `zarr.open_group(path)` reads everything; every fact a reader needs is in arrays and attributes):

- `tokens` (image, view, layer, token, channel): float16, or bfloat16 stored as its raw uint16 bits (float32 =
  bits << 16), or int8 with `scales`; token = patch index in row-major order over the patch grid (rows, cols).
- `scales` (image, view, layer, token) float32, int8 only: value = int8 * scale (symmetric absmax/127 per token).
- `prefix` (image, view, layer, n_prefix, channel) and `prefix_scales`: CLS + register tokens, when stored.
- `done` (image, view) bool: a sample is True only once its data is durably on disk.

Every data array is sharded one shard file per image (race-free: extraction splits work by image) with CRC32C
checksums on every inner chunk and on the shard index, which leads the shard file. Unwritten samples read as NaN
(fill values), never as zeros.
Group attributes are written by rank 0 only: `create_store`, `append_images`, `mark_bad`, `reset_images`,
`record_content_hashes`, `record_weights_path`. Optional attributes: `content_sha256` {image_id: sha256 of the
photo the tokens came from}, `weights_path` (the weights file they came from).
An append killed between growing the arrays and recording the ids leaves arrays longer than `image_ids`: rows past
`image_ids` hold nothing, are ignored by readers and trimmed by the next writer (`trim_unrecorded_tail`).

This module creates and opens stores; store/handle.py holds `TokenStore`, the handle on an open store (reads,
writes, attribute changes). Beside them: store/codec.py (the exact value encoding), shards.py (direct reads and
writes of uncompressed shards), verify.py (`biomass verify`, reading every chunk back).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

from biomass_cache.common.errors import StoreError
from biomass_cache.common.io import left_by_killed, remove_path
from biomass_cache.store.handle import FLAT_KEYS, TokenStore

FORMAT_VERSION = 1
STORAGE_DTYPES = ("float16", "bfloat16", "int8")
SPLITS = ("train", "test")
# Inner-chunk codecs before the checksum, picked by benchmarks/bench_store.py (docs: Benchmarks, "The token store"):
# fp16 tokens hardly compress and every compressor costs read speed, so the default stores raw bytes.
CODECS = {
    "none": (),
    "zstd": (ZstdCodec(level=1),),
    "blosc-lz4": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2),),
}
DEFAULT_CODEC = "none"
# "shard/inner chunk": a shard file per image or per (image, view) sample; an inner chunk per (image, view, layer)
# (a one-layer read touches one inner chunk) or per sample. Picked by benchmarks/bench_store.py.
LAYOUTS = ("image/layer", "image/sample", "sample/layer")
DEFAULT_LAYOUT = "image/layer"
BF16_NAN_BITS = 0x7FC0
REQUIRED_ATTRS = ("fingerprint", "image_ids", "split", "grid", "layers", "n_views", "channels", "n_prefix",
                  "storage_dtype", "random_weights", "bad_ids", "format_version")
# Stored dtype and fill value per storage dtype; the fill marks never-written data (NaN once decoded).
_STORED = {"float16": ("float16", float("nan")), "bfloat16": ("uint16", BF16_NAN_BITS), "int8": ("int8", 0)}
INDEX_LOCATION = "start"  # shard index before the chunks: a cold read runs forward through the file (docs: Benchmarks)


@dataclass
class StoreSpec:
    """Everything `create_store` needs. `random_weights=None` infers it from the fingerprint's `weights_sha256`."""

    image_ids: list[str]
    n_views: int
    layers: list[int]
    grid: tuple[int, int]
    channels: int
    fingerprint: dict
    split: str = "train"
    dtype: str = "float16"
    n_prefix: int = 0
    random_weights: bool | None = None
    attrs: dict = field(default_factory=dict)  # further group attributes (a reduced store's `reduction`)
    extras: dict = field(default_factory=dict)  # name -> small array beside the tokens (its projection)


def _as_json(obj: Any, what: str) -> Any:
    """Round-trip through JSON so tuples equal lists and unserialisable values fail here, not later."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} must be JSON-serialisable: {e}") from e


def _infer_random_weights(fingerprint: dict) -> bool:
    """True when the fingerprint names random weights; refuses to guess when it says nothing about weights."""
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "weights_sha256":
                    found.append(v == "random")
                walk(v)

    walk(fingerprint)
    if not found:
        raise StoreError("StoreSpec.random_weights is None and the fingerprint has no 'weights_sha256' key: "
                         "set random_weights explicitly")
    return any(found)


def _validate_spec(spec: StoreSpec) -> None:
    problems = []
    if len(set(spec.image_ids)) != len(spec.image_ids):
        problems.append("image_ids has duplicates")
    if not all(isinstance(i, str) and i for i in spec.image_ids):
        problems.append("image_ids must be non-empty strings")
    if spec.n_views < 1:
        problems.append(f"n_views must be >= 1, got {spec.n_views}")
    if not spec.layers or any(not isinstance(x, int) or x < 0 for x in spec.layers):
        problems.append(f"layers must be non-negative block indices, got {spec.layers}")
    if len(set(spec.layers)) != len(spec.layers):
        problems.append(f"layers has duplicates: {spec.layers}")
    if len(spec.grid) != 2 or min(spec.grid) < 1:
        problems.append(f"grid must be (rows, cols) >= 1, got {spec.grid}")
    if spec.channels < 1 or spec.n_prefix < 0:
        problems.append(f"channels must be >= 1 and n_prefix >= 0, got {spec.channels}, {spec.n_prefix}")
    if spec.split not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, got {spec.split!r}")
    if spec.dtype not in STORAGE_DTYPES:
        problems.append(f"dtype must be one of {STORAGE_DTYPES}, got {spec.dtype!r}")
    if not isinstance(spec.fingerprint, dict):
        problems.append("fingerprint must be a dict")
    if problems:
        raise StoreError("invalid StoreSpec: " + "; ".join(problems))


def is_zarr_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def create_store(path: str | Path, spec: StoreSpec, overwrite: bool = False, *, codec: str = DEFAULT_CODEC,
                 layout: str = DEFAULT_LAYOUT) -> TokenStore:
    """Create an empty store (rank 0 only). Built under a temporary name and renamed, so it appears whole."""
    path = Path(path)
    _validate_spec(spec)
    if codec not in CODECS or layout not in LAYOUTS:
        raise StoreError(f"codec must be one of {list(CODECS)} and layout one of {LAYOUTS}, "
                         f"got {codec!r}, {layout!r}")
    if path.exists():
        if not overwrite:
            raise StoreError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        if not is_zarr_store(path):
            raise StoreError(f"refusing to overwrite {path}: it is not a zarr store (no zarr.json)")
    random_weights = _infer_random_weights(spec.fingerprint) if spec.random_weights is None else spec.random_weights
    remove_leftovers(path)
    attrs = {
        "fingerprint": _as_json(spec.fingerprint, "fingerprint"),
        "image_ids": list(spec.image_ids),
        "split": spec.split,
        "grid": [int(g) for g in spec.grid],
        "layers": [int(x) for x in spec.layers],
        "n_views": int(spec.n_views),
        "channels": int(spec.channels),
        "n_prefix": int(spec.n_prefix),
        "storage_dtype": spec.dtype,
        "random_weights": bool(random_weights),
        "bad_ids": {},
        "format_version": FORMAT_VERSION,
        "encoding": {"codec": codec, "layout": layout, "bfloat16": "uint16 bits: float32 = bits << 16",
                     "int8": "float32 = int8 * scales[..., None]", "unwritten": "NaN after decoding"},
        **_as_json(spec.attrs, "attrs"),
    }
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _build(tmp, spec, attrs, codec, layout)
        if spec.extras:  # inside the temporary folder: the store appears with them or not at all
            built = open_store(tmp, mode="r+")
            for name, data in spec.extras.items():
                built.write_extra(name, data)
        trash = set_aside(path)  # swap in the new store, then delete the old one
        os.replace(tmp, path)
        if trash is not None:
            shutil.rmtree(trash)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_store(path, mode="r+")


def set_aside(path: Path) -> Path | None:
    """Rename a store to `.NAME.old-PID` (None when there is none): it is gone from its name at once, and what a
    kill leaves of its deletion is a leftover `remove_leftovers` deletes, never a half-deleted store."""
    if not path.exists():
        return None
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, trash)
    return trash


def delete_store(path: Path) -> None:
    """Delete a store whole: set aside, then removed."""
    trash = set_aside(Path(path))
    if trash is not None:
        shutil.rmtree(trash)


def remove_leftovers(path: str | Path) -> list[Path]:
    """Delete what a killed `create_store` or `reduce_store` left beside `path` (`.NAME.creating-PID`, `.NAME.old-PID`:
    a whole old store being deleted, `.NAME.reducing-PID`) when process PID is gone; returns what was removed."""
    path = Path(path)
    removed = []
    for leftover in sorted(path.parent.glob(f".{path.name}.*-*")):
        kind = leftover.name[len(path.name) + 2:].rpartition("-")[0]
        if kind in ("creating", "old", "reducing") and left_by_killed(leftover):
            remove_path(leftover)
            removed.append(leftover)
    return removed


def _build(root: Path, spec: StoreSpec, attrs: dict, codec: str, layout: str) -> None:
    group = zarr.create_group(store=LocalStore(root), zarr_format=3, attributes=attrs)
    n, v, n_layers, t = len(spec.image_ids), spec.n_views, len(spec.layers), spec.grid[0] * spec.grid[1]
    stored, fill = _STORED[spec.dtype]
    _add_array(group, "tokens", (n, v, n_layers, t, spec.channels), stored, fill, codec, layout)
    if spec.n_prefix:
        _add_array(group, "prefix", (n, v, n_layers, spec.n_prefix, spec.channels), stored, fill, codec, layout)
    if spec.dtype == "int8":
        _add_array(group, "scales", (n, v, n_layers, t), "float32", float("nan"), "none", layout)
        if spec.n_prefix:
            _add_array(group, "prefix_scales", (n, v, n_layers, spec.n_prefix), "float32", float("nan"), "none",
                       layout)
    group.create_array("done", shape=(n, v), dtype="bool", chunks=(1, v), fill_value=False,
                       compressors=(Crc32cCodec(),), dimension_names=("image", "view"), chunk_key_encoding=FLAT_KEYS)


def _add_array(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str, fill: Any, codec: str,
               layout: str) -> None:
    """Shards never span two images (race-free under the by-image rule); CRC32C on every chunk and shard index."""
    shard, inner = layout.split("/")
    shards = (1, *shape[1:]) if shard == "image" else (1, 1, *shape[2:])
    chunks = (1, 1, 1, *shape[3:]) if inner == "layer" else (1, 1, *shape[2:])
    names = ("image", "view", "layer", "token", "channel")[: len(shape)]
    group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, fill_value=fill,
                       shards={"shape": shards, "index_location": INDEX_LOCATION},
                       compressors=(*CODECS[codec], Crc32cCodec()), dimension_names=names,
                       chunk_key_encoding=FLAT_KEYS)


def open_store(path: str | Path, mode: Literal["r", "r+"] = "r") -> TokenStore:
    """Open an existing store; anything that is not a token store of this format version is a clear error."""
    path = Path(path)
    if mode not in ("r", "r+"):
        raise StoreError(f"mode must be 'r' or 'r+', got {mode!r}")
    if not path.is_dir():
        raise StoreError(f"{path}: no token store here (not a directory)")
    try:
        group = zarr.open_group(store=LocalStore(path, read_only=mode == "r"), mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises several types for "not a group"
        raise StoreError(f"{path} is not a Zarr v3 group: {e}") from e
    attrs = dict(group.attrs)
    if "format_version" not in attrs:
        raise StoreError(f"{path} is not a token store (no 'format_version' attribute)")
    if attrs["format_version"] != FORMAT_VERSION:
        raise StoreError(f"{path}: unsupported format_version {attrs['format_version']!r} "
                         f"(this code reads {FORMAT_VERSION}); re-extract the store")
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        raise StoreError(f"{path}: token store attributes missing: {missing}")
    return TokenStore(path, group, attrs, mode)


