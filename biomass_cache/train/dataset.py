"""Stage two's input: cached tokens of the selected layers joined with targets and metadata by image_id.

View sampling is the augmentation: every epoch each training image shows one of its stored views, chosen by a
deterministic function of (seed, epoch, row) so a run is reproducible with any number of DataLoader workers.
Evaluation reads one fixed view (0 = clean; the TTA views at predict time).
"""

from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from biomass_cache.common.errors import DataError
from biomass_cache.common.targets import TARGETS, to_density
from biomass_cache.store.layout import open_store
from biomass_cache.train.bank import TokenBank, plan_bank

MAX_LISTED = 5
LABEL_KEYS = ("y", "y_mask", "height", "height_mask", "ndvi_z", "ndvi_mask", "state", "index", "weight")


@dataclass(frozen=True)
class AuxSpec:
    """How the auxiliary labels are encoded: the State vocabulary and NDVI z-score (training split only)."""

    states: tuple[str, ...]
    ndvi_mean: float
    ndvi_std: float

    @classmethod
    def fit(cls, table: pd.DataFrame, rows: Sequence[int]) -> "AuxSpec":
        states = tuple(sorted(table["State"].dropna().astype(str).unique())) if "State" in table else ()
        ndvi = table["Pre_GSHH_NDVI"].to_numpy(float)[list(rows)] if "Pre_GSHH_NDVI" in table else np.array([])
        ndvi = ndvi[np.isfinite(ndvi)]
        std = float(ndvi.std()) if len(ndvi) > 1 else 1.0
        return cls(states, float(ndvi.mean()) if len(ndvi) else 0.0, std if std > 1e-8 else 1.0)

    def to_dict(self) -> dict:
        return {"states": list(self.states), "ndvi_mean": self.ndvi_mean, "ndvi_std": self.ndvi_std}

    @classmethod
    def from_dict(cls, d: dict) -> "AuxSpec":
        return cls(tuple(d["states"]), float(d["ndvi_mean"]), float(d["ndvi_std"]))


@dataclass(frozen=True)
class Labels:
    """The training labels of some table rows, as the batch contract wants them (missing -> 0 with a False mask)."""

    y: np.ndarray  # (N, 5) areal densities g/m^2
    y_mask: np.ndarray
    height: np.ndarray  # cm
    height_mask: np.ndarray
    ndvi_z: np.ndarray
    ndvi_mask: np.ndarray
    state: np.ndarray  # int64 code in AuxSpec.states, -1 = unknown
    index: np.ndarray  # row index into the data table
    weight: np.ndarray  # float32 weight of the sample in every loss (1; pseudo-labelled test images: less)

    def item(self, k: int) -> dict[str, torch.Tensor]:
        """Sample k's labels as tensors (the batch keys besides the tokens)."""
        return {name: torch.as_tensor(getattr(self, name)[k]) for name in LABEL_KEYS}

    def batch(self, ks: Sequence[int]) -> dict[str, torch.Tensor]:
        """The labels of samples `ks`, batched as the DataLoader would collate their `item`s."""
        return {name: torch.from_numpy(getattr(self, name)[list(ks)]) for name in LABEL_KEYS}


def encode_labels(table: pd.DataFrame, indices: Sequence[int], aux: AuxSpec,
                  weight: float | np.ndarray = 1.0) -> Labels:
    """Targets as areal densities, height, NDVI z-scored and State coded with `aux` (fitted on training rows);
    every sample's loss weight is `weight` (one for all, or one per index)."""
    indices = np.asarray(indices, dtype=np.int64)
    sub, n = table.iloc[indices], len(indices)
    y = to_density(sub[list(TARGETS)].to_numpy(float)) if set(TARGETS) <= set(sub) else np.full((n, 5), np.nan)
    height = sub["Height_Ave_cm"].to_numpy(float) if "Height_Ave_cm" in sub else np.full(n, np.nan)
    ndvi = sub["Pre_GSHH_NDVI"].to_numpy(float) if "Pre_GSHH_NDVI" in sub else np.full(n, np.nan)
    code = {s: k for k, s in enumerate(aux.states)}
    states = sub["State"].astype(str) if "State" in sub else pd.Series([""] * n)
    return Labels(
        y=np.nan_to_num(y).astype(np.float32), y_mask=np.isfinite(y),
        height=np.nan_to_num(height).astype(np.float32), height_mask=np.isfinite(height),
        ndvi_z=np.nan_to_num((ndvi - aux.ndvi_mean) / aux.ndvi_std).astype(np.float32), ndvi_mask=np.isfinite(ndvi),
        state=np.array([code.get(s, -1) for s in states], dtype=np.int64), index=indices,
        weight=np.broadcast_to(np.asarray(weight, dtype=np.float32), (n,)).copy(),
    )


