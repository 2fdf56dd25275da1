"""Stage two end to end on a tiny signal-carrying token store: run folder, scores, reload, sweep, ablations, guards."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from biomass_cache.train import runs
from biomass_cache.train import loop as train_module
from biomass_cache.cli.train import train_command
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.common.folds import visit_groups
from biomass_cache.train.inference import predict_store
from biomass_cache.common.metrics import competition_r2, log_r2
from biomass_cache.store.layout import open_store
from biomass_cache.common.targets import TARGETS, to_density
from biomass_cache.train.config import TrainConfig, load_config, resolve
from toys import ROOT, make_toy

FAST = ["--batch-size", "8", "--workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train(*args: str) -> None:
    """`biomass train ARGS --no-plots` (the toy data has no photos for the density-map figure)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--no-plots"]], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("train")
    data, store = make_toy(root, n=36)
    return root, data, store


@pytest.fixture(scope="module")
def sweep_run(toy) -> Path:
    """One pass training two heads side by side on the same batches, 3 grouped folds."""
    root, data, store = toy
    out = root / "run"
    train("--cache", store, "--data", data, "--out", out, "--head", "density,mlp", "--folds", 3, "--epochs", 16,
          "--lr", 3e-3, *FAST)
    return out


@pytest.mark.slow
def test_run_folder_is_complete_and_scores_agree(sweep_run, toy):
    _, data, store = toy
    table = read_long_csv(data / "train.csv", check_images=False)
    for name in ["config.json", "folds.csv", "oof.csv", "oof_density.csv", "oof_mlp.csv", "metrics.json",
                 "history.csv"] + [f"fold{k}/{h}.{ext}" for k in range(3) for h in ("density", "mlp")
                                   for ext in ("json", "safetensors")]:
        assert (sweep_run / name).is_file(), name
    assert not list(sweep_run.rglob(".*tmp*"))  # no temporary files left behind
    metrics = json.loads((sweep_run / "metrics.json").read_text())
    oof = runs.read_oof(sweep_run / "oof.csv")
    assert list(oof["image_id"]) == list(table["image_id"])
    truth, pred = table[list(TARGETS)].to_numpy(float), oof[list(TARGETS)].to_numpy(float)
    assert metrics["competition_r2"] == pytest.approx(competition_r2(truth, pred), abs=1e-12)
    assert metrics["log_r2"] == pytest.approx(log_r2(truth, pred), abs=1e-12)
    assert set(metrics["per_target_r2"]) == set(TARGETS) and set(metrics["folds"]) == {"fold0", "fold1", "fold2"}
    np.testing.assert_allclose(pred[:, 3], pred[:, 0] + pred[:, 2], rtol=1e-9)  # GDM = clover + green
    np.testing.assert_allclose(pred[:, 4], pred[:, :3].sum(1), rtol=1e-9)  # Total = clover + dead + green
    history = pd.read_csv(sweep_run / "history.csv")
    validated = history.dropna(subset=["val_competition_r2"])
    assert len(history) == 3 * 16 * 2 and sorted(set(validated["epoch"])) == [5, 10, 15, 16]  # eval_every 5, the last
    config = json.loads((sweep_run / "config.json").read_text())
    assert config["train"]["folds"] == 3 and config["cache"]["fingerprint"] == open_store(store).fingerprint


@pytest.mark.slow
def test_heads_learn_the_signal_and_the_sweep_is_ranked(sweep_run, toy):
    metrics = json.loads((sweep_run / "metrics.json").read_text())
    pooled = {h: metrics["heads"][h]["competition_r2"] for h in ("density", "mlp")}
    assert metrics["ranking"] == sorted(pooled, key=lambda h: -pooled[h]) and metrics["best"] == metrics["ranking"][0]
    assert metrics["competition_r2"] == pooled[metrics["best"]]
    pd.testing.assert_frame_equal(runs.read_oof(sweep_run / "oof.csv"),
                                  runs.read_oof(sweep_run / f"oof_{metrics['best']}.csv"))
    assert pooled["density"] > 0.5, pooled


