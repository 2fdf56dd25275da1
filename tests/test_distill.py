"""`biomass distill`: targets blended towards the teacher's per fold, unlabelled photos, a student run folder."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from biomass_cache.cli import app
from biomass_cache.common.targets import TARGETS

TINY = dict(depth=2, embed_dim=64, num_heads=2)
STUDENT = ["--student", "vit_small_patch16_dinov3", "--size", "64x32", "--layers", "0,1", "--lora-blocks", "1",
           "--lora-rank", "2", "--epochs", "1", "--batch-size", "8", "--workers", "0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Synthetic data, a tiny random ViT's training cache, a 2-fold density run (the teacher), unlabelled photos."""
    from biomass_cache.extract.config import ExtractConfig
    from biomass_cache.extract.pipeline import extract
    from biomass_cache.synth.generate import generate
    from biomass_cache.train.config import resolve
    from biomass_cache.train.crossval import run_training

    root = tmp_path_factory.mktemp("distill")
    data = root / "data"
    generate(data, n_train=16, n_test=3, seed=0, size=(128, 64), progress=False)
    extract(ExtractConfig(data_dir=data, split="train", out=root / "train.zarr", backbone="vit_small_patch16_dinov3",
                          weights="random", size=(64, 32), layers=[0, 1], views=2, seed=0, device="cpu",
                          overrides=TINY), progress=False)
    cfg, heads = resolve({}, [], dict(folds=2, epochs=2, batch_size=8, device="cpu", workers=0, plots=False),
                         ["density"])
    run_training(root / "train.zarr", data, root / "teacher", cfg, heads)
    field = root / "field"
    shutil.copytree(data / "test", field)
    return root, data, root / "teacher", field


def labelled(root, data, run, field):
    from biomass_cache.common.data import read_training_table
    from biomass_cache.common.folds import read_folds
    from biomass_cache.submit.distill import labelling_folder
    from biomass_cache.submit.pseudo import predict_labels
    from biomass_cache.submit.spec import spec_from_options

    table = read_training_table(data / "train.csv")
    folds = read_folds(run / "folds.csv", table)
    rows = labelling_folder(data, table, [field], root / "work" / "distill-photos")
    labels = predict_labels(spec_from_options(None, str(run)), table, folds, root / "work" / "distill-photos",
                            root / "work", "cpu", None, None, progress=False)
    return table, folds, rows, labels


@pytest.mark.slow
def test_a_folds_targets_blend_the_labels_with_that_folds_teacher(teacher):
    from biomass_cache.submit.distill import training_part

    root, data, run, field = teacher
    table, folds, rows, labels = labelled(root, data, run, field)
    n, n_field = len(table), len(list(field.iterdir()))
    assert labels.mode == "per-fold" and len(rows) == n + n_field
    assert not np.allclose(labels.by_fold[0], labels.by_fold[1])  # two teachers, one per fold
    part = training_part(rows, labels, folds, n, alpha=0.25, weight=0.4, folder=root / "work" / "distill-photos")
    train_rows = np.flatnonzero(folds == 1)  # fold 0 left out: fold 0's teacher
    p = part(train_rows)
    got = p.table[list(TARGETS)].to_numpy(float)
    truth = table[list(TARGETS)].to_numpy(float)
    np.testing.assert_allclose(got[train_rows], 0.75 * truth[train_rows] + 0.25 * labels.by_fold[0][train_rows])
    np.testing.assert_allclose(got[n:], labels.by_fold[0][n:])  # unlabelled: the teacher's prediction
    assert p.rows.tolist() == train_rows.tolist() + list(range(n, n + n_field))
    assert p.weight.tolist() == [1.0] * len(train_rows) + [0.4] * n_field
    full = part(np.arange(n))  # --full: the mean of the folds' teachers
    np.testing.assert_allclose(full.table[list(TARGETS)].to_numpy(float)[n:], np.mean(labels.by_fold, axis=0)[n:])
    assert all((p.data / path).is_file() for path in p.table["image_path"])  # links resolve


