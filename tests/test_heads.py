"""Heads: registry, output contract, target identities, density maps, config round trip, cache compatibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import biomass_cache.heads as heads
from biomass_cache.common.targets import ZScore, components_to_targets
from biomass_cache.heads.common import enable_mc_dropout

GRID = (3, 4)
CHANNELS = 8
SMALL = {"mlp": dict(hidden=16, pools=("mean", "max", "gem")), "density": dict(hidden=16),
         "vitdet": dict(dim=8, hidden=32)}
AUX = dict(height=True, ndvi=True, n_states=4)


@pytest.fixture(scope="module")
def zscore() -> ZScore:
    rng = np.random.default_rng(0)
    comps = rng.gamma(2.0, 60.0, size=(50, 3))
    return ZScore.fit(components_to_targets(comps))


def make(name: str, zscore: ZScore, n_layers: int = 3, aux=AUX, **kw) -> heads.FusedHead:
    torch.manual_seed(0)
    return heads.create_head(name, n_layers=n_layers, channels=CHANNELS, grid=GRID, zscore=zscore, aux=aux,
                             **{**SMALL[name], **kw})


def tokens(n_layers: int, batch: int = 5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n_layers, GRID[0] * GRID[1], CHANNELS, generator=g)


def test_registry_lists_builtin_heads_and_rejects_unknown(zscore):
    assert {"mlp", "density", "vitdet"} <= set(heads.HEADS)
    with pytest.raises(ValueError, match=r"unknown head 'nope'.*density.*mlp.*vitdet"):
        heads.create_head("nope", n_layers=1, channels=CHANNELS, grid=GRID, zscore=zscore)
    with pytest.raises(ValueError, match="unknown aux"):
        make("mlp", zscore, aux=dict(heigth=True))
    with pytest.raises(TypeError, match="head 'density'"):
        make("density", zscore, widht=3)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("n_layers", [1, 3])
def test_outputs_contract_and_identities(name, n_layers, zscore):
    head = make(name, zscore, n_layers=n_layers).eval()
    out = head(tokens(n_layers))
    b = 5
    shapes = {"components": (b, 3), "total_z": (b,), "ratio": (b, 3), "five_z": (b, 5), "layer_weights": (n_layers,),
              "height": (b,), "ndvi_z": (b,), "state_logits": (b, 4)}
    for key, shape in shapes.items():
        assert tuple(out[key].shape) == shape, key
    assert (out["components"] >= 0).all()
    assert torch.allclose(out["layer_weights"].sum(), torch.tensor(1.0))
    assert torch.allclose(out["ratio"].sum(-1), torch.ones(b), atol=1e-5)
    five = out["five_z"].double() * torch.tensor(zscore.std) + torch.tensor(zscore.mean)
    clover, dead, green, gdm, total = five.unbind(-1)
    assert torch.allclose(gdm, clover + green, rtol=1e-5, atol=1e-3)
    assert torch.allclose(total, clover + dead + green, rtol=1e-5, atol=1e-3)
    assert torch.allclose(five[:, :3], out["components"].double(), rtol=1e-5, atol=1e-3)
    total_true = (out["components"].sum(-1).double() - zscore.mean[4]) / zscore.std[4]
    assert torch.allclose(out["total_z"].double(), total_true, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_initial_prediction_near_training_mean(name, zscore):
    head = make(name, zscore, n_layers=2).eval()
    pred = head(tokens(2, batch=16))["components"].mean(0).detach().double().numpy()
    assert np.allclose(pred, zscore.mean[:3], rtol=0.35), (pred, zscore.mean[:3])


def test_fusion_is_a_weighted_average_of_layer_components(zscore):
    head = make("mlp", zscore, n_layers=3).eval()
    with torch.no_grad():
        head.fusion_logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
    out = head(tokens(3))
    w = torch.softmax(torch.tensor([2.0, -1.0, 0.5]), 0)
    assert torch.allclose(out["layer_weights"], w)
    assert torch.allclose(out["components"], (out["layer_components"] * w[None, :, None]).sum(1), atol=1e-4)


def test_density_map_mean_equals_components(zscore):
    head = make("density", zscore, n_layers=3).eval()
    with torch.no_grad():
        head.fusion_logits.copy_(torch.tensor([0.3, 1.0, -0.7]))
    out = head(tokens(3), return_maps=True)
    assert out["density_map"].shape == (5, 3, *GRID)
    assert (out["density_map"] >= 0).all()
    assert torch.allclose(out["density_map"].mean(dim=(2, 3)), out["components"], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="no density maps"):
        make("mlp", zscore)(tokens(3), return_maps=True)


def test_density_map_follows_the_patch_grid(zscore):
    """Row-major patch order: a token placed at (row, col) moves exactly that cell of the map."""
    head = make("density", zscore, n_layers=1, aux=None).eval()
    x = tokens(1, batch=1)
    base = head(x, return_maps=True)["density_map"][0]
    x[0, 0, 1 * GRID[1] + 2] += 5.0
    diff = (head(x, return_maps=True)["density_map"][0] - base).abs().sum(0)
    assert diff[1, 2] > 0 and (diff.flatten().nonzero().numel() == 1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_config_round_trip_rebuilds_identical_architecture(name, zscore):
    head = make(name, zscore, n_layers=2, layers=[4, 7])
    config = json.loads(json.dumps(head.config))
    rebuilt = heads.create_head(**config, zscore=zscore)
    rebuilt.load_state_dict(head.state_dict(), strict=True)
    assert rebuilt.config == head.config
    x = tokens(2)
    assert torch.allclose(rebuilt.eval()(x)["five_z"], head.eval()(x)["five_z"])


def test_bad_tokens_shape_is_a_clear_error(zscore):
    head = make("mlp", zscore, n_layers=2)
    with pytest.raises(ValueError, match=r"expects tokens .*\(B, 2, 12, 8\).*got \(5, 3, 12, 8\)"):
        head(tokens(3))


def test_check_compatible_refuses_wrong_layers_channels_grid(zscore):
    head = make("mlp", zscore, n_layers=2, layers=[4, 7])
    sig = heads.head_signature(head)
    assert sig == {"n_layers": 2, "channels": CHANNELS, "grid": list(GRID), "layers": [4, 7]}
    store = dict(layers=[2, 4, 7], channels=CHANNELS, grid=list(GRID))
    heads.check_compatible(head.config, store)  # a superset of the head's layers is fine
    with pytest.raises(ValueError, match=r"channels 8 \(head\) vs 16"):
        heads.check_compatible(head.config, {**store, "channels": 16})
    with pytest.raises(ValueError, match=r"missing \[7\]"):
        heads.check_compatible(head.config, {**store, "layers": [2, 4]})
    with pytest.raises(ValueError, match=r"grid \[3, 4\] \(head\) vs \[4, 4\]"):
        heads.check_compatible(head.config, {**store, "grid": [4, 4]})
    unnamed = make("mlp", zscore, n_layers=2).config
    heads.check_compatible(unnamed, sig)
    with pytest.raises(ValueError, match=r"2 layers \(head\) vs 3"):
        heads.check_compatible(unnamed, store)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_head_has_dropout_for_mc_inference(name, zscore):
    head = make(name, zscore, n_layers=1, dropout=0.3)
    with torch.no_grad():  # as if trained: the readouts of mlp and vitdet start at zero, where dropout does nothing
        for p in head.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.3)
    assert any(isinstance(m, nn.Dropout) for m in head.modules())
    enable_mc_dropout(head)
    assert not head.training and all(m.training for m in head.modules() if isinstance(m, nn.Dropout))
    x = tokens(1)
    assert not torch.allclose(head(x)["components"], head(x)["components"])
    head.eval()
    assert torch.allclose(head(x)["components"], head(x)["components"])


def test_aux_off_has_no_aux_outputs(zscore):
    out = make("density", zscore, n_layers=1, aux=None)(tokens(1))
    assert not {"height", "ndvi_z", "state_logits"} & set(out)


@pytest.mark.parametrize("name", ["mlp", "vitdet"])
def test_total_keeps_a_gradient_far_below_zero_grams(name, zscore):
    """The total's softplus works in std units: a raw total driven 10 std below 0 g still learns back."""
    head = make(name, zscore, n_layers=1, aux=None)
    raw = torch.tensor([[-10.0, 0.0, 0.0, 0.0]], requires_grad=True)
    head.total_ratio_to_components(raw).sum().backward()
    assert raw.grad[0, 0] > 0
    legacy = make(name, zscore, n_layers=1, aux=None, total_scale="g/m^2")  # how old checkpoints were built
    raw = torch.tensor([[-10.0, 0.0, 0.0, 0.0]], requires_grad=True)
    legacy.total_ratio_to_components(raw).sum().backward()
    assert raw.grad[0, 0] == 0  # the dead zone the "std" scale removes


