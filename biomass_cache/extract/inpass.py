"""The reduced store written in the extraction pass (`biomass extract --reduce`): no full-size tokens on disk.

Phase one runs the clean view (view 0) of every image and keeps its layer-normed, pooled tokens at full width in a
small side store beside the output (`NAME.fit.zarr`: 1.4 MB per ViT-L image); the PCA is fitted on them as
`biomass reduce` fits on a full store (store/reduce.py `fit_pca`, the same seeded subset). The reduced store is then
created with the projection inside, so a run killed after this point resumes without fitting again; phase two runs
the other views and reduces them as they come off the backbone, taking the clean views from the side store, which
is deleted once the reduced store is complete. With `like` (a test cache: the training run's projection) there is
no phase one.

The tokens are rounded to the storage dtype before they are reduced (codec.stored_values), so the reduced store holds
what `biomass extract` + `biomass reduce` would give from the same settings, bit for bit whatever the dtype (tested:
the side store keeps the clean views in float16, as store/reduce.py `norm_pool` rounds them), under the same
fingerprint: the extraction's chained with the reduction's settings. `keep_full` also writes the full store.
"""

from __future__ import annotations

from pathlib import Path

import torch

from biomass_cache.common.errors import DataError
from biomass_cache.common.lock import WriterLock
from biomass_cache.extract.config import fit_store_path
from biomass_cache.extract.loop import Item, Run, Sample, Sink, view_slices
from biomass_cache.extract.passes import full_spec, items_of, missing_views, run_pass
from biomass_cache.store.codec import stored_values
from biomass_cache.store.handle import TokenStore
from biomass_cache.store.fingerprint import diff
from biomass_cache.store.layout import (StoreSpec, delete_store, is_zarr_store, open_store,
                                        remove_leftovers)
from biomass_cache.store.reduce import (
    Reduction,
    check_settings,
    fit_pca,
    norm_pool,
    reduced_spec,
    reduction_of,
    resolve_pool,
    usable_images,
)


def clean_fingerprint(parent: dict, pool: int) -> dict:
    """The side store's: the extraction's, then layer norm and pooling of the clean view."""
    return {"parent": parent, "clean_view": {"layer_norm": True, "pool": pool}}


class CleanSink(Sink):
    """Phase one: the clean view, rounded to the storage dtype, layer-normed and pooled (what the PCA is fitted on
    and what the reduced store's view 0 is projected from)."""

    def __init__(self, store: TokenStore, parent_dtype: str, grid: tuple[int, int], pool: int):
        super().__init__(store)
        self.parent_dtype, self.grid, self.pool = parent_dtype, grid, pool

    def samples(self, item: Item, tokens: torch.Tensor, prefix: torch.Tensor) -> list[Sample]:
        x = stored_values(tokens[:1], self.parent_dtype)  # phase one's items hold view 0 alone
        return [(self.rows[item.image_id], slice(None), norm_pool(x, self.grid, self.pool), None)]


