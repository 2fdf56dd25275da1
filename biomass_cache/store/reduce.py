"""Cache reduction: a derived token store with fewer channels and, optionally, a coarser patch grid.

Per layer, the tokens are layer-normed (no affine, as the heads do), average-pooled P x P over the patch grid, then
projected on the top K principal components fitted on the clean view of the training store's images. The result is
an ordinary token store (same format, readable with plain zarr) whose fingerprint chains the parent's with the
reduction settings and the projection's sha256; it also holds the projection itself (`reduction_mean`,
`reduction_components`), so test stores are reduced with exactly the same matrices. Stage two then reads and
computes a fraction of the full cache (docs: the scale benchmark).

The PCA sees every training image (no labels), including the images of each fold's validation set: like the
backbone, it is an unsupervised transform of the inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save
from tqdm.auto import tqdm

from biomass_cache.backbone.precision import native_bf16
from biomass_cache.common.config import read_config
from biomass_cache.common.errors import DataError
from biomass_cache.common.io import atomic_folder, check_output_folder, write_bytes, write_json
from biomass_cache.common.lock import WriterLock
from biomass_cache.common.runtime import available_ram, usable_cores
from biomass_cache.store.fingerprint import reduced, relaxed_diff
from biomass_cache.store.handle import EncodedSample, TokenStore
from biomass_cache.store.layout import StoreSpec, create_store, is_zarr_store, open_store, remove_leftovers
from biomass_cache.store.writer import Writer

METHOD = "pca-layernorm"
DEFAULT_DIM = 128
DEFAULT_POOL = "auto"  # the coarsest pooling that keeps at least MIN_GRID patches
MIN_GRID = (14, 28)  # rows, cols: the grid at which the quality benchmark measured (docs: benchmarks)
DEFAULT_FIT_TOKENS = 100_000  # tokens per layer the PCA is fitted on (a random subset of the pooled clean views)
FIT_CHUNK = 8  # images per Gram matrix of the fit


@dataclass(frozen=True)
class Reduction:
    """A fitted reduction: per-layer mean (L, C) and components (L, C, K) of the layer-normed, pooled tokens."""

    layers: list[int]
    mean: np.ndarray
    components: np.ndarray
    pool: int
    parent_fingerprint: dict  # of the store it was fitted on
    parent_grid: tuple[int, int]

    @property
    def dim(self) -> int:
        return int(self.components.shape[-1])

    @property
    def channels(self) -> int:
        return int(self.components.shape[1])

    @property
    def grid(self) -> tuple[int, int]:
        return self.parent_grid[0] // self.pool, self.parent_grid[1] // self.pool

    @property
    def sha256(self) -> str:
        h = hashlib.sha256(json.dumps({"layers": self.layers, "pool": self.pool, "method": METHOD}).encode())
        for a in (self.mean, self.components):
            h.update(np.ascontiguousarray(a, dtype="<f4").tobytes())
        return h.hexdigest()

    def settings(self) -> dict:
        return {"method": METHOD, "dim": self.dim, "pool": self.pool, "projection_sha256": self.sha256}

    def fingerprint(self, parent: dict) -> dict:
        return reduced(parent, self.settings())

    def check_parent(self, store: TokenStore, ignore: Sequence[str] = ()) -> None:
        """Refuse a store whose tokens were made otherwise than those the projection was fitted on (but for the
        fingerprint keys `ignore` names: the compute precision, when the user chose another one)."""
        self.check_tokens(store.fingerprint, store.layers, store.channels, tuple(store.grid), str(store.path), ignore)

    def check_tokens(self, fingerprint: dict, layers: Sequence[int], channels: int, grid: tuple[int, int],
                     where: str, ignore: Sequence[str] = ()) -> None:
        """`check_parent` for tokens described by their fingerprint and shape (an extraction reducing in the pass)."""
        diff = relaxed_diff(self.parent_fingerprint, fingerprint, ignore)
        if diff:
            raise DataError(f"{where}: its tokens were extracted with another configuration than the store "
                            "the projection was fitted on (fitted on -> this store): " + "; ".join(diff))
        if list(layers) != self.layers or channels != self.channels or tuple(grid) != self.parent_grid:
            raise DataError(f"{where}: layers {list(layers)}, {channels} channels, grid {list(grid)}; "
                            f"the projection needs {self.layers}, {self.channels}, {list(self.parent_grid)}")

    @torch.no_grad()
    def apply(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., L, T, C) tokens of the parent grid -> (..., L, T', K) float32 reduced tokens. Pooling and the
        projection are both linear, so pooling first gives the same tokens with a pool^2-th of the matmul."""
        return self.project(norm_pool(tokens, self.parent_grid, self.pool))

    @torch.no_grad()
    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(..., L, T', C) layer-normed, pooled tokens -> (..., L, T', K), on their device."""
        comps = torch.as_tensor(self.components, device=pooled.device)
        return pooled @ comps - (torch.as_tensor(self.mean, device=pooled.device)[:, None] @ comps)

    # ---- artefacts ----------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {**self.settings(), "layers": self.layers, "parent_grid": list(self.parent_grid),
                "channels": self.channels, "parent_fingerprint": self.parent_fingerprint}

    def save(self, path: Path) -> None:
        """`path`.safetensors (mean, components) then `path`.json (what they are): a run folder's copy."""
        path = Path(path)
        write_bytes(path.with_suffix(".safetensors"), save({"mean": self.mean, "components": self.components}))
        write_json(path.with_suffix(".json"), self.describe())

    @classmethod
    def load(cls, path: Path) -> "Reduction":
        path = Path(path)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            arrays = load_file(str(path.with_suffix(".safetensors")))
            red = cls(list(meta["layers"]), arrays["mean"], arrays["components"], int(meta["pool"]),
                      meta["parent_fingerprint"], tuple(meta["parent_grid"]))
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise DataError(f"{path.with_suffix('.json')}: not a readable reduction ({e})") from e
        if red.sha256 != meta.get("projection_sha256"):
            raise DataError(f"{path.with_suffix('.safetensors')}: the projection's sha256 differs from the one "
                            f"recorded in {path.with_suffix('.json').name} (file changed?)")
        return red

    @classmethod
    def of_store(cls, store: TokenStore) -> Optional["Reduction"]:
        """The reduction a derived store was made with (None for a store straight from extraction)."""
        meta = store.attrs.get("reduction")
        if meta is None:
            return None
        red = cls(list(meta["layers"]), store.read_extra("reduction_mean"), store.read_extra("reduction_components"),
                  int(meta["pool"]), meta["parent_fingerprint"], tuple(meta["parent_grid"]))
        if red.sha256 != meta["projection_sha256"]:
            raise DataError(f"{store.path}: its projection arrays do not match the recorded sha256 (store damaged)")
        return red


