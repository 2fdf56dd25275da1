"""Feature distillation (lora/features.py): the teacher's views at the student's size, its standardised tokens on
the common grid, the loss by hand, and a student run that records it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from biomass_cache.backbone.views import ViewPolicy, load_photo, make_view
from biomass_cache.cli import app
from biomass_cache.common.data import read_training_table
from biomass_cache.common.errors import DataError
from biomass_cache.lora import LoraSettings
from biomass_cache.lora.data import LiveDataset
from biomass_cache.lora.features import FeatureMatch, pool_grid, teacher_tokens
from biomass_cache.store.layout import open_store
from biomass_cache.train.dataset import AuxSpec
from test_distill import STUDENT, teacher  # noqa: F401  (the module fixture: data, a 2-view cache, a teacher run)


def test_pool_grid_averages_each_cell():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 4 * 6, 2)  # (1, 4x6 grid, 2 channels)
    got = pool_grid(x, (4, 6), (2, 3))
    grid = x.reshape(4, 6, 2)
    want = grid.reshape(2, 2, 3, 2, 2).mean(dim=(1, 3)).reshape(1, 6, 2)
    assert torch.equal(got, want) and pool_grid(x, (4, 6), (4, 6)) is x


def test_a_view_is_the_same_picture_at_another_size_of_the_same_aspect(tmp_path):
    """What matching the teacher's view k at the student's size rests on: view k at 64x32 is view k at 128x64
    shrunk (crop, flips, affine drawn independently of the size), far closer than another view."""
    from biomass_cache.synth.generate import generate

    generate(tmp_path, n_train=2, n_test=1, seed=0, size=(256, 128), progress=False)
    path = sorted((tmp_path / "train").iterdir())[0]
    policy = replace(ViewPolicy(), p_noise=0.0, p_blur=0.0)  # per-pixel randomness has no size-free meaning
    small, large = (load_photo(path, s, policy) for s in ((64, 32), (128, 64)))
    view = {(v, s): make_view(img, "a", v, 3, s, policy) for v in (1, 2, 3) for s, img in
            (((64, 32), small), ((128, 64), large))}
    shrink = {v: torch.nn.functional.avg_pool2d(view[(v, (128, 64))][None], 2)[0] for v in (1, 2, 3)}
    same = [float((view[(v, (64, 32))] - shrink[v]).abs().mean()) for v in (1, 2, 3)]
    other = [float((view[(v, (64, 32))] - shrink[w]).abs().mean()) for v, w in ((1, 2), (2, 3), (3, 1))]
    assert max(same) < 0.5 * min(other), (same, other)


def test_the_loss_by_hand_and_masked_samples_do_not_count():
    match = FeatureMatch(n_layers=1, channels=2, teacher_channels=1, grid=(2, 2), to=(1, 1), weight=0.5)
    with torch.no_grad():
        match.proj[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        match.proj[0].bias.fill_(0.25)
    tokens = torch.tensor([[[[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]]],  # mean (2, 1): projected 1.25
                           [[[9.0, 9.0]] * 4]])
    target = torch.tensor([[[[0.25]]], [[[100.0]]]])
    loss = match(tokens, target, torch.tensor([True, False]))
    assert loss.item() == pytest.approx(0.5 * (1.25 - 0.25) ** 2)
    match.reset(3)
    first = match.proj[0].weight.clone()
    match.reset(3)
    assert torch.equal(first, match.proj[0].weight)  # a fold's projection is a function of its seed


@pytest.mark.slow
def test_training_samples_are_the_teachers_views_with_its_tokens(teacher):  # noqa: F811
    root, data, run, field = teacher
    store = open_store(root / "train.zarr")
    table = read_training_table(data / "train.csv")
    ids = list(table["image_id"])
    t = teacher_tokens(root / "train.zarr", ids, (64, 32), (2, 4), 2)
    assert t.grid == (2, 4) and t.n_views == 2 and t.channels == store.channels and len(t.rows) == len(ids)
    s = LoraSettings(size=(64, 32))
    extra = table.iloc[:1].assign(image_id="stranger")  # a photo the store does not hold
    both = pd.concat([table.iloc[:3], extra], ignore_index=True)
    ds = LiveDataset(both, np.arange(4), data, s, train=True, seed=1, aux=AuxSpec.fit(table, np.arange(3)),
                     teacher=t)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for k in range(4):
            item, view = ds[k], ds.view_of(k)
            assert 0 <= view < 2
            photo = load_photo(data / both["image_path"][k], (64, 32), t.policy)
            assert torch.equal(item["pixels"], make_view(photo, both["image_id"][k], view, t.view_seed, (64, 32),
                                                         t.policy))
            if k < 3:
                raw = store.read(t.rows[ids[k]], view)
                want = (raw - t.mean[:, None]) / t.std[:, None]
                np.testing.assert_allclose(item["teacher"].numpy(), want, rtol=1e-5, atol=1e-5)
                assert bool(item["teacher_has"])
            else:
                assert not bool(item["teacher_has"]) and not item["teacher"].any()
    with pytest.raises(DataError, match="same aspect ratio"):
        teacher_tokens(root / "train.zarr", ids, (64, 64), (4, 4), 2)
    with pytest.raises(DataError, match="each student layer matches"):
        teacher_tokens(root / "train.zarr", ids, (64, 32), (2, 4), 3)


@pytest.mark.slow
def test_the_feature_loss_reaches_the_student_and_falls(teacher):  # noqa: F811
    """Training steps with the side loss: its gradient reaches the fine-tuned blocks, and it falls."""
    from biomass_cache.backbone.vit import create_backbone
    from biomass_cache.lora import LiveTokens, adapter_state, make_trainable
    from biomass_cache.lora.data import live_loader
    from biomass_cache.train.dataset import LABEL_KEYS
    from biomass_cache.train.loop import build_member, fit_zscore, train_step

    root, data, run, field = teacher
    table = read_training_table(data / "train.csv")
    s = LoraSettings(overrides=dict(depth=2, embed_dim=32, num_heads=2), size=(64, 32), layers=[0, 1], blocks=1,
                     finetune="full", lr=3e-3)
    bb = create_backbone(s.backbone, "random", overrides=s.overrides)
    make_trainable(bb, s)
    t = teacher_tokens(root / "train.zarr", list(table["image_id"]), s.size, (2, 4), 2)
    live = LiveTokens(bb, s, torch.device("cpu"))
    live.match = FeatureMatch(2, 32, t.channels, (2, 4), t.grid, 1.0)
    live.reset(0)
    rows = np.arange(8)
    aux = AuxSpec.fit(table, rows)
    batch = next(iter(live_loader(LiveDataset(table, rows, data, s, train=True, seed=0, aux=aux, teacher=t), 8, 0)))
    from biomass_cache.train.config import TrainConfig

    member = build_member("density", TrainConfig(head="density", mixup=False), live.layers,
                          {"channels": 32, "grid": [2, 4]}, fit_zscore(table, rows), aux, 40, seed=0,
                          device=torch.device("cpu"), extra_groups=live.param_groups())
    labels = {k: v for k, v in batch.items() if k in LABEL_KEYS}
    side = live.side_loss(batch, live(batch))
    grads = torch.autograd.grad(side, list(adapter_state(bb.model).values()), allow_unused=True)
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    seen = []
    for _ in range(30):
        tokens = live(batch)
        side = live.side_loss(batch, tokens)
        seen.append(side.item())
        assert train_step(member, labels, tokens, side=side) is not None
    assert seen[-1] < 0.7 * seen[0], seen


@pytest.mark.slow
def test_a_student_run_records_the_teachers_tokens(teacher, tmp_path):  # noqa: F811
    root, data, run, field = teacher
    config = tmp_path / "student.toml"
    config.write_text("[lora]\noverrides = {depth = 2, embed_dim = 32, num_heads = 2}\n")
    r = CliRunner().invoke(app, ["distill", "--data", str(data), "--teacher", str(run), "--out", str(tmp_path / "s"),
                                 "--work-dir", str(tmp_path / "work"), "--no-plots", "--config", str(config),
                                 "--features", "2", "--finetune", "full", *STUDENT])
    assert r.exit_code == 0, r.output
    features = json.loads((tmp_path / "s" / "config.json").read_text())["features"]
    assert features["weight"] == 2 and features["images"] == 16 and features["grid"] == [2, 4]
    assert features["store"] == str(root / "train.zarr")
    assert np.isfinite(json.loads((tmp_path / "s" / "metrics.json").read_text())["competition_r2"])
    for store, says in ((tmp_path, "not a token store"), (root / "teacher", "not a token store")):
        lone = CliRunner().invoke(app, ["distill", "--data", str(data), "--teacher", str(run), "--out",
                                        str(tmp_path / "t"), "--features", "1", "--teacher-tokens", str(store),
                                        "--config", str(config), *STUDENT])
        assert lone.exit_code == 2 and says in lone.output.strip().splitlines()[-1], lone.output
        assert not (tmp_path / "t").exists()


def test_features_with_a_prefix_cache_is_refused_before_the_teacher_labels(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[lora]\nprefix_cache = "prefix.zarr"\n')
    r = CliRunner().invoke(app, ["distill", "--data", str(tmp_path), "--teacher", str(tmp_path), "--out",
                                 str(tmp_path / "s"), "--features", "1", "--config", str(config)])
    assert r.exit_code == 2 and "remove [lora] prefix_cache" in r.output.strip().splitlines()[-1], r.output
    assert not (tmp_path / "distill-photos").exists()