class ReducedSink(Sink):
    """Phase two: the views reduced with the projection; an image's clean view, when the side store holds it,
    projected from there and written with the others."""

    def __init__(self, store: TokenStore, reduction: Reduction, parent_dtype: str, clean: TokenStore | None,
                 from_clean: set[str]):
        super().__init__(store)
        self.reduction, self.parent_dtype, self.clean, self.from_clean = reduction, parent_dtype, clean, from_clean

    def clean_view(self, image_id: str, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """The image's clean view from the side store, projected on `device` (copied from pinned memory without
        waiting for the device's queued work)."""
        x = torch.from_numpy(self.clean.read(self.clean.image_ids.index(image_id), 0))
        if device.type == "cuda":
            x = x.pin_memory().to(device, non_blocking=True)
        return self.reduction.project(x)

    def samples(self, item: Item, tokens: torch.Tensor, prefix: torch.Tensor) -> list[Sample]:
        x, views = self.reduction.apply(stored_values(tokens, self.parent_dtype)), item.views
        if item.image_id in self.from_clean and 0 not in views:
            x, views = torch.cat([self.clean_view(item.image_id, x.device)[None], x]), (0, *views)
        i = self.rows[item.image_id]
        return [(i, v, x[at], None) for v, at in view_slices(views, self.store.n_views)]


def extract_reduced(run: Run, like_ignore: tuple[str, ...] = ()) -> tuple[list[dict], TokenStore, int]:
    """Both phases (phase one only when no projection is known yet); returns the counts of every rank, the reduced
    store and how many of its samples were done before this call."""
    cfg, ranks = run.cfg, run.ranks
    parent, dtype = run.fingerprint.to_dict(), cfg.dtype
    reduction = _known_reduction(run, like_ignore)
    full = [(cfg.keep_full, full_spec(run))] if cfg.keep_full is not None else []
    clean_path = fit_store_path(cfg.out)
    per_rank: list[dict] = []
    if ranks.rank == 0:
        for leftover in remove_leftovers(clean_path):
            run.say(f"removed {leftover}, left behind by an interrupted run")
    if reduction is None:
        pool = resolve_pool(cfg.pool, run.grid)
        check_settings(run.backbone.embed_dim, run.grid, cfg.dim, pool,
                       f"{cfg.backbone} at {cfg.size[0]}x{cfg.size[1]} (the tokens to reduce)")
        if clean_path.exists() and not cfg.overwrite:
            check_side_store(clean_path, clean_fingerprint(parent, pool))
        grid = (run.grid[0] // pool, run.grid[1] // pool)
        spec = StoreSpec(image_ids=run.table["image_id"].tolist(), n_views=1, layers=run.layers, grid=grid,
                         channels=run.backbone.embed_dim, split=cfg.split,
                         fingerprint=clean_fingerprint(parent, pool),
                         dtype="float16", random_weights=run.backbone.weights_sha256 == "random")

        def pending_clean(stores: list[TokenStore]) -> list[Item]:
            need = {i: (0,) for store in stores for i, views in missing_views(run, store).items() if 0 in views}
            return items_of(run, stores[-1], need)

        per_rank, stores = run_pass(run, [*full, (clean_path, spec)], lambda stores: [
            *map(Sink, stores[:-1]), CleanSink(stores[-1], dtype, run.grid, pool)], pending_clean,
            f"extract {cfg.split}, phase 1 of 2 (clean views)")
        error = None
        if ranks.rank == 0:
            try:
                rows = usable_images(stores[-1])
                mean, comps = fit_pca(((i, torch.from_numpy(stores[-1].read(i, 0))) for i in rows), len(rows),
                                      cfg.dim, cfg.fit_tokens)
                reduction = Reduction(run.layers, mean, comps, pool, parent, run.grid)
                run.say(f"fitted the projection on the clean views of {len(rows)} images: {run.backbone.embed_dim} "
                        f"-> {cfg.dim} channels, grid {list(run.grid)} -> {list(reduction.grid)}")
            except Exception as e:  # the other ranks are waiting for the projection: they stop too
                error = e
        reduction, message = ranks.broadcast((reduction, None if error is None else str(error)))
        if error is not None:
            raise error
        if message is not None:
            raise DataError(f"rank 0 could not fit the projection: {message}")

    clean = open_store(clean_path) if clean_path.exists() else None
    if clean is not None and clean.fingerprint != clean_fingerprint(parent, reduction.pool):
        clean = None  # another extraction's or pooling's: its clean views are not these
    spec = reduced_spec(reduction, run.table["image_id"].tolist(), cfg.views, run.layers, parent, cfg.split, dtype,
                        run.backbone.weights_sha256 == "random")
    if clean is not None:
        spec.attrs["bad_ids"] = clean.bad_ids
    from_clean: set[str] = set()
    only_clean: list[str] = []
    already: list[int] = []

    def pending(stores: list[TokenStore]) -> list[Item]:
        reduced = stores[-1]
        already.append(int(reduced.done().sum()))
        missing = missing_views(run, reduced, say_skipped=True)
        missing_full = missing_views(run, stores[0]) if full else {}
        current = reduced.content_hashes  # recorded when the reduced store was prepared: the photos as they are
        have = set() if clean is None else {i for i, done in zip(clean.image_ids, clean.done()[:, 0])
                                             if done and i not in clean.bad_ids
                                             and clean.content_hashes.get(i) == current.get(i)}
        need = {}
        for image_id in set(missing) | set(missing_full):
            r, f = set(missing.get(image_id, ())), set(missing_full.get(image_id, ()))
            if 0 in r and 0 not in f and image_id in have:
                from_clean.add(image_id)
                r.discard(0)
                if not r | f:
                    only_clean.append(image_id)
            need[image_id] = tuple(sorted(r | f))
        return items_of(run, reduced, need)

    sinks = lambda stores: [*map(Sink, stores[:-1]), ReducedSink(stores[-1], reduction, dtype, clean, from_clean)]  # noqa: E731
    more, stores = run_pass(run, [*full, (cfg.out, spec)], sinks, pending,
                            f"extract {cfg.split}" + (", phase 2 of 2" if per_rank else "") + " (reduced in the pass)")
    reduced = stores[-1]
    if ranks.rank == 0:
        sink = sinks(stores)[-1]
        for image_id in only_clean:  # nothing left to run for these: their clean view alone was missing
            reduced.write(sink.rows[image_id], 0, sink.clean_view(image_id))
        if only_clean:
            run.say(f"projected the clean view of {len(only_clean)} image(s) from {clean_path}")
        if clean is not None and _complete(reduced):
            if clean_path not in run.locks:
                run.locks[clean_path] = run.held.enter_context(WriterLock(clean_path))
            delete_store(clean_path)
    ranks.barrier()
    if per_rank:  # each rank's two phases as one; every image of phase one comes back in phase two
        more = [b | {"views": a["views"] + b["views"], "loop_s": a["loop_s"] + b["loop_s"], "bad": a["bad"] | b["bad"],
                     "images": max(a["images"], b["images"]),
                     "stages": {k: a.get("stages", {}).get(k, 0) + b.get("stages", {}).get(k, 0)
                                for k in {*a.get("stages", {}), *b.get("stages", {})}}}
                for a, b in zip(per_rank, more)]
    return more, open_store(cfg.out), already[0]


def check_side_store(path: Path, fingerprint: dict) -> None:
    """Refuse phase one's clean views of an interrupted extraction with other settings (kept: resuming that
    extraction reuses them; --overwrite replaces them)."""
    if not is_zarr_store(path):
        raise DataError(f"{path}: not a token store (no zarr.json), where --reduce keeps its clean views; remove it, "
                        "or choose another --out")
    side = open_store(path)
    if side.storage_dtype != "float16":  # an earlier version's (bfloat16 under a bfloat16 store)
        raise DataError(f"{path}: clean views kept in {side.storage_dtype} by an earlier version, not float16: the "
                        "reduced store would not equal extract + reduce; remove it (phase one runs again), or pass "
                        "--overwrite")
    differences = diff(side.fingerprint, fingerprint)
    if differences:
        raise DataError(f"{path} holds the clean views of another --reduce extraction (interrupted, or running) "
                        f"with other settings ({'; '.join(differences)}); resume it with those settings, or remove "
                        "it (its phase one is lost)")


def _complete(store: TokenStore) -> bool:
    done, bad = store.done(), store.bad_ids
    return all(done[k].all() for k, i in enumerate(store.image_ids) if i not in bad)


def _known_reduction(run: Run, like_ignore: tuple[str, ...]) -> Reduction | None:
    """The projection of the output store being resumed, else `like`'s, checked against these tokens; None when
    phase one must fit one."""
    cfg = run.cfg
    red = None
    if cfg.out.exists() and not cfg.overwrite:
        red = Reduction.of_store(open_store(cfg.out))
        if red is None:
            raise DataError(f"--out {cfg.out}: a store of full tokens, not a reduced one; resume it without "
                            "--reduce, or reduce into another --out")
        if cfg.like is not None and reduction_of(cfg.like).sha256 != red.sha256:
            raise DataError(f"--out {cfg.out} was reduced with another projection than --like {cfg.like}; "
                            "choose another --out, or --overwrite")
        if cfg.like is None and (red.dim, red.pool) != (cfg.dim, resolve_pool(cfg.pool, run.grid)):
            raise DataError(f"--out {cfg.out} holds {red.dim} channels pooled {red.pool} x {red.pool}; resume it "
                            f"with --dim {red.dim} --pool {red.pool}, or --overwrite")
    elif cfg.like is not None:
        red = reduction_of(cfg.like)
    if red is not None:
        red.check_tokens(run.fingerprint.to_dict(), run.layers, run.backbone.embed_dim, run.grid,
                         f"--out {cfg.out}", like_ignore)
    return red