def norm_pool(tokens: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """Layer-normed, P x P pooled tokens (..., T / P^2, C) as float32: what a reduction projects. float16 tokens
    (a store's own values) are normed and pooled in float16, with float32 arithmetic inside and one rounding of each
    result: a third of the time of a float32 copy first on a CPU (one ViT-L view, projection included: 3.5 against
    12 ms on 2 cores), and within the store's own float16 rounding of the tokens. Other dtypes go through float32,
    the result rounded to float16 as well: the clean views a reduction in the extraction pass keeps in float16
    (extract/inpass.py) are then the very values this gives, whatever the store's dtype."""
    if tokens.dtype != torch.float16:
        return pool_tokens(F.layer_norm(tokens.float(), tokens.shape[-1:]), grid, pool).half().float()
    return pool_tokens(F.layer_norm(tokens, tokens.shape[-1:]), grid, pool).float()


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int], pool: int) -> torch.Tensor:
    """P x P average pooling of (..., T, C) row-major patch tokens on `grid` -> (..., T / P^2, C)."""
    if pool == 1:
        return tokens
    lead, c = tokens.shape[:-2], tokens.shape[-1]
    x = tokens.reshape(-1, *grid, c).permute(0, 3, 1, 2)  # channels-last memory: avg_pool2d's fast path
    return F.avg_pool2d(x, pool).permute(0, 2, 3, 1).reshape(*lead, -1, c)