@pytest.mark.slow
def test_folds_respect_groups(sweep_run, toy):
    _, data, _ = toy
    table = read_long_csv(data / "train.csv", check_images=False)
    folds = pd.read_csv(sweep_run / "folds.csv", dtype={"image_id": str})
    assert list(folds["image_id"]) == list(table["image_id"])
    per_group = folds.assign(group=visit_groups(table).to_numpy()).groupby("group")["fold"].nunique()
    assert (per_group == 1).all() and sorted(folds["fold"].unique()) == [0, 1, 2]


@pytest.mark.slow
def test_checkpoints_reload_and_reproduce_oof(sweep_run, toy):
    _, data, store_path = toy
    store = open_store(store_path)
    table = read_long_csv(data / "train.csv", check_images=False)
    folds = pd.read_csv(sweep_run / "folds.csv", dtype={"image_id": str})["fold"].to_numpy()
    oof = runs.read_oof(sweep_run / "oof_density.csv")[list(TARGETS)].to_numpy()
    for k in range(3):
        head, meta = runs.load_head(sweep_run / f"fold{k}" / "density.json")
        rows = np.flatnonzero(folds == k)
        idx = [store.image_ids.index(i) for i in table["image_id"].iloc[rows]]
        pred = predict_store(head, meta, store, idx, views="all", batch_size=meta["train"]["eval_batch_size"]).grams
        np.testing.assert_array_equal(pred, oof[rows])
        assert meta["layers"] == store.layers and meta["zscore"]["names"][:5] == list(TARGETS)


@pytest.mark.slow
def test_a_head_refuses_another_cache(sweep_run, tmp_path):
    _, other = make_toy(tmp_path, n=6, seed=1)  # same shapes, other extraction fingerprint
    head, meta = runs.load_head(sweep_run / "fold0" / "density.json")
    with pytest.raises(DataError, match="another configuration.*seed: 0 -> 1"):
        predict_store(head, meta, open_store(other))
    bad = dict(meta, head=dict(meta["head"], channels=8))
    with pytest.raises(DataError, match="channels 8"):
        runs.check_compatible(bad, open_store(other))
    test_cache = dict(meta, fingerprint=dict(meta["fingerprint"], split="test", n_views=4))
    runs.check_compatible(test_cache, open_store(sweep_run.parent / "train.zarr"))  # TTA cache of the same setup


@pytest.mark.slow
def test_folds_csv_reused_and_ablations_run(sweep_run, toy, tmp_path):
    """Every ablation switch in one sweep (config file) and all CLI switches at once, on the sweep's folds."""
    _, data, store = toy
    cfg = tmp_path / "ablate.toml"
    cfg.write_text("[train]\nepochs = 1\n" + "".join(
        f'[[train.sweep]]\nname = "no_{k}"\nhead = "density"\n{k} = false\n'
        for k in ("mixup", "uw", "pcgrad", "ema", "aux")))
    out = tmp_path / "ablate"
    train("--cache", store, "--data", data, "--out", out, "--config", cfg, "--folds-csv",
          sweep_run / "folds.csv", *FAST)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heads"]) == {"no_mixup", "no_uw", "no_pcgrad", "no_ema", "no_aux"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "folds.csv"), pd.read_csv(sweep_run / "folds.csv"))
    _, meta = runs.load_head(out / "fold0" / "no_aux.json")
    assert not any(meta["head"]["aux"].values()) and meta["train"]["aux"] is False
    out2 = tmp_path / "all_off"
    train("--cache", store, "--data", data, "--out", out2, "--epochs", 1, "--folds", 3, "--no-mixup", "--no-uw",
          "--no-pcgrad", "--no-ema", "--no-aux", *FAST)
    members = json.loads((out2 / "config.json").read_text())["members"]
    assert {k: members["density"][k] for k in ("mixup", "uw", "pcgrad", "ema", "aux")} == dict.fromkeys(
        ("mixup", "uw", "pcgrad", "ema", "aux"), False)
    out3 = tmp_path / "reference_on"  # the reference recipe's switches, off by default, turned on from the CLI
    train("--cache", store, "--data", data, "--out", out3, "--epochs", 1, "--folds", 3, "--mixup", "--uw", "--aux",
          *FAST)
    members = json.loads((out3 / "config.json").read_text())["members"]
    assert {k: members["density"][k] for k in ("mixup", "uw", "pcgrad", "ema", "aux")} == dict.fromkeys(
        ("mixup", "uw", "pcgrad", "ema", "aux"), True)