def store_rows(store, image_ids: Sequence[str], views: Sequence[int]) -> np.ndarray:
    """Store index of every image id; an id that is absent, marked bad or not done in `views` is an error."""
    position = {iid: k for k, iid in enumerate(store.image_ids)}
    absent = [i for i in image_ids if i not in position]
    if absent:
        raise DataError(
            f"{len(absent)} image(s) of the data table are not in the token store {store.path}: "
            f"{absent[:MAX_LISTED]} (extract them first, or point --cache at the store built from this data)"
        )
    idx = np.array([position[i] for i in image_ids], dtype=np.int64)
    done = store.done(fresh=False)[idx][:, list(views)].all(axis=1)
    if not done.all():
        missing = [image_ids[k] for k in np.flatnonzero(~done)]
        bad = {i: store.bad_ids[i] for i in missing if i in store.bad_ids}
        raise DataError(
            f"{len(missing)} image(s) are not completely extracted in {store.path} (views {list(views)}): "
            f"{missing[:MAX_LISTED]}" + (f"; marked bad: {dict(list(bad.items())[:MAX_LISTED])}" if bad else "")
            + " (resume the extraction, or remove these images from the table)"
        )
    return idx


def view_for(seed: int, epoch: int, row: int, n_views: int) -> int:
    """The view a training image shows in an epoch: independent of worker count and iteration order."""
    return int(np.random.default_rng([seed, epoch, row]).integers(n_views))


