"""The closed-form ridge head: pooling by hand, the ridge algebra against sklearn, identities, a 5-fold run on the
toy store, checkpoint round trip and the settings it refuses or ignores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from sklearn.linear_model import Ridge
from typer.testing import CliRunner

import biomass_cache.heads as heads
from biomass_cache.train import runs
from biomass_cache.cli.train import train_command
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.heads.ridge import kernel_ridge_cv, pool_tokens, ridge_fit
from biomass_cache.train.inference import components_to_grams, predict_store
from biomass_cache.common.metrics import competition_r2
from biomass_cache.store.layout import open_store
from biomass_cache.common.targets import TARGETS, ZScore, components_to_targets
from toys import make_toy


def test_pooling_by_hand():
    """Channel 0 = tokens 1, -2, 4; channel 1 = 0, 0, 0. Shifted GeM of channel 0: min -2, shifted 3, 0, 6,
    mean of cubes (27 + 0 + 216) / 3 = 81, so -2 + 81^(1/3)."""
    x = torch.tensor([[[[1.0, 0.0], [-2.0, 0.0], [4.0, 0.0]]]])  # (B=1, L=1, T=3, C=2)
    pooled = pool_tokens(x)[0, 0]
    gem = -2 + 81 ** (1 / 3)
    torch.testing.assert_close(pooled, torch.tensor([1.0, 0.0, 4.0, 0.0, -2.0, 0.0, gem, 0.0]))
    assert 1.0 < gem < 4.0  # between the mean and the max
    y = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pool_tokens(y + 7.0), pool_tokens(y) + 7.0)  # every pool is shift-equivariant


def test_ridge_algebra_matches_sklearn():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(24, 40)), rng.normal(size=(24, 2))
    alphas = np.array([0.3, 5.0])
    weight, bias = ridge_fit(torch.tensor(x), torch.tensor(y), torch.tensor(alphas))
    for j, a in enumerate(alphas):  # column j with alpha j
        ref = Ridge(alpha=a).fit(x, y[:, j])
        np.testing.assert_allclose(weight[:, j].numpy(), ref.coef_, atol=1e-10)
        assert bias[j].item() == pytest.approx(ref.intercept_, abs=1e-10)
    splits = [(np.arange(0, 16), np.arange(16, 24)), (np.arange(8, 24), np.arange(0, 8))]
    oof = kernel_ridge_cv(torch.tensor(x @ x.T), torch.tensor(y), splits, torch.tensor(alphas)).numpy()
    for k, a in enumerate(alphas):
        for tr, va in splits:
            np.testing.assert_allclose(oof[k, va], Ridge(alpha=a).fit(x[tr], y[tr]).predict(x[va]), atol=1e-10)


def fitted_head(n_layers: int = 2, seed: int = 0) -> tuple[heads.FusedHead, torch.Tensor, torch.Tensor]:
    """A ridge head fitted on tokens whose first three channels carry the components."""
    rng = np.random.default_rng(seed)
    comps = rng.gamma(2.0, [20.0, 30.0, 60.0], size=(60, 3))
    zscore = ZScore.fit(components_to_targets(comps))
    head = heads.create_head("ridge", n_layers=n_layers, channels=6, grid=(2, 3), zscore=zscore, inner_folds=3)
    tokens = rng.normal(0, 0.3, size=(60, n_layers, 6, 6))
    tokens[..., :3] += comps[:, None, None, :] / 100
    tokens = torch.tensor(tokens, dtype=torch.float32)
    report = head.fit(head.pooled(tokens), torch.tensor(comps), np.arange(60) // 4)
    assert set(report) == {"alpha", "log_weight", "inner_cv_competition_r2"} and report["inner_cv_competition_r2"] > 0.9
    return head.eval(), tokens, torch.tensor(comps)


def test_predictions_are_components_with_exact_identities():
    head, tokens, comps = fitted_head()
    out = head(tokens)
    c = out["components"]
    assert (c >= 0).all() and c.shape == (60, 3) and heads.count_parameters(head) == 0
    five = out["five_z"] * head.target_std + head.target_mean
    torch.testing.assert_close(five[:, 3], c[:, 0] + c[:, 2])  # GDM = clover + green
    torch.testing.assert_close(five[:, 4], c.sum(dim=1))  # Total = clover + dead + green
    grams = components_to_grams(c.double().numpy())
    np.testing.assert_allclose(grams[:, 3], grams[:, 0] + grams[:, 2], rtol=1e-12)
    np.testing.assert_allclose(grams[:, 4], grams[:, :3].sum(axis=1), rtol=1e-12)
    torch.testing.assert_close(out["layer_components"], c[:, None].expand(-1, 2, -1))
    truth = components_to_targets(comps.numpy())
    assert competition_r2(truth, components_to_targets(c.double().numpy())) > 0.9


def test_blend_and_targets_by_hand():
    """A map set by hand (weights 0): the log1p model says 30, 20, 10 g/m^2 (through grams), the raw one 10, 20, 30
    and a -50 that the clamp stops at 0; blended 50/50 -> 20, 20, 20 -> GDM 40, Total 60."""
    head, tokens, _ = fitted_head(n_layers=1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([*np.log1p(np.array([30.0, 20.0, 10.0]) * 0.21), 10.0, 20.0, 30.0]))
        head.log_weight.fill_(0.5)
    out = head(tokens[:2])
    torch.testing.assert_close(out["components"], torch.full((2, 3), 20.0))
    torch.testing.assert_close(out["five_z"] * head.target_std + head.target_mean,
                               torch.tensor([[20.0, 20.0, 20.0, 40.0, 60.0]] * 2), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        head.bias[3] = -50.0
        head.bias[0] = 0.0  # log1p model: 0 g
    assert out["components"].shape == (2, 3) and (head(tokens[:2])["components"][:, 0] == 0).all()


def test_checkpoint_round_trip_predicts_identically(tmp_path):
    head, tokens, _ = fitted_head()
    meta = {"head": head.config, "zscore": {"names": list(TARGETS), "mean": head.target_mean.tolist(),
                                            "std": head.target_std.tolist()},
            "aux": {}, "fingerprint": {}, "layers": [0, 1], "channels": 6, "grid": [2, 3]}
    runs.save_head(tmp_path / "ridge.json", head, meta)
    again, _ = runs.load_head(tmp_path / "ridge.json")
    assert json.loads((tmp_path / "ridge.json").read_text())["head"]["name"] == "ridge"
    torch.testing.assert_close(again(tokens)["components"], head(tokens)["components"], rtol=0, atol=0)
    assert again.log_weight.item() == head.log_weight.item()


def test_settings_it_cannot_honour_are_refused():
    zscore = ZScore.fit(components_to_targets(np.random.default_rng(0).gamma(2.0, 20.0, (16, 3))))
    make = lambda **kw: heads.create_head("ridge", n_layers=1, channels=4, grid=(2, 2), zscore=zscore, **kw)
    with pytest.raises(ValueError, match="no auxiliary tasks"):
        make(aux=dict(height=True))
    with pytest.raises(ValueError, match="no interval classification"):
        make(interval={"bins": 4, "blend": 0.0})
    with pytest.raises(ValueError, match="has no dropout"):
        make(dropout=0.1)
    with pytest.raises(ValueError, match="alphas must be numbers > 0"):
        make(alphas=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"blend .* must be in \[0, 1\]"):
        make(blend=1.5)
    with pytest.raises(ValueError, match="at least 2 groups"):
        make().fit(torch.zeros(8, 16), torch.ones(8, 3), np.zeros(8, dtype=int))


# ----------------------------------------------------------------------------- `biomass train --head ridge`
def train(*args) -> str:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--no-plots", "--workers", "0"]],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> tuple[Path, Path]:
    return make_toy(tmp_path_factory.mktemp("ridge"), n=36)


@pytest.fixture(scope="module")
def ridge_run(toy_data) -> tuple[Path, Path, Path, str]:
    data, store = toy_data
    root = store.parent
    output = train("--cache", store, "--data", data, "--out", root / "run", "--head", "ridge", "--folds", 5,
                   "--lr", 1e-3, "--mixup", "--interval-bins", 4)
    return data, store, root / "run", output


@pytest.mark.slow
def test_five_fold_run_learns_in_every_fold(ridge_run):
    data, _, run, output = ridge_run
    for name in ["metrics.json", "oof_ridge.csv", "history.csv"] + [f"fold{k}/ridge.{e}" for k in range(5)
                                                                    for e in ("json", "safetensors")]:
        assert (run / name).is_file(), name
    table = read_long_csv(data / "train.csv", check_images=False)
    truth = table[list(TARGETS)].to_numpy(float)
    folds = pd.read_csv(run / "folds.csv", dtype={"image_id": str})["fold"].to_numpy()
    metrics = json.loads((run / "metrics.json").read_text())["heads"]["ridge"]
    assert metrics["collapsed"] == [] and metrics["competition_r2"] > 0.8
    for k in range(5):
        mean = np.broadcast_to(truth[folds != k].mean(axis=0), truth[folds == k].shape)
        assert metrics["folds"][f"fold{k}"]["competition_r2"] > competition_r2(truth[folds == k], mean) + 0.3
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1] * 5 and history["train_loss"].isna().all()
    assert "ignores the gradient-training settings lr=0.001, mixup=True, interval_bins=4" in output
    assert output.count("closed-form fit on") == 5


@pytest.mark.slow
def test_a_fold_checkpoint_reproduces_its_oof_rows(ridge_run):
    data, store, run, _ = ridge_run
    head, meta = runs.load_head(run / "fold2" / "ridge.json")
    assert heads.count_parameters(head) == 0 and meta["n_train"] > 0
    oof = runs.read_oof(run / "oof_ridge.csv")
    folds = pd.read_csv(run / "folds.csv", dtype={"image_id": str})
    ids = list(folds.loc[folds["fold"] == 2, "image_id"])
    store = open_store(store)
    rows = [store.image_ids.index(i) for i in ids]
    pred = predict_store(head, meta, store, rows, views="all").grams
    np.testing.assert_allclose(pred, oof.set_index("image_id").loc[ids, list(TARGETS)].to_numpy(), rtol=1e-6)


def test_aux_with_ridge_is_one_clear_error(toy_data, tmp_path):
    data, store = toy_data
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    with pytest.raises(DataError, match=r"member 'ridge': head 'ridge' .*no auxiliary tasks"):
        CliRunner().invoke(app, [str(a) for a in ["--cache", store, "--data", data, "--out", tmp_path / "r", "--head",
                                                  "ridge", "--aux", "--no-plots"]], catch_exceptions=False)
    assert not (tmp_path / "r").exists()


def test_a_source_that_cannot_fit_it_is_refused(toy_data):
    """LoRA's token source (a live backbone, no stored views) has no `fit_loader`: the run stops before writing."""
    import biomass_cache.train.crossval as cv
    from biomass_cache.train.config import resolve

    data, _ = toy_data
    table = read_long_csv(data / "train.csv", check_images=False)
    source = cv.TokenSource(layers=[3, 7], signature={"channels": 16, "grid": [8, 4]}, fingerprint={}, config={},
                            device=torch.device("cpu"), train_loader=None, val_loader=None, tokens_fn=None,
                            predict=None)
    _, members = resolve({}, [], {"device": "cpu"}, ["ridge"])
    with pytest.raises(DataError, match=r"member 'ridge': head 'ridge' is fitted in closed form .* cannot fit it"):
        cv.check_heads(source, table, members)
