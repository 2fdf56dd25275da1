"""TokenDataset: joins cached tokens with the data table, samples views deterministically, refuses mismatches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.train.dataset import AuxSpec, TokenDataset, make_loader
from biomass_cache.store.layout import open_store
from biomass_cache.common.targets import TARGETS, to_density
from toys import CHANNELS, GRID, LAYERS, VIEWS, make_toy

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    data, store_path = make_toy(tmp_path_factory.mktemp("toy"))
    return read_long_csv(data / "train.csv", check_images=False), open_store(store_path)


def test_samples_join_targets_and_aux_by_image_id(toy):
    table, store = toy
    rows = [5, 2, 9]
    ds = TokenDataset(store, table, rows, layers=[7], train=False, seed=0)
    item = ds[1]
    assert item["tokens"].shape == (1, GRID[0] * GRID[1], CHANNELS) and item["tokens"].dtype == torch.float32
    assert item["index"] == 2
    np.testing.assert_allclose(item["tokens"].numpy(), store.read(2, 0, [7]))
    np.testing.assert_allclose(item["y"].numpy(), to_density(table.loc[2, list(TARGETS)].to_numpy(float)), rtol=1e-6)
    assert item["y_mask"].all() and item["height_mask"] and item["ndvi_mask"]
    aux = AuxSpec.fit(table, rows)
    assert aux.states == ("NSW", "Tas", "Vic", "WA")
    assert aux.states[int(item["state"])] == table.loc[2, "State"]
    assert abs(float(item["ndvi_z"]) - (table.loc[2, "Pre_GSHH_NDVI"] - aux.ndvi_mean) / aux.ndvi_std) < 1e-5


def test_view_sampling_is_deterministic_and_covers_views(toy):
    table, store = toy
    ds = TokenDataset(store, table, range(len(table)), LAYERS, train=True, seed=3)
    again = TokenDataset(store, table, range(len(table)), LAYERS, train=True, seed=3)
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        views = [ds.view_of(k) for k in range(len(ds))]
        assert views == [again.view_of(k) for k in range(len(ds))]
        seen |= set(views)
    assert seen == set(range(VIEWS))
    ds.set_epoch(0)
    first = [ds.view_of(k) for k in range(len(ds))]
    ds.set_epoch(1)
    assert first != [ds.view_of(k) for k in range(len(ds))]  # a new epoch redraws
    k = 4
    np.testing.assert_array_equal(ds[k]["tokens"].numpy(), store.read(k, ds.view_of(k), LAYERS))


def test_preload_matches_streaming_and_workers(toy):
    table, store = toy
    rows = list(range(10))
    streamed = TokenDataset(store, table, rows, LAYERS, train=True, seed=1, preload=False)
    loaded = TokenDataset(store, table, rows, LAYERS, train=True, seed=1, preload=True)
    assert loaded.bank is not None and loaded.bank.tokens.dtype == torch.float32 and not loaded.bank.normed
    auto = TokenDataset(store, table, rows, LAYERS, train=True, seed=1, preload="auto")
    assert auto.bank is not None  # a few KB always fit
    one_layer = TokenDataset(store, table, rows, LAYERS[1:], train=True, seed=1, bank=loaded.bank)
    for ds in (streamed, loaded, one_layer):
        ds.set_epoch(2)
    a, b, c = (torch.cat([ds.tokens_fn("cpu")(b) for b in make_loader(ds, 4, shuffle=False, seed=0, workers=w)])
               for ds, w in ((streamed, 2), (loaded, 0), (one_layer, 0)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # the bank's gather is the store's tokens, in order
    torch.testing.assert_close(a[:, 1:], c, rtol=0, atol=0)  # a dataset of fewer layers reads its own
    assert loaded[0].keys() >= {"bank_row", "bank_view"} and "tokens" not in loaded[0]


def test_mismatches_are_clear_errors(tmp_path, toy):
    table, store = toy
    stranger = pd.concat([table, table.iloc[[0]].assign(image_id="ID9999999")], ignore_index=True)
    with pytest.raises(DataError, match="not in the token store.*ID9999999"):
        TokenDataset(store, stranger, range(len(stranger)), LAYERS, train=False, seed=0)
    with pytest.raises(DataError, match=r"layers \[4\] are not in the token store"):
        TokenDataset(store, table, range(3), [4], train=False, seed=0)
    data, partial = make_toy(tmp_path, n=8, done=False)
    small = read_long_csv(data / "train.csv", check_images=False)
    with pytest.raises(DataError, match="4 image\\(s\\) are not completely extracted.*ID1000004"):
        TokenDataset(open_store(partial), small, range(8), LAYERS, train=True, seed=0)