class TokenDataset(Dataset):
    """Samples of `table` rows `indices`: tokens (L, T, C) of `layers` plus targets and aux labels.

    Targets are areal densities (g/m^2); missing ones are 0 with a False mask. `train=True` draws one stored
    view per epoch (call `set_epoch`); otherwise `view` is read. With a `bank` (bank.py; shared by a run, or loaded
    here when `preload` (True, False or "auto") says so and the tokens fit in RAM) a sample is its labels and where
    its tokens are in the bank ("bank_row", "bank_view"): `tokens_fn` gathers a whole batch there at once. Without
    one, a sample carries its tokens (float32) read from the store. `weight`: every sample's weight in the losses
    (the batch key "weight").
    """

    def __init__(
        self,
        store,
        table: pd.DataFrame,
        indices: Sequence[int],
        layers: Sequence[int],
        train: bool,
        seed: int,
        preload: bool | str = False,
        view: int = 0,
        aux: AuxSpec | None = None,
        bank: TokenBank | None = None,
        weight: float = 1.0,
    ):
        self.store, self.train, self.seed, self.epoch = store, train, seed, 0
        self.indices = np.asarray(indices, dtype=np.int64)
        self.layers = [int(l) for l in layers]
        unknown = [l for l in self.layers if l not in store.layers]
        if unknown:
            raise DataError(f"layers {unknown} are not in the token store {store.path} (it has {store.layers})")
        if not train and not 0 <= view < store.n_views:
            raise DataError(f"view {view} does not exist in {store.path} ({store.n_views} views)")
        self.views = list(range(store.n_views)) if train else [view]
        self.rows = store_rows(store, list(table["image_id"].iloc[self.indices]), self.views)
        self.labels = encode_labels(table, self.indices, aux or AuxSpec.fit(table, self.indices), weight)
        if bank is None and preload is not False:
            plan, refused = plan_bank(store, len(self.rows), len(self.views), len(self.layers), torch.device("cpu"),
                                      "fp32", norm=False)
            if plan is None and preload is True:
                raise DataError(f"the tokens of {store.path} do not fit in RAM ({'; '.join(refused)}): use "
                                "preload false (stream them from the store), or `biomass reduce` the store")
            bank = None if plan is None else TokenBank.load(store, self.rows, self.views, self.layers, plan)
        self.bank = bank
        self.layer_pos = None if bank is None or bank.layers == self.layers else [
            bank.layers.index(l) for l in self.layers]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view_of(self, k: int) -> int:
        return view_for(self.seed, self.epoch, int(self.indices[k]), len(self.views)) if self.train else self.views[0]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {name: v[0] for name, v in self.__getitems__([k]).items()}

    def __getitems__(self, ks: list[int]) -> dict[str, torch.Tensor]:
        """A whole batch at once (the DataLoader's batched fetch, with `make_loader`'s pass-through collate): the
        samples `__getitem__` gives, collated, without a tensor per sample and label."""
        if self.bank is None:
            return {"tokens": torch.stack([self.sample_tokens(k) for k in ks]), **self.labels.batch(ks)}
        views = [self.bank.views.index(self.view_of(k)) for k in ks]
        return {"bank_row": torch.tensor([self.bank.position[int(self.rows[k])] for k in ks]),
                "bank_view": torch.tensor(views), **self.labels.batch(ks)}

    def sample_tokens(self, k: int) -> torch.Tensor:
        """Sample k's tokens (L, T, C) alone: from the bank (as held there), else from the store (float32)."""
        view = self.view_of(k)
        if self.bank is None:
            return torch.from_numpy(self.store.read(int(self.rows[k]), view, self.layers))
        pos = torch.tensor([self.bank.position[int(self.rows[k])]])
        return self.bank.gather(pos, torch.tensor([self.bank.views.index(view)]), self.layer_pos)[0].cpu()

    def tokens_fn(self, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> Callable[[dict], torch.Tensor]:
        """batch -> its tokens (B, L, T, C) on `device` in `dtype` (see `batch_tokens`)."""
        return functools.partial(batch_tokens, bank=self.bank, device=device, dtype=dtype, layer_pos=self.layer_pos)

    def __getstate__(self) -> dict:
        """Workers reopen the store by path instead of pickling an open Zarr group."""
        state = dict(self.__dict__)
        state["store"] = str(self.store.path)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.store = open_store(state["store"])


def batch_tokens(batch: dict, bank: TokenBank | None, device: torch.device | str, dtype: torch.dtype = torch.float32,
                 layer_pos: list[int] | None = None) -> torch.Tensor:
    """A batch's tokens (B, L, T, C) on `device` in `dtype`: its own ("tokens"), else gathered in `bank`."""
    tokens = batch["tokens"] if "tokens" in batch else bank.gather(batch["bank_row"], batch["bank_view"], layer_pos)
    return tokens.to(device, dtype, non_blocking=True)


class ConcatTokens(ConcatDataset):
    """Several TokenDatasets as one training set (a run's images and pseudo-labelled images of another store):
    `set_epoch` reaches every part. Every sample carries its tokens (`sample_tokens`: the parts' banks differ)."""

    def set_epoch(self, epoch: int) -> None:
        for ds in self.datasets:
            ds.set_epoch(epoch)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        part = bisect.bisect_right(self.cumulative_sizes, k)
        ds, j = self.datasets[part], k - (self.cumulative_sizes[part - 1] if part else 0)
        return {"tokens": ds.sample_tokens(j), **ds.labels.item(j)}

    @property
    def bank(self) -> TokenBank | None:
        """A bank of some part (None: every part streams from its store)."""
        return next((ds.bank for ds in self.datasets if ds.bank is not None), None)


def _collated(batch: dict) -> dict:
    """The collate function of a dataset that fetches whole batches (`__getitems__`)."""
    return batch


def make_loader(ds: TokenDataset | ConcatTokens, batch_size: int, shuffle: bool, seed: int, workers: int) -> DataLoader:
    """Batches in a seeded order; workers stream from disk with prefetch (none needed with a bank).

    Workers are not persistent: each epoch's workers get a fresh copy of the dataset, so `set_epoch` reaches them.
    Every loader has a generator of its own, even unshuffled: a DataLoader without one draws its workers' base seed
    from the global RNG, so how often a run validates would change its dropout masks.
    """
    workers = 0 if ds.bank is not None else workers
    return DataLoader(
        ds,
        batch_size=batch_size,
        collate_fn=_collated if hasattr(ds, "__getitems__") else None,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed),
        num_workers=workers,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        drop_last=False,
    )