@pytest.mark.slow
def test_members_with_their_own_layers_and_two_closed_form_members(toy, tmp_path):
    """A member reading one of the layers trains and validates on it; two ridge members each fit on every view
    (the views' loader is iterated once per member); repeated layers are refused."""
    _, data, store = toy
    cfg = tmp_path / "sweep.toml"
    cfg.write_text('[train]\nepochs = 1\n[[train.sweep]]\nname = "only7"\nhead = "density"\nlayers = [7]\n'
                   '[[train.sweep]]\nname = "both"\nhead = "density"\n'
                   '[[train.sweep]]\nname = "r1"\nhead = "ridge"\n[[train.sweep]]\nname = "r2"\nhead = "ridge"\n')
    train("--cache", store, "--data", data, "--out", tmp_path / "run", "--config", cfg, "--folds", 2, *FAST)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["heads"]) == {"only7", "both", "r1", "r2"}
    assert metrics["heads"]["r1"]["competition_r2"] == pytest.approx(metrics["heads"]["r2"]["competition_r2"])
    cfg.write_text("[train]\nlayers = [3, 3]\n")
    with pytest.raises(DataError, match="distinct block indices"):
        load_config(cfg)


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    data, store = make_toy(tmp_path / "a", n=12)
    calls, poisoned = [], {2, 5}

    def flaky(out, batch, zscore, **kw):
        calls.append(1)
        losses = train_module_task_losses(out, batch, zscore, **kw)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) in poisoned else losses

    train_module_task_losses = train_module.task_losses
    monkeypatch.setattr(train_module, "task_losses", flaky)
    out = tmp_path / "full"
    train("--cache", store, "--data", data, "--out", out, "--full", "--epochs", 2, "--batch-size", 4, "--workers", 0)
    assert len(calls) == 6 and pd.read_csv(out / "history.csv")["skipped_steps"].iloc[-1] == 2
    head, meta = runs.load_head(out / "full" / "density.json")
    assert all(torch.isfinite(p).all() for p in head.parameters()) and meta["skipped_steps"] == 2

    poisoned = set(range(100))
    with pytest.raises(FloatingPointError, match="head density: 3 non-finite losses in a row"):
        train("--cache", store, "--data", data, "--out", tmp_path / "strict", "--full", "--epochs", 2,
              "--batch-size", 4, "--config", _toml(tmp_path, "max_nonfinite = 3"), "--workers", 0)


@pytest.mark.slow
def test_interval_bins_run_reloads_and_reproduces_oof(toy, tmp_path):
    """`--interval-bins 4` (with blend, mixup, UW, PCGrad from the config): a normal run folder whose rebuilt
    checkpoints carry the fold's bins and predict exactly the OOF values the in-memory heads gave."""
    _, data, store_path = toy
    out = tmp_path / "interval"
    cfg = _toml(tmp_path, "interval_blend = 0.3\ninterval_weight = 0.5\nmixup = true\nuw = true\naux = true")
    train("--cache", store_path, "--data", data, "--out", out, "--head", "density,mlp", "--folds", 2, "--epochs", 3,
          "--interval-bins", 4, "--config", cfg, *FAST)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["heads"]) == {"density", "mlp"} and metrics["competition_r2"] is not None
    members = json.loads((out / "config.json").read_text())["members"]
    assert {(m["interval_bins"], m["interval_blend"], m["interval_weight"]) for m in members.values()} == {(4, 0.3, 0.5)}
    store = open_store(store_path)
    table = read_long_csv(data / "train.csv", check_images=False)
    folds = pd.read_csv(out / "folds.csv", dtype={"image_id": str})["fold"].to_numpy()
    for name in ("density", "mlp"):
        oof = runs.read_oof(out / f"oof_{name}.csv")[list(TARGETS)].to_numpy()
        for k in range(2):
            head, meta = runs.load_head(out / f"fold{k}" / f"{name}.json")
            assert meta["head"]["interval"] == {"bins": 4, "blend": 0.3}
            train_density = to_density(table[list(TARGETS)].to_numpy(float)[folds != k])
            np.testing.assert_allclose(head.interval_head.edges[4].numpy(),
                                       np.quantile(train_density[:, 4], [0.25, 0.5, 0.75]), rtol=1e-5)
            rows = np.flatnonzero(folds == k)
            idx = [store.image_ids.index(i) for i in table["image_id"].iloc[rows]]
            pred = predict_store(head, meta, store, idx, views="all", batch_size=meta["train"]["eval_batch_size"]).grams
            np.testing.assert_array_equal(pred, oof[rows])
    with pytest.raises(DataError, match=r"interval_bins must be 0 \(off\) or an integer >= 2, got 1 \(--interval-bins"):
        resolve({}, [], {"interval_bins": 1}, None)
    with pytest.raises(DataError, match=r"interval_blend must be a number in \[0, 1\], got 1.5"):
        resolve({"interval_blend": 1.5}, [], {}, None)


