"""A pass of stage one over its stores: rank 0 creates or resumes them (checking fingerprints, appending images new
in the CSV, redoing changed photos), every rank runs the loop on its share of the pending images (extract/loop.py),
and rank 0 marks the unreadable images bad. A plain extraction is one pass; an in-pass reduction two
(extract/inpass.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from biomass_cache.common.errors import StoreError
from biomass_cache.common.lock import WriterLock
from biomass_cache.extract.loop import Item, Run, Sink, run_views
from biomass_cache.common.content import content_hashes
from biomass_cache.store.handle import TokenStore
from biomass_cache.store.layout import StoreSpec, create_store, open_store, remove_leftovers
from biomass_cache.store.verify import verify


def run_pass(run: Run, stores: list[tuple[Path, StoreSpec]], sinks: Callable[[list[TokenStore]], list[Sink]],
             pending: Callable[[list[TokenStore]], list[Item]], desc: str) -> tuple[list[dict], list[TokenStore]]:
    """Rank 0 prepares `stores`, then every rank extracts its share of `pending(stores)` into `sinks(stores)`;
    rank 0 marks the unreadable images bad in every store. Returns every rank's counts and the stores."""
    ranks, error = run.ranks, None
    if ranks.rank == 0:
        try:
            for path, spec in stores:
                prepare_store(run, path, spec)
        except Exception as e:  # the other ranks wait in the broadcast below: they stop with rank 0's message
            error = e
    message = ranks.broadcast(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:  # the other ranks stop with rank 0's message
        raise StoreError(f"rank 0 could not prepare the store: {message}")
    opened = [open_store(path, mode="r+") for path, _ in stores]
    items = pending(opened)
    counts: dict[str, Any] = {"views": 0, "images": 0, "bad": {}, "loop_s": 0.0}
    if items:
        run.say(f"{desc}: {sum(len(it.views) for it in items)} views of {len(items)} images on {ranks.world} "
                f"rank(s), {','.join(map(str, run.devices))}, {run.precision} compute")
        mine = [it for k, it in enumerate(items) if k % ranks.world == ranks.rank]  # by image: all views on a rank
        counts = run_views(run, sinks(opened), mine, desc)
    per_rank = ranks.gather(counts)
    if ranks.rank == 0:
        for image_id, reason in {k: v for c in per_rank for k, v in c["bad"].items()}.items():
            for store in opened:
                store.mark_bad(image_id, reason)
    ranks.barrier()  # the attributes rank 0 rewrote are read again below
    return per_rank, [open_store(path, mode="r+") for path, _ in stores]


def missing_views(run: Run, store: TokenStore, say_skipped: bool = False) -> dict[str, tuple[int, ...]]:
    """image id -> views of `store` not done yet, for the images not marked bad (saying how many are skipped)."""
    done, bad = store.done(), store.bad_ids
    out = {image_id: tuple(int(v) for v in np.flatnonzero(~done[i])) for i, image_id in enumerate(store.image_ids)
           if image_id not in bad}
    skipped = [i for k, i in enumerate(store.image_ids) if i in bad and not done[k].all()]
    if skipped and say_skipped:
        run.say(f"{len(skipped)} image(s) marked bad in an earlier run are skipped: {skipped[:5]} (a photo "
                "whose content changed is retried by itself; --retry-bad retries them all)")
    return {k: v for k, v in out.items() if v}


def items_of(run: Run, store: TokenStore, views: dict[str, tuple[int, ...]]) -> list[Item]:
    """Work items in `store`'s row order for the images `views` names."""
    paths = dict(zip(run.table["image_id"], run.table["image_path"]))
    return [Item(i, image_id, run.cfg.data_dir / paths[image_id], views[image_id])
            for i, image_id in enumerate(store.image_ids) if views.get(image_id)]


def full_spec(run: Run) -> StoreSpec:
    """The store of the tokens as the backbone gives them."""
    cfg, backbone = run.cfg, run.backbone
    return StoreSpec(image_ids=run.table["image_id"].tolist(), n_views=cfg.views, layers=run.layers, grid=run.grid,
                     channels=backbone.embed_dim, fingerprint=run.fingerprint.to_dict(), split=cfg.split,
                     dtype=cfg.dtype, n_prefix=backbone.n_prefix * cfg.tiles if cfg.store_prefix else 0,
                     random_weights=backbone.weights_sha256 == "random")


# ---- preparing a store (rank 0) ----------------------------------------------------------------------------------
def prepare_store(run: Run, path: Path, spec: StoreSpec) -> None:
    """Create the store, or check an existing one's fingerprint and append images new in the CSV; then, holding the
    writer lock (held until the call ends), redo images whose photo changed and record the photos' hashes. A
    finished store on a read-only file system is used as it is; any change it would need is refused. `overwrite`
    replaces a store only the first time this call prepares it."""
    cfg, say = run.cfg, run.say
    image_ids = run.table["image_id"].tolist()
    first = path not in run.locks
    for leftover in remove_leftovers(path) if first else ():
        say(f"removed {leftover}, left behind by an interrupted run")
    if first:  # before replacing a store another run may be writing
        run.locks[path] = run.held.enter_context(WriterLock(path))
    lock = run.locks[path]
    if path.exists() and not (cfg.overwrite and first):
        store = open_store(path, mode="r+")
        store.check_fingerprint(spec.fingerprint, "--keep-full" if path == cfg.keep_full else "--out")
        listed = set(image_ids)
        gone = [i for i in store.image_ids if i not in listed]
        if gone:
            raise StoreError(f"{path}: {len(gone)} stored image(s) are not in {run.csv}: {gone[:5]}; extract to "
                             "another --out or rebuild with --overwrite")
        if store.trim_unrecorded_tail() if lock.held else False:
            say(f"{path}: trimmed the arrays of an append that was interrupted before it recorded its images")
        stored = set(store.image_ids)
        new = [i for i in image_ids if i not in stored]
        if new:
            _writable(lock, path, f"append {len(new)} new image(s)")
            say(f"appending {len(new)} new image(s) from {run.csv} to {path}")
            store.append_images(new)
    else:
        create_store(path, spec, overwrite=cfg.overwrite)
        store = open_store(path, mode="r+")
    if lock.held:
        for stray in store.path.rglob("*.partial"):  # temp files of writes killed midway
            stray.unlink(missing_ok=True)
    _refresh(run, store, lock)
    backbone = run.backbone
    weights = None if backbone.weights_sha256 == "random" else str(Path(backbone.weights).resolve())
    if store.record_weights_path(weights, write=lock.held):
        _writable(lock, path, "record the weights file")
    if not lock.held and missing_views(run, store):
        _writable(lock, path, "extract the samples not done yet")


def _writable(lock: WriterLock, path: Path, what: str) -> None:
    if not lock.held:
        raise StoreError(f"{path} is read-only: cannot {what}; make it writable or extract to another --out")


def _refresh(run: Run, store: TokenStore, lock: WriterLock) -> None:
    """Reset the images to redo (corrupt data with `recheck`, a photo changed since it was extracted or marked
    bad, every bad image with `retry_bad`), then record every photo's content hash."""
    cfg, say = run.cfg, run.say
    if cfg.recheck:  # first: a corrupt `done` chunk stops everything that reads it
        report = verify(store.path, progress=False)
        if report.broken_images:
            say(f"--recheck: {len(report.corrupt)} corrupt or missing chunk(s) in {len(report.broken_images)} "
                f"image(s), re-extracting {report.broken_images[:5]}: "
                + "; ".join(f"{key}: {err}" for key, err in report.corrupt[:3]))
            _writable(lock, store.path, f"re-extract {len(report.broken_images)} image(s)")
            store.reset_images(report.broken_images)
    paths = {i: cfg.data_dir / p for i, p in zip(run.table["image_id"], run.table["image_path"])}
    current, recorded, done, bad = content_hashes(paths), store.content_hashes, store.done(), store.bad_ids
    changed = [i for k, i in enumerate(store.image_ids)  # a photo deleted after extraction keeps its tokens
               if current.get(i) is not None and recorded.get(i, current[i]) != current[i]
               and (done[k].any() or i in bad)]
    if changed:
        say(f"{len(changed)} photo(s) changed since they were extracted (content sha256 differs): re-extracting "
            f"{changed[:5]}")
    if cfg.retry_bad and bad:
        say(f"--retry-bad: retrying {len(bad)} image(s) marked bad: {list(bad)[:5]}")
    redo = list(dict.fromkeys(changed + (list(bad) if cfg.retry_bad else [])))
    if redo:
        _writable(lock, store.path, f"re-extract {len(redo)} image(s)")
        store.reset_images(redo)
    fresh = {i: h for i, h in current.items() if i not in recorded or (h is not None and recorded[i] != h)}
    if fresh:
        _writable(lock, store.path, "record the photos' content hashes")
        store.record_content_hashes(fresh)
