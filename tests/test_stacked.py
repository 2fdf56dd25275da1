"""Folds trained as one stacked model (train/stacked.py) against the fold-by-fold loop: the same models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from biomass_cache.cli.train import train_command
from biomass_cache.common.targets import TARGETS
from biomass_cache.train.config import TrainConfig
from biomass_cache.train.stacked import pad, stack_reason, stacked_adamw
from toys import make_toy

pytestmark = pytest.mark.usefixtures("one_thread")


def train(*args) -> str:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--no-plots"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_the_stacked_update_is_adamw_fold_by_fold():
    """Two folds with their own lr, decay and step counts: torch.optim.AdamW on each, and one stacked update."""
    torch.manual_seed(0)
    weights, grads = torch.randn(2, 4, 3), [torch.randn(2, 4, 3) for _ in range(3)]
    lrs, mine = (1e-2, 3e-3), {"w": weights.clone()}
    moments = {"w": (torch.zeros(2, 4, 3), torch.zeros(2, 4, 3))}
    for step, g in enumerate(grads, start=1):
        live = torch.tensor([True, step != 2])  # fold 1 skips its second step (a non-finite loss)
        steps = torch.tensor([step, step - (step > 2)], dtype=torch.float32)
        stacked_adamw(mine, {"w": g}, moments, torch.tensor(lrs), steps, {"w": 0.05}, {"w": 1.0}, live)
    for r in range(2):
        w = torch.nn.Parameter(weights[r].clone())
        opt = torch.optim.AdamW([w], lr=lrs[r], weight_decay=0.05, foreach=False)
        for step, g in enumerate(grads, start=1):
            if r == 1 and step == 2:
                continue
            w.grad = g[r].clone()
            opt.step()
        torch.testing.assert_close(mine["w"][r], w.detach(), rtol=1e-6, atol=1e-7)


def test_padding_rows_are_masked_out_of_every_loss():
    batch = {"y": torch.ones(2, 5), "y_mask": torch.ones(2, 5, dtype=torch.bool), "weight": torch.ones(2),
             "state": torch.tensor([1, 0]), "bank_row": torch.tensor([4, 7])}
    padded = pad(batch, 4)
    assert padded["y_mask"][2:].any().item() is False and padded["weight"][2:].sum().item() == 0
    assert padded["state"].tolist() == [1, 0, -1, -1] and padded["bank_row"].tolist() == [4, 7, 4, 4]
    assert pad(batch, 2) is batch


def test_what_stacking_does_not_cover():
    plain = {"density": TrainConfig()}
    assert stack_reason(TrainConfig(), plain, extra=False, tuning=False) is None
    assert stack_reason(TrainConfig(), {"a": TrainConfig(), "b": TrainConfig()}, False, False) == \
        "several heads side by side"
    assert stack_reason(TrainConfig(), {"d": TrainConfig(mixup=True)}, False, False) == "mixup"
    assert stack_reason(TrainConfig(), {"r": TrainConfig(head="ridge")}, False, False) == "a closed-form head"
    assert stack_reason(TrainConfig(), plain, extra=True, tuning=False) == "a LoRA backbone"


@pytest.mark.slow
@pytest.mark.parametrize("head", ["density", "mlp"])
def test_stacked_folds_give_the_models_of_the_fold_by_fold_loop(tmp_path, head):
    """fp32, a head without dropout, its layers in another order than the store's: the same OOF predictions and
    history, within float tolerance, and each fold's last validation is its OOF score (the same layers, in the same
    order, in training, validation and the saved model)."""
    data, store = make_toy(tmp_path, n=36)
    config = tmp_path / "c.toml"
    config.write_text(f'[train]\nhead = "{head}"\nhead_kwargs = {{ dropout = 0.0 }}\nlayers = [7, 3]\ntta = 0\n'
                      'ema = false\n')
    common = ["--cache", store, "--data", data, "--config", config, "--folds", 3, "--epochs", 8, "--batch-size", 8,
              "--workers", 0, "--precision", "fp32", "--eval-every", 4]
    output = train(*common, "--out", tmp_path / "stacked", "--stack-folds")
    assert "3 folds stacked" in output
    train(*common, "--out", tmp_path / "loop", "--no-stack-folds")
    a, b = (pd.read_csv(tmp_path / k / "oof.csv") for k in ("stacked", "loop"))
    np.testing.assert_allclose(a[list(TARGETS)], b[list(TARGETS)], rtol=1e-4, atol=1e-5)
    ha, hb = (pd.read_csv(tmp_path / k / "history.csv") for k in ("stacked", "loop"))
    assert list(ha["fold"]) == list(hb["fold"]) and list(ha["epoch"]) == list(hb["epoch"])
    np.testing.assert_allclose(ha["train_loss"], hb["train_loss"], rtol=1e-4)
    np.testing.assert_allclose(ha["lr"], hb["lr"], rtol=1e-9)
    for run in ("stacked", "loop"):
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert set(metrics["folds"]) == {"fold0", "fold1", "fold2"}
        last = pd.read_csv(tmp_path / run / "history.csv").groupby("fold").last()
        for fold, row in last.iterrows():
            assert row["val_competition_r2"] == pytest.approx(metrics["folds"][fold]["competition_r2"], abs=1e-5)


def test_stacked_folds_draw_the_density_heads_dropout_per_fold(tmp_path):
    """Dropout inside the density head's hand-written MLP under vmap: each fold's own mask (an in-place draw on
    one tensor for all folds was refused by vmap)."""
    data, store = make_toy(tmp_path, n=24)
    config = tmp_path / "c.toml"
    config.write_text('[train]\nhead = "density"\nhead_kwargs = { dropout = 0.3 }\n')
    output = train("--cache", store, "--data", data, "--config", config, "--folds", 2, "--epochs", 1,
                   "--batch-size", 8, "--workers", 0, "--out", tmp_path / "run", "--stack-folds")
    assert "2 folds stacked" in output


def test_stacking_asked_for_what_it_does_not_cover_says_so(tmp_path):
    data, store = make_toy(tmp_path, n=24)
    output = train("--cache", store, "--data", data, "--head", "density,mlp", "--folds", 2, "--epochs", 1,
                   "--batch-size", 8, "--workers", 0, "--out", tmp_path / "run", "--stack-folds")
    assert "note: the folds train one by one, not stacked: stacking does not cover several heads side by side" in output


@pytest.mark.slow
def test_a_seed_ensemble_is_a_run_per_seed_stacked_or_not(tmp_path):
    """--seeds 0,1: two ordinary run folders on the first seed's folds; fold by fold each equals `--seed S` on those
    folds, bit for bit; stacked (every fold of both seeds as one model) the same within float tolerance."""
    data, store = make_toy(tmp_path, n=36)
    config = tmp_path / "c.toml"
    config.write_text('[train]\nhead = "density"\nhead_kwargs = { dropout = 0.0 }\n')
    common = ["--cache", store, "--data", data, "--config", config, "--folds", 3, "--epochs", 6, "--batch-size", 8,
              "--workers", 0, "--precision", "fp32", "--eval-every", 3]
    train(*common, "--out", tmp_path / "loop", "--seeds", "0,1", "--no-stack-folds")
    output = train(*common, "--out", tmp_path / "stacked", "--seeds", "0,1", "--stack-folds")
    assert "6 folds stacked" in output
    alone = tmp_path / "alone"
    train(*common, "--out", alone, "--seed", 1, "--folds-csv", tmp_path / "loop" / "seed0" / "folds.csv",
          "--no-stack-folds")
    folds = pd.read_csv(tmp_path / "loop" / "seed0" / "folds.csv")
    for run in ("loop/seed1", "stacked/seed0", "stacked/seed1"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / run / "folds.csv"), folds)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "loop" / "seed1" / "oof.csv"), pd.read_csv(alone / "oof.csv"))
    assert json.loads((tmp_path / "loop" / "seed1" / "config.json").read_text())["train"]["seed"] == 1
    seeds = [pd.read_csv(tmp_path / "loop" / s / "oof.csv")[list(TARGETS)].to_numpy() for s in ("seed0", "seed1")]
    assert np.abs(seeds[0] - seeds[1]).max() > 1e-3  # the seeds train differently
    for s in ("seed0", "seed1"):
        a, b = (pd.read_csv(tmp_path / k / s / "oof.csv") for k in ("stacked", "loop"))
        np.testing.assert_allclose(a[list(TARGETS)], b[list(TARGETS)], rtol=1e-4, atol=1e-5)
        assert (tmp_path / "stacked" / s / "fold2" / "density.safetensors").is_file()


@pytest.mark.parametrize("seeds, seed, says", [
    ("0,x", None, "distinct integers from 0 to 4294967295"), ("1,1", None, "distinct"), ("1,,2", None, "distinct"),
    ("+1", None, "distinct"), ("1_0", None, "distinct"), ("4294967296", None, "from 0 to 4294967295"),
    ("99999999999999999999", None, "from 0 to"), ("0,1", 3, "--seed and --seeds")])
def test_bad_seeds_are_one_line(tmp_path, seeds, seed, says):
    from biomass_cache.cli.train import parse_seeds
    from biomass_cache.common.errors import DataError

    with pytest.raises(DataError, match=says):
        parse_seeds(seeds, seed)


def test_a_stopped_seed_ensemble_keeps_its_finished_seeds_and_grows_on_their_folds(tmp_path, monkeypatch):
    """Fold by fold, each seed's run is written as soon as it ends: a stop in the second seed leaves the first
    complete. A later --seeds into the same folder trains on the folds already there."""
    from biomass_cache.train.crossval import CrossValidation

    data, store = make_toy(tmp_path, n=24)
    common = ["--cache", store, "--data", data, "--folds", 3, "--epochs", 1, "--batch-size", 8, "--workers", 0,
              "--no-stack-folds", "--no-plots"]
    trained = CrossValidation.train_fold_by_fold

    def stop_at_seed_1(self, on_epoch):
        if self.cfg.seed == 1:
            raise KeyboardInterrupt
        return trained(self, on_epoch)

    monkeypatch.setattr(CrossValidation, "train_fold_by_fold", stop_at_seed_1)
    out = tmp_path / "ens"
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    stopped = CliRunner().invoke(app, [str(a) for a in [*common, "--out", out, "--seeds", "0,1"]])
    assert stopped.exit_code != 0, stopped.output
    assert json.loads((out / "seed0" / "metrics.json").read_text())["competition_r2"] is not None
    assert not (out / "seed1" / "metrics.json").exists()
    monkeypatch.setattr(CrossValidation, "train_fold_by_fold", trained)
    assert "using the 3 folds of" in train(*common[:-1], "--out", out, "--seeds", "1,2", "--overwrite")
    for s in ("seed1", "seed2"):
        assert (out / s / "folds.csv").read_bytes() == (out / "seed0" / "folds.csv").read_bytes()
    from biomass_cache.cli.errors import script_app
    from biomass_cache.cli.report import report_command

    report = CliRunner().invoke(script_app(report_command), [str(out)])
    assert report.exit_code == 2 and f"seed ensemble (train --seeds): report one, e.g. {out / 'seed0'}" in report.output
    (tmp_path / "afile").write_text("")
    result = CliRunner().invoke(app, [str(a) for a in [*common, "--out", tmp_path / "afile", "--seeds", "0"]])
    assert result.exit_code != 0 and "is a file, not a folder" in str(result.exception) + result.output
