"""inference.py: views, TTA mean, density maps and MC-dropout samples against forwards computed by hand on the
store's tokens; an ensemble member's predictions are exactly that hand computation averaged over its folds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import biomass_cache.heads as heads
from biomass_cache.train import inference, runs
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.train.dataset import AuxSpec
from biomass_cache.store.layout import open_store
from biomass_cache.common.targets import components_to_targets, to_grams
from biomass_cache.train.loop import fit_zscore
from toys import make_toy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    data, store_path = make_toy(tmp_path_factory.mktemp("inference"), n=10)
    return read_long_csv(data / "train.csv", check_images=False), open_store(store_path)


def checkpoint(toy, name: str, seed: int, **kw) -> tuple[torch.nn.Module, dict]:
    """A randomly initialised head on the toy store, with the meta a trained fold model carries."""
    table, store = toy
    rows = np.arange(len(table))
    torch.manual_seed(seed)
    head = heads.create_head(name, n_layers=len(store.layers), channels=store.channels, grid=store.grid,
                             zscore=fit_zscore(table, rows), **kw)
    for p in head.parameters():  # off the mean-prediction initialisation, so images differ
        p.data.add_(0.1 * torch.randn_like(p))
    meta = {"name": name, "fold": 0, "head": head.config, "zscore": fit_zscore(table, rows).to_dict(),
            "aux": AuxSpec.fit(table, rows).to_dict(), "fingerprint": store.fingerprint, "layers": store.layers,
            "channels": store.channels, "grid": list(store.grid)}
    return head.eval(), meta


@torch.no_grad()
def by_hand(head, store, rows, view, maps=False):
    """The head on the stored tokens of `rows`, one image at a time."""
    outs = [head(torch.from_numpy(store.read(int(i), view, store.layers))[None], return_maps=maps) for i in rows]
    comps = np.concatenate([o["components"].double().numpy() for o in outs])
    return (comps, np.concatenate([o["density_map"].numpy() for o in outs])) if maps else comps


@pytest.mark.parametrize("name", ["density", "mlp"])
def test_views_mean_is_the_mean_of_hand_forwards(toy, name):
    _, store = toy
    head, meta = checkpoint(toy, name, seed=1)
    rows = [7, 2, 5]
    per_view = [by_hand(head, store, rows, v) for v in range(store.n_views)]
    tta = inference.predict_store(head, meta, store, rows, views="all", batch_size=2)
    np.testing.assert_allclose(tta.components, np.mean(per_view, axis=0), rtol=1e-6)
    assert tta.maps is None and tta.samples is None
    np.testing.assert_array_equal(tta.grams, to_grams(components_to_targets(tta.components)))
    one = inference.predict_store(head, meta, store, rows, views=1)
    np.testing.assert_allclose(one.components, per_view[1], rtol=1e-6)
    assert not np.allclose(one.components, per_view[0])  # the views differ, so the choice of view is seen


def test_density_maps_are_the_heads_maps_and_explain_its_components(toy):
    _, store = toy
    head, meta = checkpoint(toy, "density", seed=2)
    rows = [0, 3, 9]
    comps, maps = by_hand(head, store, rows, 0, maps=True)
    pred = inference.predict_store(head, meta, store, rows, views=0, maps=True)
    assert pred.maps.shape == (3, 3, *store.grid)
    np.testing.assert_allclose(pred.maps, maps, rtol=1e-5)
    np.testing.assert_allclose(pred.components, comps, rtol=1e-6)
    np.testing.assert_allclose(pred.maps.mean(axis=(2, 3)), pred.components, rtol=1e-5)  # the patch mean
    tta = inference.predict_store(head, meta, store, rows, views="all", maps=True)
    np.testing.assert_allclose(tta.maps, np.mean([by_hand(head, store, rows, v, maps=True)[1]
                                                  for v in range(store.n_views)], axis=0), rtol=1e-5)


def test_maps_are_a_head_capability_not_a_name():
    assert heads.HEADS["density"].has_maps
    assert not any(heads.HEADS[n].has_maps for n in ("mlp", "vitdet", "ridge"))
    assert heads.has_maps({"name": "density"}) and not heads.has_maps({"name": "mlp"})
    assert not heads.has_maps({"name": "no-such-head"}) and not heads.has_maps({})


def test_mc_dropout_samples(toy):
    _, store = toy
    head, meta = checkpoint(toy, "density", seed=3, dropout=0.3)
    rows = [1, 4, 6, 8]
    with pytest.raises(ValueError, match="dropout on"):
        inference.predict_store(head, meta, store, rows, samples=3)  # eval mode: every sample would be equal
    inference.enable_mc_dropout(head, "member density")
    state = torch.get_rng_state()
    a = inference.predict_store(head, meta, store, rows, samples=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is left alone
    b = inference.predict_store(head, meta, store, rows, samples=3, seed=5)
    c = inference.predict_store(head, meta, store, rows, samples=3, seed=6)
    assert a.samples.shape == (3, 4, 3)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert not np.allclose(a.samples, c.samples) and not np.allclose(a.samples[0], a.samples[1])
    np.testing.assert_allclose(a.components, a.samples.mean(axis=0), rtol=1e-12)
    with pytest.raises(ValueError, match="not from MC-dropout samples"):
        inference.predict_store(head, meta, store, rows, samples=3, maps=True)
    with pytest.raises(DataError, match="member mlp: the head has no dropout with p > 0"):
        inference.enable_mc_dropout(checkpoint(toy, "mlp", seed=0, dropout=0.0)[0], "member mlp")


def test_a_head_refuses_a_store_it_was_not_trained_on(toy):
    _, store = toy
    head, meta = checkpoint(toy, "mlp", seed=4)
    meta["fingerprint"] = dict(meta["fingerprint"], seed=99)
    with pytest.raises(DataError, match="another configuration.*seed: 99 -> 0"):
        inference.predict_store(head, meta, store)


def test_ensemble_member_is_the_fold_mean_of_hand_forwards(toy, tmp_path):
    """What `submit`/`predict` write for a member: each fold model's TTA mean, averaged on the components."""
    from biomass_cache.submit.spec import Member
    from biomass_cache.submit.members import ResolvedMember, mc_dropout_variance, predict_cache_member

    _, store = toy
    paths = []
    for k in range(2):
        head, meta = checkpoint(toy, "density", seed=10 + k, dropout=0.2)
        paths.append(tmp_path / f"fold{k}" / "density.json")
        runs.save_head(paths[-1], head, {**meta, "fold": k})
    rm = ResolvedMember(Member(tmp_path, head="density"), tmp_path, tuple(paths), "cache", {})
    rows = np.array([9, 0, 4])
    folds = []
    for p in paths:
        head, _ = runs.load_head(p)
        folds.append(np.mean([by_hand(head, store, rows, v) for v in range(store.n_views)], axis=0))
    want = components_to_targets(np.mean([to_grams(f) for f in folds], axis=0))
    np.testing.assert_allclose(predict_cache_member(rm, store, rows, "cpu"), want, rtol=1e-6)
    var = mc_dropout_variance(rm, store, rows, n_samples=4, seed=0, device="cpu")
    assert var.shape == (3,) and (var > 0).all()
    np.testing.assert_array_equal(var, mc_dropout_variance(rm, store, rows, n_samples=4, seed=0, device="cpu"))
