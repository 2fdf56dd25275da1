"""Run plots: every figure is written as a valid PNG; a missing input is an error naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biomass_cache.train.crossval import run_training
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.train.plots import plot_run
from biomass_cache.store.layout import open_store
from biomass_cache.train.config import resolve
from toys import make_toy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["learning_curves.png", "pred_vs_true.png", "fold_scores.png", "density_maps.png"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 2-fold, 2-epoch density + mlp run on the toy store, with a photo per image for the density maps."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plots")
    data, store = make_toy(root, n=24)
    table = read_long_csv(data / "train.csv", check_images=False)
    (data / "train").mkdir()
    rng = np.random.default_rng(0)
    for path in table["image_path"]:
        Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(data / path)
    cfg, members = resolve({}, [], dict(folds=2, epochs=2, batch_size=8, workers=0, device="cpu",
                                        head_kwargs={"hidden": 16}), ["density", "mlp"])
    run_training(store, data, root / "run", cfg, members)
    torch.set_num_threads(before)
    return root / "run", data, store


@pytest.mark.slow
def test_every_figure_is_a_valid_png(run):
    run_dir, data, store = run
    paths = plot_run(run_dir, data, store=open_store(store))
    assert [p.name for p in paths] == FIGURES
    for p in paths:
        assert p.parent == run_dir / "plots" and p.read_bytes()[:8] == PNG_MAGIC
        with Image.open(p) as im:
            im.verify()
            assert min(im.size) > 200, (p.name, im.size)
    assert not list((run_dir / "plots").glob(".*tmp*"))  # atomic writes leave nothing behind


@pytest.mark.slow
def test_store_defaults_to_the_cache_in_config(run):
    run_dir, data, _ = run
    assert [p.name for p in plot_run(run_dir, data)] == FIGURES


@pytest.mark.slow
@pytest.mark.parametrize("name", ["metrics.json", "history.csv", "oof.csv", "folds.csv"])
def test_missing_input_is_a_clear_error(run, tmp_path, name):
    run_dir, data, store = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / name).unlink()
    with pytest.raises(DataError, match=rf"{name}: missing"):
        plot_run(copy, data, store=open_store(store))


@pytest.mark.slow
def test_missing_photo_is_a_clear_error(run, tmp_path):
    run_dir, data, store = run
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    shutil.rmtree(copy / "train")
    with pytest.raises(DataError, match=r"image file not found"):
        plot_run(run_dir, copy, store=open_store(store))


def test_a_diverged_head_is_clipped_and_marked(monkeypatch, tmp_path):
    import biomass_cache.train.plots as plots

    shown, clipped = plots.clip_scores([0.8, -140.0, -0.5])
    assert shown.tolist() == [0.8, plots.SCORE_FLOOR, -0.5] and clipped.tolist() == [False, True, False]
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    folds = {"fold0": {"competition_r2": 0.7}, "fold1": {"competition_r2": 0.6}}
    metrics = {"ranking": ["good", "bad"], "heads": {
        "good": {"competition_r2": 0.65, "folds": folds},
        "bad": {"competition_r2": -60.0, "folds": {"fold0": {"competition_r2": -140.0}, "fold1": folds["fold1"]}}}}
    plots.plot_fold_scores(metrics, tmp_path / "f.png")
    ax = figures[0].axes[0]
    assert ax.get_ylim()[0] > -2  # the good head's bars stay readable
    labels = [t.get_text() for t in ax.texts]
    assert "-140.00 (clipped)" in labels and "-60.00 (clipped)" in labels and "0.70" in labels
    assert sum(bar.get_hatch() == "///" for bar in ax.patches) == 2


def test_the_loss_title_says_how_the_losses_were_combined():
    from biomass_cache.train.plots import loss_title

    assert loss_title(set(), ["density", "mlp"]) == "training loss (sum of the task losses)"
    assert loss_title({"density", "mlp"}, ["density", "mlp"]) == "training loss (UW-weighted sum)"
    assert "UW-weighted: mlp" in loss_title({"mlp"}, ["density", "mlp"])
    assert loss_title(None, ["density"]) == "training loss"