def _toml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text("[train]\n" + body + "\n")
    return path


def test_config_resolution(tmp_path):
    base, sweep, extract = load_config(ROOT / "configs" / "cpu_demo.toml")
    assert TrainConfig(**base) == TrainConfig()  # the documented defaults are the code's defaults
    assert extract["backbone"] == "vit_small_patch16_dinov3"
    ref, _, ref_extract = load_config(ROOT / "configs" / "reference_vit7b.toml")
    assert ref["head"] == "vitdet" and ref_extract["backbone"] == "vit_7b_patch16_dinov3"
    cfg, members = resolve(base, [{"name": "a", "head": "mlp", "lr": 1e-4}], {"epochs": 3, "uw": False}, None)
    assert cfg.epochs == 3 and members["a"].lr == 1e-4 and members["a"].uw is False
    _, members = resolve(base, [{"name": "a"}], {}, ["density", "mlp"])
    assert list(members) == ["density", "mlp"] and members["mlp"].head == "mlp"
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepoch = 3\n")
    with pytest.raises(DataError, match=r"unknown key\(s\) \['epoch'\]"):
        load_config(bad)
    bad.write_text('[train]\n[[train.sweep]]\nname = "x"\nepochs = 3\n')
    with pytest.raises(DataError, match="sweep.*epochs"):
        load_config(bad)
    assert asdict(TrainConfig())["tta"] == "all"


def test_fold_scores_survive_a_target_without_variance():
    rng = np.random.default_rng(0)
    truth = rng.gamma(2.0, 10.0, size=(8, 5))
    truth[:, 1] = 0.0  # e.g. a fold of WA images only: no dead matter
    pred = truth + rng.normal(0, 1, size=truth.shape)
    with pytest.raises(ValueError, match="no variance"):
        log_r2(truth, pred)
    s = train_module.scores(truth, pred, baseline_grams=np.full(5, 20.0))
    assert s["per_target_r2"]["Dry_Dead_g"] is None and np.isfinite(s["log_r2"])
    assert s["competition_r2"] == pytest.approx(competition_r2(truth, pred))
    json.dumps(s, allow_nan=False)