@pytest.mark.parametrize("name", ["mlp", "vitdet"])
def test_checkpoint_without_total_scale_rebuilds_the_old_way(name, zscore):
    old = make(name, zscore, n_layers=2, total_scale="g/m^2")
    config = {k: v for k, v in old.config.items() if k != "total_scale"}  # a config saved before the key existed
    rebuilt = heads.rebuild_head(json.loads(json.dumps(config)), zscore)
    assert rebuilt.total_scale == "g/m^2" and heads.rebuild_head(make(name, zscore).config, zscore).total_scale == "std"
    rebuilt.load_state_dict(old.state_dict(), strict=True)
    x = tokens(2)
    assert torch.allclose(rebuilt.eval()(x)["components"], old.eval()(x)["components"])
    with pytest.raises(ValueError, match="total_scale"):
        make(name, zscore, total_scale="grams")


def test_wide_layers_train_at_a_fan_in_scaled_learning_rate(zscore):
    """mlp/vitdet: lr * min(1, 256 / fan-in) per weight; density keeps the plain two groups (its benchmarked lr)."""
    from biomass_cache.train.loop import head_param_groups

    groups = head_param_groups(make("vitdet", zscore, dim=8, hidden=1024), 4e-3, 0.05)
    lrs = {tuple(p.shape): g.get("lr", 4e-3) for g in groups for p in g["params"]}
    assert lrs[(4, 1024)] == pytest.approx(4e-3 / 4) and lrs[(1024, 32)] == 4e-3 and lrs[(8, 8, 3, 3)] == 4e-3
    density = make("density", zscore)
    groups = head_param_groups(density, 4e-3, 0.05)
    assert [("lr" in g, g["weight_decay"]) for g in groups] == [(False, 0.05), (False, 0.0)]
    decayed = [id(p) for p in groups[0]["params"]]
    assert decayed == [id(p) for n, p in density.named_parameters() if p.ndim >= 2 and n not in ("bias1", "bias2")]