def auto_pool(grid: tuple[int, int]) -> int:
    """The largest P dividing the grid that leaves at least MIN_GRID patches (1 for a grid of MIN_GRID or less)."""
    return max(p for p in range(1, min(grid) + 1)
               if grid[0] % p == 0 and grid[1] % p == 0 and grid[0] // p >= MIN_GRID[0]
               and grid[1] // p >= MIN_GRID[1]) if grid[0] >= MIN_GRID[0] and grid[1] >= MIN_GRID[1] else 1


def resolve_pool(pool: int | str, grid: tuple[int, int]) -> int:
    if pool == "auto":
        return auto_pool(grid)
    try:
        p = int(pool)
    except (TypeError, ValueError):
        raise DataError(f"--pool {pool!r}: must be 'auto' or a whole number") from None
    if p < 1:
        raise DataError(f"--pool {p}: must be >= 1 and divide the patch grid {list(grid)} (--pool 1 keeps the grid)")
    return p


def check_settings(channels: int, grid: Sequence[int], dim: int, pool: int, where: str) -> None:
    """Refuse a --dim above the channels or a --pool that does not divide the patch grid (before any work)."""
    if not 1 <= dim <= channels:
        raise DataError(f"--dim {dim}: must be between 1 and the {channels} channels of {where}")
    if pool < 1 or grid[0] % pool or grid[1] % pool:
        raise DataError(f"--pool {pool}: must be >= 1 and divide the patch grid {list(grid)} of {where} "
                        "(--pool 1 keeps the grid)")


def usable_images(store: TokenStore) -> list[int]:
    """Store rows of every image not marked bad; all its views must be done (else: resume the extraction)."""
    done, bad = store.done(), store.bad_ids
    rows = [i for i, iid in enumerate(store.image_ids) if iid not in bad]
    missing = [store.image_ids[i] for i in rows if not done[i].all()]
    if missing:
        raise DataError(f"{store.path}: {len(missing)} image(s) are not completely extracted, e.g. {missing[:5]}; "
                        "resume the extraction (biomass extract with the same options) before reducing")
    if not rows:
        raise DataError(f"{store.path}: no extracted image to fit a reduction on")
    return rows


def fit_reduction(store: TokenStore, dim: int = DEFAULT_DIM, pool: int | str = DEFAULT_POOL,
                  fit_tokens: int = DEFAULT_FIT_TOKENS, seed: int = 0, progress: bool = True,
                  keep: dict[int, torch.Tensor] | None = None) -> Reduction:
    """Per-layer PCA of the layer-normed, pooled clean-view tokens (a seeded subset of `fit_tokens` per layer).
    Each chunk of images' part (read, norm, pool, their Gram matrix) is computed by `in_threads`. `keep`: filled
    with every image's normed, pooled view 0 (float16, as computed), for `reduce_store` to project instead of
    reading and norming it again (`keep_clean_views` says whether they fit in memory)."""
    if store.attrs.get("reduction") is not None:
        raise DataError(f"{store.path} is a reduced store already ({store.channels} channels): reduce the full store "
                        "it was made from (its runs could not reduce their test stores alike)")
    pool = resolve_pool(pool, tuple(store.grid))
    check_settings(store.channels, store.grid, dim, pool, str(store.path))
    rows = usable_images(store)
    per_image = tokens_per_image(fit_tokens, len(rows))
    chunks = list(fit_chunks(rows))

    def moments(k: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        subsets = []
        for i in chunks[k]:
            x = norm_pool(store.read_values(i, 0), store.grid, pool)
            if keep is not None:
                keep[i] = x.half()
            subsets.append(fit_subset(x, i, per_image, seed))
        return chunk_moments(subsets)

    def counted(parts: Iterator[tuple[int, Any]]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        with tqdm(total=len(rows), desc="fit PCA", disable=not progress, leave=False) as bar:
            for k, part in parts:
                bar.update(len(chunks[k]))
                yield part

    with closing(in_threads(moments, range(len(chunks)))) as parts:
        mean, comps = pca_of(counted(parts), dim)
    return Reduction(store.layers, mean, comps, pool, store.fingerprint, tuple(store.grid))


def keep_clean_views(store: TokenStore, pool: int | str = DEFAULT_POOL, share: float = 0.25) -> bool:
    """Whether the fit's normed, pooled clean views of a float16 store (their own precision: kept exactly) fit in
    `share` of the available RAM, so that `reduce_store` reads and norms three views of four instead of four."""
    pool = resolve_pool(pool, tuple(store.grid))
    size = len(store.image_ids) * len(store.layers) * store.grid[0] * store.grid[1] // pool ** 2 * store.channels * 2
    return store.storage_dtype == "float16" and size <= share * available_ram()


def tokens_per_image(fit_tokens: int, n_images: int) -> int:
    return max(1, -(-fit_tokens // n_images))


def fit_chunks(items: Iterable) -> Iterator[list]:
    """The fit's units of work: FIT_CHUNK consecutive images (rows, or (row, pooled view) pairs), whose token subsets
    make one Gram matrix; the same rows in the same order give the same chunks, hence the same fit."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == FIT_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def fit_subset(x: torch.Tensor, row: int, per_image: int, seed: int = 0) -> torch.Tensor:
    """The tokens of one image's (L, T', C) pooled clean view the PCA sees: `per_image` of them, drawn from (seed,
    store row), so that the in-pass fit and `biomass reduce` see the same tokens."""
    x = x.float()
    if x.shape[1] > per_image:
        pick = np.random.default_rng([seed, row]).choice(x.shape[1], per_image, replace=False)
        x = x[:, torch.from_numpy(np.sort(pick))]
    return x


def chunk_moments(subsets: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A chunk's part of the PCA: the Gram matrix (L, C, C) and sum (L, C) of its images' token subsets, float64,
    and how many tokens.

    The Gram matrix is computed in bf16 where the hardware multiplies it (`native_bf16`), 4x faster than fp32 on a
    CPU with AMX: on a synthetic power-law spectrum it moves the fitted 128-dimensional subspace by 0.4 % (relative
    error of the projected tokens), against 12 % between fits on two halves of the same images. One matrix per
    chunk of images rather than per image: its float64 copy and sum cost as much as the product itself."""
    x = torch.cat(list(subsets), dim=1)
    xb = x.to(torch.bfloat16 if native_bf16(x.device) else torch.float32)
    return (xb.transpose(1, 2) @ xb).double().cpu(), x.sum(dim=1).double().cpu(), x.shape[1]


def pca_of(moments: Iterable[tuple[torch.Tensor, torch.Tensor, int]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer mean (L, C) and top-`dim` components (L, C, K), deterministic signs, from the images' moments."""
    gram = total = None
    count = 0
    for g, s, n in moments:
        if gram is None:
            gram, total = g, s
        else:
            gram += g
            total += s
        count += n
    mean = total / count
    cov = gram / count - mean[:, :, None] * mean[:, None, :]
    # float32: 1.7x faster than float64 (ViT-L: 0.17 against 0.29 s), and far finer than the bf16 Gram matrices
    _, vectors = torch.linalg.eigh(cov.float())  # ascending eigenvalues
    comps = vectors.flip(-1)[..., :dim]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))  # deterministic sign
    comps = comps * torch.where(signs == 0, 1.0, signs)
    return mean.float().numpy(), comps.float().contiguous().numpy()


def fit_pca(pooled: Iterable[tuple[int, torch.Tensor]], n_images: int, dim: int,
            fit_tokens: int = DEFAULT_FIT_TOKENS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`fit_reduction`'s PCA, one image after another: (store row, its layer-normed, pooled clean view (L, T', C))
    of `n_images` images in row order, about `fit_tokens` tokens per layer in all; the same subsets and chunks for
    the same rows, so the same fit."""
    per_image = tokens_per_image(fit_tokens, n_images)
    chunks = fit_chunks(pooled)
    return pca_of((chunk_moments([fit_subset(x, i, per_image, seed) for i, x in chunk]) for chunk in chunks), dim)


def reduced_spec(reduction: Reduction, image_ids: list[str], n_views: int, layers: list[int], parent: dict,
                 split: str, parent_dtype: str, random_weights: bool) -> StoreSpec:
    """The spec of a store of `reduction`'s tokens, the projection inside (float16, or bfloat16 under a bfloat16
    parent: int8 would undo the precision the projection keeps)."""
    return StoreSpec(image_ids=list(image_ids), n_views=n_views, layers=list(layers), grid=reduction.grid,
                     channels=reduction.dim, fingerprint=reduction.fingerprint(parent), split=split,
                     dtype="bfloat16" if parent_dtype == "bfloat16" else "float16", random_weights=random_weights,
                     attrs={"reduction": reduction.describe()},
                     extras={"reduction_mean": reduction.mean, "reduction_components": reduction.components})


def reduce_store(src: TokenStore, reduction: Reduction, out: Path, overwrite: bool = False,
                 progress: bool = True, ignore: Sequence[str] = (), clean: dict[int, torch.Tensor] | None = None
                 ) -> TokenStore:
    """Write the reduced store at `out`: built under a temporary name and renamed when every sample is in.
    `ignore`: fingerprint keys in which `src` may differ from the store the projection was fitted on. `clean`: the
    fit's normed, pooled views 0 by row (`fit_reduction(keep=)`), projected instead of read again; emptied."""
    out = Path(out)
    reduction.check_parent(src, ignore)
    rows = usable_images(src)
    check_out(src, out, overwrite)
    spec = reduced_spec(reduction, src.image_ids, src.n_views, src.layers, src.fingerprint, src.split,
                        src.storage_dtype, src.random_weights)
    spec.attrs.update(bad_ids=src.bad_ids, content_sha256=src.content_hashes, weights_path=src.weights_path)
    with WriterLock(out):  # one writer of `out`
        for leftover in remove_leftovers(out):
            print(f"removed {leftover}, left behind by an interrupted run")
        with atomic_folder(out, "reducing") as tmp:
            store = create_store(tmp, spec)
            writer = Writer(store, 4)  # fsyncs wait on the disk, not the CPU: they overlap
            def reduce_image(i: int) -> EncodedSample:
                first = None if clean is None else clean.pop(i, None)  # the fit's view 0, normed and pooled
                views = [reduction.apply(src.read_values(i, v)) if v or first is None else
                         reduction.project(first.float()) for v in range(src.n_views)]
                return store.encode(i, slice(None), torch.stack(views), None)

            try:
                with closing(in_threads(reduce_image, rows)) as reduced:  # a failure stops the threads at once
                    for _, encoded in tqdm(reduced, total=len(rows), desc=f"reduce -> {out.name}",
                                           disable=not progress, leave=False):
                        writer.put(encoded)
            finally:
                writer.close()
            writer.check()
    return open_store(out)


def check_out(src: TokenStore, out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an --out that `reduce_store` may not write: one that exists (without --overwrite),
    that is not a token store (--overwrite replaces stores only), that is or holds the input, or that lies under a
    file."""
    out = Path(out)
    inside = {out.resolve(), *out.resolve().parents} & {src.path.resolve(), *src.path.resolve().parents}
    if src.path.resolve() in inside or out.resolve() in inside:
        raise DataError(f"--out {out} is, holds or lies in the input store {src.path}; choose another path")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    if out.exists() and not is_zarr_store(out):
        raise DataError(f"--out {out}: refusing to overwrite it, it is not a token store (no zarr.json); choose "
                        "another --out")
    check_output_folder(out, "--out")


def in_threads(fn: Callable[[int], Any], rows: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """(row, fn(row)) for every row in order, computed by one thread per core a few rows ahead of the caller, each
    with single-threaded torch ops. Reading a full store and norming it is memory-bound, element by element: whole
    images per core measured 1.3x faster than torch's own threads over one image at a time (26 against 35 ms per
    ViT-L image on 2 cores), and keep the reads
    overlapped with the arithmetic (benchmarks/bench_reduce.py)."""
    workers, threads = usable_cores(), torch.get_num_threads()  # read here first: the workers' setting stays theirs
    with ThreadPoolExecutor(workers, thread_name_prefix="reduce", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool:  # per thread: the caller keeps its own
        try:
            pending: deque = deque()
            for i in rows:
                pending.append((i, pool.submit(fn, i)))
                if len(pending) > 2 * workers:
                    j, done = pending.popleft()
                    yield j, done.result()
            while pending:
                j, done = pending.popleft()
                yield j, done.result()
        finally:  # a failure or a stop: the rows not started yet are dropped
            pool.shutdown(cancel_futures=True)
            torch.set_num_threads(threads)


def check_like(like: Path, reduction: Reduction, given: dict, config: Path | None = None) -> None:
    """Refuse reduction settings given with --like (`given`: the options on the command line, or, with `config`,
    the dim and pool a config file sets): the projection `like` brings has its own, and they would be silently
    ignored. A config's fit_tokens is let be: the same config reduces the training store and, --like its runs, the
    test stores."""
    same = {"dim": lambda v: v == reduction.dim, "fit_tokens": lambda v: config is not None,
            "pool": lambda v: resolve_pool(v, reduction.parent_grid) == reduction.pool}
    differs = [k for k, v in given.items() if v is not None and not same[k](v)]
    if differs and config is not None:
        raise DataError(f"--like {like} brings its projection ({reduction.dim} channels, pool {reduction.pool}), "
                        f"but {config} sets {', '.join(f'{k} = {given[k]!r}' for k in differs)}: remove "
                        f"{'it' if len(differs) == 1 else 'them'} there, or reduce without --like")
    if differs:
        raise DataError(f"--like {like} brings its projection ({reduction.dim} channels, pool {reduction.pool}): "
                        f"leave out {', '.join('--' + k.replace('_', '-') for k in differs)}")


def reduction_of(path: Path) -> Reduction:
    """The reduction held by a reduced store or saved in a run folder (`RUN/reduction.json`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such reduced store or run folder (give the store or the run whose projection "
                        "to apply)")
    if (path / "reduction.json").is_file():
        return Reduction.load(path / "reduction")
    if not is_zarr_store(path):
        seeds = sorted(p.parent for p in path.glob("seed*/reduction.json"))
        raise DataError(f"{path}: neither a reduced token store nor a run folder with a reduction.json" + (
            f"; it holds the runs of a seed ensemble (train --seeds): give one of them, e.g. {seeds[0]}" if seeds else
            " (a run trained on full tokens has none: its test stores are extracted, not reduced)"))
    red = Reduction.of_store(open_store(path))
    if red is None:
        raise DataError(f"{path}: neither a reduced token store nor a run folder with a reduction.json")
    return red


CONFIG_KEYS = {"dim": DEFAULT_DIM, "pool": DEFAULT_POOL, "fit_tokens": DEFAULT_FIT_TOKENS}


def load_settings(path: Path | None) -> dict:
    """The [reduce] table of a TOML config (configs/cpu_demo.toml), without the defaults (`CONFIG_KEYS`) it
    overrides; unknown keys are refused."""
    conf = read_config(path, suffixes=None)
    table = conf.section("reduce")
    conf.check_keys(table, CONFIG_KEYS, "[reduce]")
    bad = [k for k, v in table.items() if (not isinstance(v, int) or isinstance(v, bool))
           and not (k == "pool" and v == "auto")]
    if bad:
        raise conf.error(f"{bad} must be whole numbers (pool: or \"auto\")", "[reduce]")
    small = [k for k, v in table.items() if v != "auto" and v < 1]
    if small:
        raise conf.error(f"{small} must be at least 1", "[reduce]")
    return dict(table)