@pytest.mark.slow
def test_a_collapsed_fold_is_reported_and_recorded(toy, tmp_path, monkeypatch):
    """A fold model predicting one value for every image is named loudly and listed in metrics.json."""
    from biomass_cache.heads.common import FusedHead

    _, data, store = toy
    monkeypatch.setattr(FusedHead, "total_ratio_to_components",
                        lambda self, raw: raw[..., 1:] * 0.0 + self.components_mean())  # a dead readout
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    result = CliRunner().invoke(app, [str(a) for a in ["--cache", store, "--data", data, "--out", tmp_path / "run",
                                                       "--head", "density,mlp", "--folds", 2, "--epochs", 1,
                                                       "--no-plots", *FAST]], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "WARNING: head mlp fold1 predicts a CONSTANT for Dry_Clover_g, Dry_Dead_g" in result.output
    assert "WARNING: head density" not in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["heads"]["density"]["collapsed"] == []
    assert metrics["heads"]["mlp"]["collapsed"] == [{"fold": f"fold{k}", "targets": list(TARGETS)} for k in range(2)]


@pytest.mark.slow
def test_every_registered_head_learns_at_its_defaults(toy, tmp_path):
    """Each head in heads.HEADS, with nothing but its defaults, beats the training-mean predictor pooled and in
    every fold, and no fold predicts a constant."""
    import biomass_cache.heads as heads

    _, data, store = toy
    epochs = {"vitdet": 5}  # a step of vitdet at its defaults costs 20 of the others' here; it learns in 5 epochs
    runs = {e: [h for h in heads.HEADS if epochs.get(h, 10) == e] for e in sorted({epochs.get(h, 10) for h in
                                                                                   heads.HEADS})}
    metrics = {}
    for e, names in runs.items():  # the same seed: the same folds
        out = tmp_path / f"e{e}"
        train("--cache", store, "--data", data, "--out", out, "--head", ",".join(names), "--folds", 3,
              "--epochs", e, *FAST)
        metrics |= json.loads((out / "metrics.json").read_text())["heads"]
    table = read_long_csv(data / "train.csv", check_images=False)
    truth = table[list(TARGETS)].to_numpy(float)
    folds = pd.read_csv(out / "folds.csv", dtype={"image_id": str})["fold"].to_numpy()
    mean_pred = np.empty_like(truth)
    for k in range(3):
        mean_pred[folds == k] = truth[folds != k].mean(axis=0)  # the fold's training mean
    for name in heads.HEADS:
        m = metrics[name]
        assert m["collapsed"] == [], (name, m["collapsed"])
        assert m["competition_r2"] > competition_r2(truth, mean_pred) + 0.15, (name, m["competition_r2"])
        for k in range(3):
            rows = folds == k
            fold_r2 = m["folds"][f"fold{k}"]["competition_r2"]
            assert fold_r2 > competition_r2(truth[rows], mean_pred[rows]) + 0.05, (name, k, fold_r2)


@pytest.mark.slow  # two 3-fold runs of 16 epochs
def test_eval_every_changes_what_is_validated_not_what_is_trained(sweep_run, toy, tmp_path):
    """Validation only reads the (EMA) weights: validating every 5th epoch (the default; and the last) gives the same
    OOF predictions and checkpoints as every epoch, with validation columns on epochs 5, 10, 15, 16 only."""
    root, data, store = toy
    out = tmp_path / "dense"
    train("--cache", store, "--data", data, "--out", out, "--head", "density,mlp", "--folds", 3, "--epochs", 16,
          "--lr", 3e-3, "--eval-every", 1, *FAST)
    for name in ("oof_density.csv", "oof_mlp.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(sweep_run / name))
    for fold in ("fold0", "fold1", "fold2"):
        assert (out / fold / "mlp.safetensors").read_bytes() == (sweep_run / fold / "mlp.safetensors").read_bytes()
    sparse, full = pd.read_csv(sweep_run / "history.csv"), pd.read_csv(out / "history.csv")
    assert sorted(set(sparse.dropna(subset=["val_competition_r2"])["epoch"])) == [5, 10, 15, 16]
    assert full["val_competition_r2"].notna().all() and len(sparse) == len(full)
    validated = sparse["val_competition_r2"].notna().to_numpy()
    np.testing.assert_allclose(sparse["val_competition_r2"][validated], full["val_competition_r2"][validated])
    np.testing.assert_allclose(sparse["train_loss"], full["train_loss"])


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_replacing_run_that_stops_puts_the_earlier_run_back(tmp_path, stop):
    """Even after it saved fold models: a finished run is worth more than a partial one that replaced it."""
    out = tmp_path / "run"
    (out / "fold0").mkdir(parents=True)
    for name, text in (("config.json", "old"), ("metrics.json", "{}"), ("folds.csv", "image_id,fold\n"),
                       ("fold0/density.json", "old model")):
        (out / name).write_text(text)
    earlier = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(stop), runs.claim_run_dir(out, overwrite=True):
        assert not (out / "metrics.json").exists() and (out / "folds.csv").is_file()
        (out / "fold0").mkdir()
        (out / "fold0" / "density.json").write_text("new model")
        (out / "folds.csv").write_text("image_id,fold\nrewritten,0\n")
        raise stop()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
    assert not list(tmp_path.glob(".*"))


@pytest.mark.slow
def test_plots_that_cannot_be_drawn_leave_the_finished_run(toy, tmp_path):
    """The toy data has no photos for the density maps: a warning, and the run is kept (it was discarded)."""
    _, data, store = toy
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train_command)
    result = CliRunner().invoke(app, [str(a) for a in ("--cache", store, "--data", data, "--out", tmp_path / "run",
                                                       "--epochs", 1, "--folds", 2, *FAST)])
    assert result.exit_code == 0, result.output
    assert "warning: the plots were not drawn" in result.output and "image file not found" in result.output
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "oof.csv").is_file()
