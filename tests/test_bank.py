"""The token bank (train/bank.py): what it holds is the store's tokens, where it goes, and that training on it gives the
same models as streaming the tokens from the store."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from biomass_cache.cli.train import train_command
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.common.metrics import competition_r2
from biomass_cache.common.targets import TARGETS
from biomass_cache.store.layout import open_store
from biomass_cache.backbone import precision as precision_module
from biomass_cache.train import bank as bank_module
from biomass_cache.train.bank import TokenBank, plan_bank, training_precision
from biomass_cache.train.config import TrainConfig
from biomass_cache.train.crossval import token_plan
from toys import LAYERS, VIEWS, make_toy

pytestmark = pytest.mark.usefixtures("one_thread")
GB = 10**9


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path]:
    return make_toy(tmp_path_factory.mktemp("bank"), n=36)


def test_a_gather_is_the_stored_tokens_in_the_heads_layout(toy):
    store = open_store(toy[1])
    rows = [5, 2, 9]
    plan, _ = plan_bank(store, len(rows), VIEWS, len(LAYERS), torch.device("cpu"), "fp32", norm=False)
    bank = TokenBank.load(store, rows, range(VIEWS), LAYERS, plan)
    at, views = torch.tensor([2, 0, 0, 1]), torch.tensor([1, 1, 0, 0])  # bank rows: store rows 9, 5, 5, 2
    got = bank.gather(at, views)
    want = np.stack([store.read(r, v, LAYERS) for r, v in ((9, 1), (5, 1), (5, 0), (2, 0))])
    np.testing.assert_array_equal(got.numpy(), want)  # float16 storage read as float32 exactly
    assert got.transpose(0, 1).is_contiguous()  # each layer's (B, T, C) slice is contiguous
    np.testing.assert_array_equal(bank.gather(at, views, [1]).numpy(), want[:, 1:])
    normed = TokenBank.load(store, rows, range(VIEWS), LAYERS, replace(plan, normed=True))
    torch.testing.assert_close(normed.gather(at, views), F.layer_norm(torch.from_numpy(want), (want.shape[-1],)),
                               rtol=0, atol=0)  # the head's own LayerNorm, bit for bit


def test_the_plan_prefers_the_device_then_the_host_then_streaming():
    store = SimpleNamespace(grid=(30, 60), channels=1024, storage_dtype="float16")  # ViT-L tokens
    n = (357, 4, 3)  # 15.8 GB as stored
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plan, refused = plan_bank(store, *n, cuda, "bf16", True, budgets={"cuda": 20 * GB, "cpu": 0})
    assert (plan.device, plan.dtype, plan.normed) == (cuda, torch.bfloat16, True) and refused == []
    assert round(plan.nbytes / GB, 1) == 15.8
    plan, refused = plan_bank(store, *n, cuda, "fp32", True, budgets={"cuda": 20 * GB, "cpu": 0})
    assert (plan.device, plan.dtype, plan.normed) == (cuda, torch.float16, False)  # fp32 would be 31.6 GB
    assert refused == ["31.59 GB in float32 on cuda (room for 20.00 GB)"]
    plan, refused = plan_bank(store, *n, cuda, "bf16", True, budgets={"cuda": 8 * GB, "cpu": 64 * GB})
    assert (plan.device, plan.dtype) == (cpu, torch.bfloat16) and len(refused) == 2  # bf16, then float16 on cuda
    plan, refused = plan_bank(store, *n, cpu, "fp32", True, budgets={"cpu": 12 * GB})
    assert plan is None and len(refused) == 2
    assert "float16 on cpu (room for 12.00 GB)" in refused[1]


def test_auto_precision_is_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    assert training_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: True)
    assert training_precision("auto", torch.device("cpu")) == "bf16"
    assert training_precision("fp32", torch.device("cpu")) == "fp32"


def test_tokens_that_do_not_fit_stream_or_are_refused(toy, monkeypatch, capsys):
    store = open_store(toy[1])
    members = {"density": TrainConfig(precision="fp32")}
    precision, plan = token_plan(store, 36, VIEWS, len(LAYERS), torch.device("cpu"), members["density"], members)
    assert precision == "fp32" and plan.normed and plan.dtype == torch.float32
    mixing = {"density": TrainConfig(precision="fp32", mixup=True)}
    assert not token_plan(store, 36, VIEWS, 2, torch.device("cpu"), mixing["density"], mixing)[1].normed
    ridge = {"ridge": TrainConfig(head="ridge", precision="bf16")}
    assert token_plan(store, 36, VIEWS, 2, torch.device("cpu"), ridge["ridge"], ridge)[0] == "fp32"
    monkeypatch.setattr(bank_module, "HOST_RAM_FRACTION", 0.0)
    assert token_plan(store, 36, VIEWS, 2, torch.device("cpu"), members["density"], members)[1] is None
    assert "do not fit" in capsys.readouterr().out  # auto: a note, then the store streams
    forced = TrainConfig(precision="fp32", preload=True)
    with pytest.raises(DataError, match=r"train\.zarr do not fit: .* GB in float32 on cpu \(room for 0\.00 GB\).*"
                                        r"biomass reduce"):
        token_plan(store, 36, VIEWS, 2, torch.device("cpu"), forced, {"density": forced})


def train(*args) -> None:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--no-plots"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_training_on_the_bank_gives_the_models_streaming_gives(toy, tmp_path):
    """The bank (tokens in RAM, the density head's LayerNorm applied once, batches gathered by index) against the
    tokens read from the store per sample, normalised by the head at every step: the same OOF predictions."""
    data, store = toy
    common = ["--cache", store, "--data", data, "--head", "density,mlp", "--folds", 3, "--epochs", 8,
              "--batch-size", 8, "--workers", 0, "--precision", "fp32"]
    train(*common, "--out", tmp_path / "bank", "--preload")
    train(*common, "--out", tmp_path / "stream", "--no-preload")
    config = {k: json.loads((tmp_path / k / "config.json").read_text()) for k in ("bank", "stream")}
    assert "LayerNorm applied once" not in config["bank"]["tokens"]  # mlp reads raw tokens: the bank stays raw
    assert config["stream"]["tokens"] == "streamed from the store"
    for name in ("oof_density.csv", "oof_mlp.csv"):
        a, b = (pd.read_csv(tmp_path / k / name) for k in ("bank", "stream"))
        np.testing.assert_allclose(a[list(TARGETS)], b[list(TARGETS)], rtol=1e-5, atol=1e-6)
    alone = tmp_path / "alone"  # the density head alone: its LayerNorm is applied once, in the bank
    train(*common[:5], "density", *common[6:], "--out", alone, "--preload")
    assert "LayerNorm applied once" in json.loads((alone / "config.json").read_text())["tokens"]
    a, b = pd.read_csv(alone / "oof_density.csv"), pd.read_csv(tmp_path / "stream" / "oof_density.csv")
    np.testing.assert_allclose(a[list(TARGETS)], b[list(TARGETS)], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_bf16_run_scores_like_fp32(toy, tmp_path):
    data, store = toy
    common = ["--cache", store, "--data", data, "--head", "density,mlp", "--folds", 3, "--epochs", 8,
              "--batch-size", 8, "--workers", 0]
    train(*common, "--out", tmp_path / "bf16", "--precision", "bf16")
    train(*common, "--out", tmp_path / "fp32", "--precision", "fp32")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["precision"] == "bf16" and "bfloat16" in config["tokens"]
    truth = read_long_csv(data / "train.csv", check_images=False)[list(TARGETS)].to_numpy(float)
    for name in ("oof_density.csv", "oof_mlp.csv"):
        r2 = [competition_r2(truth, pd.read_csv(tmp_path / k / name)[list(TARGETS)].to_numpy(float))
              for k in ("bf16", "fp32")]
        assert r2[1] > 0.3 and abs(r2[0] - r2[1]) < 0.02, (name, r2)