@pytest.mark.slow
def test_distill_writes_a_student_run_beside_the_teachers_score(teacher):
    root, data, run, field = teacher
    out, config = root / "student", root / "student.toml"
    config.write_text("[lora]\noverrides = {depth = 2, embed_dim = 32, num_heads = 2}\n")
    r = CliRunner().invoke(app, ["distill", "--data", str(data), "--teacher", str(run), "--out", str(out),
                                 "--photos", str(field), "--work-dir", str(root / "work2"), "--no-plots",
                                 "--config", str(config), *STUDENT])
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    info = config["distill"]
    assert info["labels"] == "per-fold" and info["n_unlabelled"] == 3 and info["n_train"] == 16
    teacher_r2 = json.loads((run / "metrics.json").read_text())["competition_r2"]
    assert info["teacher_oof_competition_r2"] == pytest.approx(teacher_r2, abs=1e-9)
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(metrics["competition_r2"]) and metrics["distill"]["alpha"] == 0.5
    oof = pd.read_csv(out / "oof.csv", dtype={"image_id": str})
    assert len(oof) == 16  # the labelled images only
    assert pd.read_csv(out / "folds.csv")["fold"].tolist() == pd.read_csv(run / "folds.csv")["fold"].tolist()


@pytest.mark.parametrize("args, says", [
    (["--alpha", "2"], "--alpha must be in [0, 1]"),
    (["--teacher", "X", "--ensemble", "Y"], "exactly one of --ensemble"),
    (["--layers", "0,1"], "would never train"),  # the student's settings, before the teacher labels anything
])
def test_distill_refuses_bad_settings_in_one_line(tmp_path, args, says):
    base = ["distill", "--data", str(tmp_path), "--out", str(tmp_path / "s")]
    if "--teacher" not in args:
        base += ["--teacher", str(tmp_path)]
    r = CliRunner().invoke(app, base + args)
    assert r.exit_code == 2 and says in r.output, r.output


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_a_full_student_exports_and_predicts_as_its_checkpoint(teacher, tmp_path, finetune):
    """--full: one model on every image (the teacher's folds' mean as its targets); exported with its adapters merged
    (or its fine-tuned blocks), onnxruntime gives what `biomass predict` gives from the checkpoint."""
    pytest.importorskip("onnxruntime")
    root, data, run, field = teacher
    out, config = tmp_path / "student", tmp_path / "student.toml"
    config.write_text("[lora]\noverrides = {depth = 2, embed_dim = 32, num_heads = 2}\n")
    r = CliRunner().invoke(app, ["distill", "--data", str(data), "--teacher", str(run), "--out", str(out), "--full",
                                 "--work-dir", str(root / "work3"), "--no-plots", "--config", str(config), *STUDENT,
                                 "--finetune", finetune])
    assert r.exit_code == 0, r.output
    assert (out / "full").is_dir()
    member = out if finetune == "lora" else out / "full" / "density.json"  # a run folder, or its checkpoint
    made = CliRunner().invoke(app, ["export", "--members", str(member), "--out", str(tmp_path / "model")])
    assert made.exit_code == 0, made.output
    info = json.loads((tmp_path / "model" / "model.json").read_text())
    assert info["backbone"]["lora"]["merged"] == (finetune == "lora") and info["check"]["rel_rms_vs_pytorch"] <= 1e-4
    assert info["backbone"]["lora"]["finetune"] == finetune
    for args, csv in ((["--model", str(tmp_path / "model")], "onnx.csv"),
                      (["--members", str(out), "--work-dir", str(tmp_path / "work")], "torch.csv")):
        done = CliRunner().invoke(app, ["predict", str(field), *args, "--out", str(tmp_path / csv)])
        assert done.exit_code == 0, done.output
    a, b = pd.read_csv(tmp_path / "onnx.csv"), pd.read_csv(tmp_path / "torch.csv")
    cols = list(TARGETS)
    assert list(a["image_id"]) == list(b["image_id"])
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-3, atol=1e-3)