def test_interval_bins_hand_computed():
    """Edges at the j/K quantiles, bin j = [edge j-1, edge j), centres = the bin means (mid-range when empty)."""
    from biomass_cache.heads.intervals import assign_bins, fit_bins

    y = np.full((8, 5), np.nan)
    y[:, 0] = np.arange(8.0)  # quantile positions 1.75, 3.5, 5.25 of 0..7
    y[:, 1] = [0, 0, 0, 0, 0, 0, 4, 8]  # ties: edges 0, 0, 1 leave bins 0 and 1 empty
    y[:7, 2] = np.arange(7.0)  # one unknown value is left out: positions 1.5, 3, 4.5
    edges, centres = fit_bins(y, 4)
    np.testing.assert_allclose(edges[0], [1.75, 3.5, 5.25])
    np.testing.assert_allclose(centres[0], [0.5, 2.5, 4.5, 6.5])
    np.testing.assert_allclose(edges[1], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(centres[1], [0.0, 0.0, 0.0, 6.0])
    np.testing.assert_allclose(edges[2], [1.5, 3.0, 4.5])
    np.testing.assert_allclose(centres[2], [0.5, 2.0, 3.5, 5.5])
    assert (edges[3:] == 0).all() and (centres[3:] == 0).all()  # no known values
    assert assign_bins(y[:, :1], edges[:1]).ravel().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert assign_bins(y[:, 1:2], edges[1:2]).ravel().tolist() == [2, 2, 2, 2, 2, 2, 3, 3]
    head = heads.intervals.IntervalHead(n_layers=1, features=2, bins=4, dropout=0.0)
    head.set_bins(edges, centres)
    yt = torch.tensor([[1.75, 0.0, 9.0, 0.0, 0.0], [-1.0, 8.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False, False], [True, True, False, False, True]])
    assert head.labels(yt, mask).tolist() == [[1, 2, 3, -1, -1], [0, 3, -1, -1, 3]]
    with pytest.raises(ValueError, match="at least 2"):
        fit_bins(y, 1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_interval_logits_round_trip_and_blend(name, zscore):
    """Every head: bin logits (B, 5, K) on its shared features; the config and buffers rebuild it exactly; blend 0
    leaves the regression untouched, blend a mixes in the expected bin centre and keeps the identities."""
    from biomass_cache.heads.intervals import fit_bins

    plain = make(name, zscore, n_layers=2).eval()
    rng = np.random.default_rng(0)
    bins = fit_bins(components_to_targets(rng.gamma(2.0, 60.0, size=(40, 3))), 3)
    x = tokens(2)
    for blend in (0.0, 0.4):
        head = make(name, zscore, n_layers=2, interval={"bins": 3, "blend": blend})
        missing, unexpected = head.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and missing and all(k.startswith("interval_head.") for k in missing)
        head.interval_head.set_bins(*bins)
        out, base = head.eval()(x), plain(x)
        assert out["interval_logits"].shape == (5, 5, 3) and "interval_logits" not in base
        expected = head.interval_head.expected(out["interval_logits"])[:, :3]
        assert torch.equal(out["components"], base["components"]) if blend == 0 else torch.allclose(
            out["components"], (1 - blend) * base["components"] + blend * expected, atol=1e-4)
        five = out["five_z"] * head.target_std + head.target_mean
        assert torch.allclose(five[:, 4], out["components"].sum(-1), rtol=1e-4)
        config = json.loads(json.dumps(head.config))
        assert config["interval"] == {"bins": 3, "blend": blend} and "interval" not in plain.config
        rebuilt = heads.rebuild_head(config, zscore)
        rebuilt.load_state_dict(head.state_dict(), strict=True)
        assert torch.equal(rebuilt.interval_head.centres, torch.tensor(bins[1], dtype=torch.float32))
        assert torch.equal(rebuilt.eval()(x)["components"], out["components"])
    with pytest.raises(ValueError, match="bins must be 0"):
        make(name, zscore, interval={"bins": 1})


@pytest.mark.parametrize("dropout", [False, True])
def test_density_mlp_gradients_are_autograds(dropout):
    """The density head's hand-written backward (heads/density.py PatchMLPFunction) against numerical gradients:
    weights, biases and the tokens' own gradient (a LoRA run), through both outputs (the readout and the hidden
    features the auxiliary heads read), with and without a dropout mask."""
    from biomass_cache.heads.density import PatchMLPFunction

    g = torch.Generator().manual_seed(0)
    n_layers, n, c, h = 2, 7, 5, 6
    args = [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
            for shape in ((n_layers, n, c), (n_layers, h, c), (n_layers, h), (n_layers, 3, h), (n_layers, 3))]
    keep = (torch.rand(n_layers, n, h, generator=g, dtype=torch.float64) > 0.3) / 0.7 if dropout else None

    def both(*a):
        raw, hidden, _ = PatchMLPFunction.apply(*a, keep)
        return raw, hidden

    assert torch.autograd.gradcheck(both, args)
    assert torch.autograd.gradcheck(lambda *a: both(*a)[0], args)  # the features unused: no gradient through them
    assert torch.autograd.gradcheck(lambda *a: both(*a)[1], args)  # the features alone (an auxiliary loss term)
    x, w1, b1, w2, b2 = args
    hidden = torch.nn.functional.gelu(x @ w1.transpose(1, 2) + b1[:, None])
    expected = (hidden if keep is None else hidden * keep) @ w2.transpose(1, 2) + b2[:, None]
    assert torch.allclose(both(*args)[0], expected) and torch.allclose(both(*args)[1], hidden)


def test_density_loads_a_checkpoint_with_one_module_per_layer(zscore):
    """Runs trained before the density head held its weights stacked over the layers keep loading (the keys of
    one nn.Linear pair per layer), to the same predictions."""
    head = make("density", zscore)
    keys = {"weight1": "body.0.weight", "bias1": "body.0.bias", "weight2": "out.1.weight", "bias2": "out.1.bias"}
    old = {k: v for k, v in head.state_dict().items() if k not in keys}
    for name, key in keys.items():
        for l, part in enumerate(getattr(head, name).detach().unbind(0)):
            old[f"per_layer.{l}.{key}"] = part.clone()
    fresh = make("density", zscore)
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(old, strict=True)
    x = tokens(3)
    assert torch.equal(fresh.eval()(x)["five_z"], head.eval()(x)["five_z"])
    short = {k: v for k, v in old.items() if not k.startswith("per_layer.2.")}  # fewer layers than the head's
    with pytest.raises(RuntimeError, match="Missing key"):  # what runs.load_head turns into its one-line error
        fresh.load_state_dict(short, strict=True)


def test_stacked_biases_are_not_weight_decayed(zscore):
    from biomass_cache.train.loop import head_param_groups

    head = make("density", zscore, aux={})
    decayed = {id(p) for g in head_param_groups(head, 1e-3, 0.05) if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(head.weight1), id(head.weight2)}
