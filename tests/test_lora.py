"""The LoRA path on a tiny random DINOv3 (depth 4, width 64) and 64x32 synthetic images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from biomass_cache.backbone.vit import create_backbone, forward_tokens
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.train.dataset import AuxSpec
from biomass_cache.lora.data import LiveDataset, build_prefix_cache, live_loader
from biomass_cache.lora import (LiveTokens, LoraSettings, adapter_state, base_identity, base_state, inject_lora,
                                load_checkpoint, make_trainable, predict_images, run_lora)
from biomass_cache.cli.lora import lora_command
from biomass_cache.train.runs import load_head
from biomass_cache.common.targets import TARGETS
from biomass_cache.train.loop import build_member, fit_zscore, train_step
from biomass_cache.train.config import TrainConfig

TINY = dict(depth=4, embed_dim=64, num_heads=2)
NAME = "vit_small_patch16_dinov3"
CPU = torch.device("cpu")


def settings(**kw) -> LoraSettings:
    return replace(LoraSettings(backbone=NAME, overrides=TINY, size=(64, 32), layers=[1, 3], blocks=2, rank=4), **kw)


def train_cfg(**kw) -> TrainConfig:
    return replace(TrainConfig(head="density", folds=2, epochs=1, batch_size=4, eval_batch_size=8, workers=0,
                               device="cpu"), **kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from biomass_cache.synth.generate import generate

    out = tmp_path_factory.mktemp("lora") / "data"
    generate(out, n_train=12, n_test=2, seed=0, size=(64, 32), progress=False)
    return out


@pytest.fixture(scope="module")
def run(data) -> Path:
    out = data.parent / "run"
    run_lora(data, out, train_cfg(), settings(), progress=False)
    return out


@pytest.mark.parametrize("name", [NAME, NAME + "_qkvb"])
def test_adapters_are_applied_and_only_they_train(name):
    bb = create_backbone(name, "random", overrides=TINY)
    x = torch.randn(2, 3, 32, 64)
    before, _ = forward_tokens(bb, x, [3], norm=True)
    assert inject_lora(bb, settings(backbone=name)) == ["blocks.2.attn.qkv", "blocks.3.attn.qkv"]
    assert all("lora_" in n for n, p in bb.model.named_parameters() if p.requires_grad)
    live = LiveTokens(bb, settings(backbone=name), CPU)
    assert torch.equal(live({"pixels": x})[:, 1], before[:, 0])  # B = 0 at init: output unchanged
    for n, p in adapter_state(bb.model).items():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    assert not torch.allclose(live({"pixels": x})[:, 1], before[:, 0], atol=0, rtol=1e-6)
    if name.endswith("_qkvb"):  # the trap: with F.linear on the raw weight the qkv adapter is bypassed
        for b in (2, 3):
            bb.model.blocks[b].attn.qkv_bias_separate = False
        assert torch.equal(live({"pixels": x})[:, 1], before[:, 0])


def test_split_forward_reproduces_timm():
    bb = create_backbone(NAME, "random", overrides=TINY)
    x = torch.randn(3, 3, 32, 64)
    ref, _ = forward_tokens(bb, x, [1, 2, 3], norm=False)
    names = inject_lora(bb, settings(targets=["attn.proj", "mlp.fc2"]))
    assert names == [f"blocks.{b}.{t}" for b in (2, 3) for t in ("attn.proj", "mlp.fc2")]  # not patch_embed.proj
    live = LiveTokens(bb, settings(layers=[1, 2, 3], norm=False), CPU)
    assert torch.equal(live({"pixels": x}), ref)
    assert torch.equal(live({"hidden": live.prefix_hidden(x)}), ref)  # blocks 2.. on the stored hidden state
    micro = LiveTokens(bb, settings(layers=[1, 2, 3], norm=False, micro_batch=2), CPU)
    assert torch.allclose(micro({"pixels": x}), ref, atol=1e-6)


def test_training_moves_adapters_and_never_the_base(data):
    table = read_long_csv(data / "train.csv")
    bb = create_backbone(NAME, "random", overrides=TINY)
    inject_lora(bb, settings())
    frozen = {k: v.clone() for k, v in base_state(bb.model).items()}
    start = {k: v.detach().clone() for k, v in adapter_state(bb.model).items()}
    live, batch, member = first_step_setup(bb, table, data, None)
    for _ in range(2):
        assert train_step(member, batch, live(batch)) is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_state(bb.model).values())
    assert any(not torch.equal(start[k], v) for k, v in adapter_state(bb.model).items())
    assert all(torch.equal(frozen[k], v) for k, v in base_state(bb.model).items())


def test_full_finetuning_trains_the_last_blocks_and_each_fold_starts_from_the_backbone(data, tmp_path):
    """--finetune full: every weight of the last --lora-blocks blocks trains, nothing else; reset(seed) for the next
    fold restores them; a checkpoint holds those blocks and reloads to the same tokens."""
    table = read_long_csv(data / "train.csv")
    bb = create_backbone(NAME, "random", overrides=TINY)
    s = settings(finetune="full", blocks=1, lr=1e-2)
    names = make_trainable(bb, s)
    assert names and all(n.startswith("blocks.3.") for n in names)
    assert {n for n, p in bb.model.named_parameters() if p.requires_grad} == set(names)
    assert len(names) == len([n for n, _ in bb.model.named_parameters() if n.startswith("blocks.3.")])
    frozen = {k: v.clone() for k, v in bb.model.state_dict().items() if not k.startswith("blocks.3.")}
    start = {k: v.detach().clone() for k, v in adapter_state(bb.model).items()}
    live, batch, member = first_step_setup(bb, table, data, None, s)
    assert train_step(member, batch, live(batch)) is not None
    moved = [k for k, v in adapter_state(bb.model).items() if not torch.equal(start[k], v)]
    assert "blocks.3.mlp.fc2.weight" in moved and "blocks.3.attn.qkv.weight" in moved
    assert all(torch.equal(frozen[k], v) for k, v in bb.model.state_dict().items() if k in frozen)
    live.reset(5)
    assert all(torch.equal(start[k], v) for k, v in adapter_state(bb.model).items())
    train_step(member, batch, live(batch))
    from biomass_cache.lora.checkpoint import save_checkpoint

    meta = {"head": member.head.config, "zscore": member.zscore.to_dict(), "layers": live.layers}
    save_checkpoint(tmp_path / "h.json", member.head, meta, live)
    head, again, _ = load_checkpoint(tmp_path / "h.json", "random", "cpu", "fp32")
    x = batch["pixels"][:2]
    with torch.no_grad():
        assert torch.equal(again({"pixels": x}), live.eval()({"pixels": x}))


def first_step_setup(bb, table, data, prefix, s=None):
    s = s or settings(lr=1e-2)
    live = LiveTokens(bb, s, CPU).train()
    rows = np.arange(8)
    aux = AuxSpec.fit(table, rows)
    ds = LiveDataset(table, rows, data, s, train=False, seed=1, aux=aux, prefix=prefix)
    batch = next(iter(live_loader(ds, 8, 0)))
    member = build_member("density", train_cfg(mixup=False), live.layers, {"channels": 64, "grid": [2, 4]},
                          fit_zscore(table, rows), aux, 10, seed=3, device=CPU, extra_groups=live.param_groups())
    return live, batch, member


def test_prefix_cache_matches_live_first_step(data):
    table = read_long_csv(data / "train.csv")
    bb = create_backbone(NAME, "random", overrides=TINY)
    inject_lora(bb, settings())
    s = settings(prefix_views=2)
    store = build_prefix_cache(data.parent / "prefix", table, data, LiveTokens(bb, s, CPU), progress=False)
    assert store.layers == [1] and store.n_prefix == 5 and store.done().all()
    build_prefix_cache(data.parent / "prefix", table, data, LiveTokens(bb, s, CPU), progress=False)  # resumes
    with pytest.raises(DataError, match="other settings"):
        build_prefix_cache(data.parent / "prefix", table, data, LiveTokens(bb, replace(s, prefix_views=3), CPU))
    losses = []
    for prefix in (None, store):
        live, batch, member = first_step_setup(bb, table, data, prefix, s)
        losses.append(train_step(member, batch, live(batch)))
        assert ("hidden" in batch) == (prefix is not None)
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)  # the cache stores float16


@pytest.mark.slow
def test_run_folder_checkpoint_and_reload(run, data):
    names = sorted(p.name for p in run.iterdir())
    assert names == ["config.json", "fold0", "fold1", "folds.csv", "history.csv", "metrics.json", "oof.csv",
                     "oof_density.csv", "plots"]
    # a LoRA run has no cached tokens for density maps: the other figures only
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["fold_scores.png", "learning_curves.png",
                                                                  "pred_vs_true.png"]
    file = run / "fold0" / "density.safetensors"
    tensors = load_file(file)
    assert all(k.startswith("head.") or (k.startswith("backbone.") and "lora_" in k) for k in tensors)
    assert sum(k.startswith("backbone.") for k in tensors) == 4  # A and B of blocks 2 and 3
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    assert payload < file.stat().st_size < payload + 16_384  # adapters + head, nothing frozen
    folds = pd.read_csv(run / "folds.csv", dtype={"image_id": str})
    table = read_long_csv(data / "train.csv")
    val = table[table["image_id"].isin(folds.loc[folds["fold"] == 0, "image_id"])]
    oof = pd.read_csv(run / "oof.csv", dtype={"image_id": str}).set_index("image_id").loc[val["image_id"]]
    again = predict_images(run / "fold0" / "density.json", data, val, split="train")
    np.testing.assert_allclose(again, oof[list(TARGETS)].to_numpy(), rtol=1e-5)


@pytest.mark.slow
def test_reload_refuses_another_base(run, tmp_path):
    files = []
    for seed in (0, 1):  # the run's random backbone (seed 0) saved as a weights file, and another one
        files.append(tmp_path / f"w{seed}.safetensors")
        save_file(create_backbone(NAME, "random", seed=seed, overrides=TINY).model.state_dict(), files[-1])
    with pytest.raises(DataError, match="trained on base"):
        load_checkpoint(run / "fold0" / "density.json", weights=str(files[0]))  # trained on "random", seed 0
    meta = json.loads((run / "fold0" / "density.json").read_text())
    meta["base"] = base_identity(create_backbone(NAME, str(files[0]), overrides=TINY))  # as if trained on file 0
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    shutil.copy(run / "fold0" / "density.safetensors", tmp_path / "ck.safetensors")
    head, live, _ = load_checkpoint(tmp_path / "ck.json", weights=str(files[0]))
    _, ref, _ = load_checkpoint(run / "fold0" / "density.json")
    assert all(torch.equal(a, b) for a, b in zip(adapter_state(live.model).values(), adapter_state(ref.model).values()))
    with pytest.raises(DataError, match="trained on base"):
        load_checkpoint(tmp_path / "ck.json", weights=str(files[1]))


@pytest.mark.slow
def test_a_lora_run_is_an_ensemble_member(run, data, tmp_path):
    from biomass_cache.submit.spec import spec_from_options
    from biomass_cache.common.errors import EnsembleError
    from biomass_cache.submit.ensemble import submit

    with pytest.raises(DataError, match="a LoRA checkpoint.*lora.load_checkpoint"):
        load_head(run / "fold0" / "density.json")
    result, sub = submit(spec_from_options(None, str(run)), data, tmp_path / "submission.csv", progress=False)
    test = read_long_csv(data / "test.csv")
    assert result.resolved[0].kind == "lora" and result.stores == [None] and len(sub) == 5 * len(test)
    folds = [predict_images(run / f"fold{k}" / "density.json", data, test, views=range(4))[:, :3] for k in (0, 1)]
    np.testing.assert_allclose(result.grams[:, :3], np.mean(folds, axis=0), rtol=1e-6)  # TTA and folds averaged
    with pytest.raises(EnsembleError, match="mc_dropout.*not LoRA"):
        submit(spec_from_options(None, str(run), aggregation="mc_dropout"), data, tmp_path / "s.csv", progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    config = json.loads((moved / "config.json").read_text())
    config["lora"]["weights"] = str(tmp_path / "gone.pth")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(EnsembleError, match=r"gone.pth for vit_small_patch16_dinov3 not found.*--weights"):
        submit(spec_from_options(None, str(moved)), data, tmp_path / "s.csv", progress=False)


DDP_ARGS = ["--full", "--epochs", "2", "--batch-size", "4", "--no-pcgrad", "--no-mixup", "--no-aux", "--device",
            "cpu", "--workers", "0", "--backbone", NAME, "--weights", "random", "--size", "64x32", "--layers",
            "1,3", "--lora-blocks", "2", "--lora-rank", "4", "--lora-lr", "1e-2", "--lr", "1e-2"]


@pytest.mark.slow
def test_ddp_matches_one_process(data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    config = tmp_path / "tiny.toml"
    config.write_text("[train]\nhead_kwargs = { dropout = 0.0 }\n"  # head dropout draws differ per process
                      "[lora]\noverrides = { depth = 4, embed_dim = 64, num_heads = 2 }\n")
    args = ["--data", str(data), "--config", str(config), *DDP_ARGS]
    app = typer.Typer(add_completion=False)
    app.command()(lora_command)  # one process, in this one (the effective batch of 4 in a single batch)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "one")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                    "-m", "biomass_cache", "lora", *args, "--out", str(tmp_path / "two")], check=True, env=env)
    one, two = (load_file(tmp_path / r / "full" / "density.safetensors") for r in ("one", "two"))
    assert one.keys() == two.keys()
    assert any(k.startswith("backbone.") and not torch.equal(v, torch.zeros_like(v)) for k, v in one.items())
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-3, atol=5e-5)  # without averaging: ~1e-3 off


def test_precision_of_the_live_backbone():
    bb = create_backbone(NAME, seed=0, overrides=TINY)
    inject_lora(bb, settings())
    x = {"pixels": torch.randn(2, 3, 32, 64)}
    with torch.no_grad():
        fp32 = LiveTokens(bb, settings(), CPU)(x)  # auto on the CPU
        fp16 = LiveTokens(bb, settings(precision="fp16"), CPU)(x)
        off = LiveTokens(bb, settings(precision="fp16", amp=False), CPU)(x)
    assert fp16.dtype == torch.float32 and not torch.equal(fp16, fp32) and torch.allclose(fp16, fp32, atol=0.05)
    assert torch.equal(off, fp32)  # --no-amp computes in fp32 whatever the precision
    with pytest.raises(ValueError, match="precision must be one of"):
        settings(precision="half")
