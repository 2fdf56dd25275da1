"""The LoRA path's data: images (or stored hidden states) with stage two's labels, DDP sharding, the prefix cache.

With a live backbone a sample is pixels - a fresh augmented view every epoch - or, with a prefix cache, the hidden
state entering the first adapted block: the frozen blocks before it never change for a given view, so they run
once (`build_prefix_cache`) and training runs only the adapted blocks. With a teacher's token store (feature
distillation, features.py) a training sample is one of the store's views and carries the teacher's tokens of it.
The model side is model.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from biomass_cache.backbone.views import ViewPolicy, load_photo, make_view
from biomass_cache.common.errors import DataError
from biomass_cache.lora.features import TeacherTokens
from biomass_cache.lora.model import LiveTokens
from biomass_cache.lora.settings import LoraSettings
from biomass_cache.store.fingerprint import diff as fingerprint_diff
from biomass_cache.store.fingerprint import of_prefix_cache
from biomass_cache.store.layout import StoreSpec, create_store, open_store
from biomass_cache.train.dataset import AuxSpec, encode_labels, store_rows, view_for


class LiveDataset(Dataset):
    """Rows `indices` of `table` with stage two's labels, plus what the backbone needs:
    `pixels` - training: a fresh augmented view every epoch (view epoch + 1 of views.make_view; view 0 is the
    clean view), else view `view` - or, with a `prefix` store, `hidden` (n_prefix + T, C): one of its stored views
    per epoch (stage two's view sampling), else view `view`. `weight`: each sample's weight in the losses. With a
    `teacher` (training only) the pixels are one of the teacher store's views per epoch, made with its seed and
    policy, and `teacher`, `teacher_has` its standardised tokens of that view (features.TeacherTokens).
    """

    def __init__(self, table: pd.DataFrame, indices: Sequence[int], data_dir: Path, s: LoraSettings,
                 train: bool, seed: int, aux: AuxSpec, prefix=None, view: int = 0, split: str = "train",
                 weight: float | np.ndarray = 1.0, teacher: TeacherTokens | None = None):
        self.train, self.seed, self.epoch = train, seed, 0
        self.teacher = teacher if train else None
        self.indices = np.asarray(indices, dtype=np.int64)
        self.data_dir, self.size, self.view_seed, self.split, self.store = (
            Path(data_dir), tuple(s.size), s.view_seed, split, prefix)
        sub = table.iloc[self.indices]
        self.image_ids, self.paths = list(sub["image_id"]), list(sub["image_path"])
        self.views = list(range(prefix.n_views)) if prefix is not None and train else [view]
        self.rows = store_rows(prefix, self.image_ids, self.views) if prefix is not None else None
        self.labels = encode_labels(table, self.indices, aux, weight)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view_of(self, k: int) -> int:
        if not self.train:
            return self.views[0]
        if self.teacher is not None:
            return view_for(self.seed, self.epoch, int(self.indices[k]), self.teacher.n_views)
        if self.store is None:
            return self.epoch + 1
        return view_for(self.seed, self.epoch, int(self.indices[k]), len(self.views))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        view, item = self.view_of(k), self.labels.item(k)
        if self.teacher is not None:
            t = self.teacher
            image = load_photo(self.data_dir / self.paths[k], self.size, t.policy)
            item["pixels"] = make_view(image, self.image_ids[k], view, t.view_seed, self.size, t.policy, split=t.split)
            tokens, has = t.item(self.image_ids[k], view)
            item["teacher"], item["teacher_has"] = torch.from_numpy(tokens), torch.tensor(has)
        elif self.store is None:
            image = load_photo(self.data_dir / self.paths[k], self.size, ViewPolicy())
            item["pixels"] = make_view(image, self.image_ids[k], view, self.view_seed, self.size, ViewPolicy(),
                                       split=self.split)
        else:
            row = int(self.rows[k])
            hidden = np.concatenate([self.store.read_prefix(row, view)[0], self.store.read(row, view)[0]])
            item["hidden"] = torch.from_numpy(hidden)
        return item

    def __getstate__(self) -> dict:
        """Workers reopen the prefix store by path instead of pickling an open Zarr group."""
        return {**self.__dict__, "store": None if self.store is None else str(self.store.path)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.store = None if state["store"] is None else open_store(state["store"])


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch (the dataset's), sharded so that step s of all ranks together is global batch
    s of a one-process run: DDP with batch b per rank trains like one process with batch b * world."""

    def __init__(self, ds: LiveDataset, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.ds, self.b, self.seed, self.rank, self.world = ds, batch_size, seed, rank, world

    def _order(self) -> list[int]:
        order = torch.randperm(len(self.ds), generator=torch.Generator().manual_seed(self.seed * 9973 + self.ds.epoch))
        if self.world == 1:
            return order.tolist()
        g = self.b * self.world  # pad (repeating) to whole global batches so every rank takes the same steps
        order = np.resize(order.numpy(), -(-len(order) // g) * g)
        return [int(i) for s in range(0, len(order), g) for i in order[s + self.rank * self.b: s + (self.rank + 1) * self.b]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order())

    def __len__(self) -> int:
        return len(self.ds) if self.world == 1 else -(-len(self.ds) // (self.b * self.world)) * self.b


def live_loader(ds: LiveDataset, batch_size: int, workers: int, sampler: Sampler | None = None) -> DataLoader:
    """Batches of live samples in `sampler`'s order (EpochSampler: seeded, sharded over ranks) or in table order;
    unlike a token-store loader (dataset.make_loader) no shuffle of its own and the DataLoader's default prefetch."""
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=False,
                      generator=torch.Generator().manual_seed(0))  # not the global RNG: see dataset.make_loader


def build_prefix_cache(path: Path, table: pd.DataFrame, data_dir: Path, live: LiveTokens, progress: bool = True):
    """Store, for every image and view, the hidden state entering the first adapted block (resumable)."""
    s, start = live.s, live.start
    if start == 0:
        raise DataError("--lora-prefix-cache needs at least one frozen block before the adapted ones "
                         f"(--lora-blocks {s.blocks} adapts all {live.bb.depth})")
    fp = of_prefix_cache(live.bb, s, start).to_dict()
    ids = list(table["image_id"])
    if Path(path).exists():
        store = open_store(path, "r+")
        if store.fingerprint != fp or store.n_views != s.prefix_views:
            diff = fingerprint_diff(store.fingerprint, fp) + (
                [f"n_views: {store.n_views} -> {s.prefix_views}"] if store.n_views != s.prefix_views else [])
            raise DataError(f"{path}: prefix cache built with other settings: {diff}; delete it or use another path")
        new = [i for i in ids if i not in set(store.image_ids)]
        if new:
            store.append_images(new)
    else:
        spec = StoreSpec(image_ids=ids, n_views=s.prefix_views, layers=[start - 1], grid=live.grid,
                         channels=live.bb.embed_dim, fingerprint=fp, n_prefix=live.bb.n_prefix)
        store = create_store(path, spec)
    position = {iid: k for k, iid in enumerate(store.image_ids)}
    done, p = store.done(), live.bb.n_prefix
    todo = [r for r in range(len(table)) if not done[position[ids[r]]].all()]
    for r in tqdm(todo, desc="prefix cache", unit="img", disable=not progress):
        image = load_photo(Path(data_dir) / table["image_path"].iloc[r], tuple(s.size), ViewPolicy())
        views = torch.stack([make_view(image, ids[r], v, s.view_seed, tuple(s.size), ViewPolicy())
                             for v in range(s.prefix_views)])
        hidden = live.prefix_hidden(views).float().cpu()
        store.write_image(position[ids[r]], hidden[:, None, p:], prefix=hidden[:, None, :p])
    return open_store(path)
