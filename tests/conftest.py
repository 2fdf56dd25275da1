"""Fixtures shared by several test files. The plain builders they use (toy stores, photo folders, store specs) are in
tests/toys.py."""

from __future__ import annotations

import pytest
import torch
from toys import PIPELINE_VIT


@pytest.fixture(scope="module")
def one_thread():
    """Tiny heads and tensors run fastest single-threaded: thread hand-offs on a shared CPU cost more than the maths.
    A test file opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Synthetic data -> tiny random ViT train cache -> 3-fold density + mlp heads, with MC-dropout; returns
    (root, data folder, run folder)."""
    from biomass_cache.train.crossval import run_training
    from biomass_cache.extract.pipeline import extract
    from biomass_cache.extract.config import ExtractConfig
    from biomass_cache.synth.generate import generate
    from biomass_cache.train.config import resolve

    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    generate(data, n_train=36, n_test=8, seed=0, size=(128, 64), progress=False)
    cache = root / "train.zarr"
    extract(ExtractConfig(data_dir=data, split="train", out=cache, backbone="vit_small_patch16_dinov3",
                          weights="random", size=(64, 32), layers=[0, 1], views=2, seed=0, device="cpu",
                          overrides=PIPELINE_VIT), progress=False)
    settings = dict(folds=3, epochs=5, device="cpu", workers=0, pcgrad=False)
    cfg, members = resolve({"head_kwargs": {"dropout": 0.1}}, [], settings, ["density", "mlp"])  # MC-dropout
    run_training(cache, data, root / "run", cfg, members)
    return root, data, root / "run"
