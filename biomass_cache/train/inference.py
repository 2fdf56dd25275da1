"""Running trained heads: the one place a head predicts over a loader or over a token store's views.

Training's validation and OOF, ensemble members, MC-dropout, density maps (`predict --maps`, the run's plots),
pseudo-labels and the LoRA path all come here, so every prediction averages views and rebuilds the five targets
the same way: components (g/m^2, float64) are averaged over the views, and only then turned into grams, so the
identities GDM = clover + green and Total = clover + dead + green hold exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from biomass_cache.common.errors import DataError
from biomass_cache.common.targets import components_to_targets, to_grams
from biomass_cache.heads import enable_mc_dropout as dropout_only_train
from biomass_cache.heads import run_head
from biomass_cache.train.bank import TokenBank
from biomass_cache.train.dataset import AuxSpec, TokenDataset, make_loader
from biomass_cache.train.runs import check_compatible


@dataclass
class Prediction:
    """A head's outputs for N images, each averaged over the views it read."""

    components: np.ndarray  # (N, 3) clover, dead, green in g/m^2, float64
    maps: np.ndarray | None = None  # (N, 3, rows, cols) g/m^2 density maps, when asked for
    samples: np.ndarray | None = None  # (S, N, 3) MC-dropout samples of the components, when asked for

    @property
    def grams(self) -> np.ndarray:
        """(N, 5) grams, identities exact."""
        return components_to_grams(self.components)


def components_to_grams(components: np.ndarray) -> np.ndarray:
    """(N, 3) mean areal densities -> (N, 5) grams; the identities hold exactly."""
    return to_grams(components_to_targets(components))


def enable_mc_dropout(head: torch.nn.Module, where: str) -> None:
    """Dropout on at inference (heads.enable_mc_dropout), for `samples`; a head without dropout p > 0 has no
    variance to give, which is a DataError naming `where`."""
    if not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in head.modules()):
        raise DataError(f"{where}: the head has no dropout with p > 0, so MC-dropout has no variance to give")
    dropout_only_train(head)


@torch.no_grad()
def predict_loader(head: torch.nn.Module, loader: Iterable[dict], tokens_fn: Callable[[dict], torch.Tensor],
                   maps: bool = False, samples: int = 0, normed: bool = False) -> Prediction:
    """One pass of `head` over every batch of `loader` (one view), in order; `normed`: see `heads.run_head`.

    `maps`: also the density maps (heads whose `has_maps` is True). `samples` > 0: that many forward passes per
    batch with the dropout on (call `enable_mc_dropout` first); `components` is then their mean. Otherwise the head
    runs in eval mode.
    """
    if samples and maps:
        raise ValueError("density maps come from the eval-mode head, not from MC-dropout samples")
    if samples:
        if not any(isinstance(m, torch.nn.Dropout) and m.training for m in head.modules()):
            raise ValueError("MC-dropout samples need the head's dropout on (inference.enable_mc_dropout)")
    else:
        head.eval()
    comps, drawn, shown = [], [], []
    for batch in loader:
        tokens = tokens_fn(batch)
        if samples:
            drawn.append(torch.stack([run_head(head, tokens, normed)["components"].double().cpu()
                                      for _ in range(samples)]).numpy())
            continue
        out = run_head(head, tokens, normed, return_maps=maps)
        comps.append(out["components"].double().cpu().numpy())
        if maps:
            shown.append(out["density_map"].cpu().numpy())
    if samples:
        draws = np.concatenate(drawn, axis=1)  # (S, N, 3)
        return Prediction(draws.mean(axis=0), samples=draws)
    return Prediction(np.concatenate(comps), np.concatenate(shown) if maps else None)


def mean_over_views(per_view: Sequence[Prediction]) -> Prediction:
    """The views' predictions of the same images averaged (components, maps and samples alike)."""
    def mean(key: str) -> np.ndarray | None:
        parts = [getattr(p, key) for p in per_view]
        return None if parts[0] is None else np.mean(parts, axis=0)

    return Prediction(mean("components"), mean("maps"), mean("samples"))


def view_list(views: str | int, n_views: int) -> list[int]:
    """"all" (TTA: every stored view) or one view index (0 = the clean view)."""
    return list(range(n_views)) if views == "all" else [int(views)]


def predict_store(
    head: torch.nn.Module,
    meta: dict,
    store,
    indices: Sequence[int] | None = None,
    views: str | int = "all",
    batch_size: int = 64,
    device: str = "cpu",
    workers: int = 0,
    bank: TokenBank | None = None,
    ignore: Sequence[str] = (),
    maps: bool = False,
    samples: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Prediction:
    """The head's prediction for store images `indices` (all by default), averaged over `views`.

    `views`: see `view_list`; `bank`: the run's tokens (bank.py), else the store is read; `dtype`: of the tokens
    the head reads (bf16: under autocast, as a bf16 run trained);
    `ignore`: as in runs.check_compatible (the store is refused unless it fits the head). `maps`, `samples`: see
    `predict_loader`; the samples' dropout masks come from `seed` (the global RNG is left as it was).
    """
    check_compatible(meta, store, ignore)
    indices = range(len(store.image_ids)) if indices is None else indices
    table = pd.DataFrame({"image_id": [store.image_ids[i] for i in indices]})
    head = head.to(device)
    aux = AuxSpec.from_dict(meta["aux"])

    def run_views() -> list[Prediction]:
        out = []
        for v in view_list(views, store.n_views):
            ds = TokenDataset(store, table, range(len(table)), meta["layers"], train=False, seed=0, view=v, aux=aux,
                              bank=bank)
            loader = make_loader(ds, batch_size, shuffle=False, seed=0, workers=workers)
            normed = bank is not None and bank.normed
            out.append(predict_loader(head, loader, ds.tokens_fn(device, dtype), maps, samples, normed))
        return out

    if not samples:
        return mean_over_views(run_views())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mean_over_views(run_views())
