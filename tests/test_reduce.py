"""Cache reduction (reduce.py): the PCA and pooling against hand and sklearn computations, the derived store's
format and fingerprint chain, the refusals, training on a reduced store and submitting from it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import zarr
from sklearn.decomposition import PCA
from typer.testing import CliRunner

from biomass_cache.train import runs
from biomass_cache.common.errors import DataError
from biomass_cache.cli.errors import script_app
from biomass_cache.store.reduce import Reduction, fit_reduction, norm_pool, pool_tokens, reduce_store, reduction_of
from biomass_cache.cli.reduce import reduce_command
from biomass_cache.store.layout import StoreSpec, create_store, open_store
from toys import CHANNELS, GRID, LAYERS, VIEWS, make_toy


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce")
    data, store = make_toy(root, n=24)
    return root, data, store


def cli(*args) -> object:
    """`biomass reduce ARGS` as the scripts run it: a user error is one `error:` line and exit status 2."""
    return CliRunner().invoke(script_app(reduce_command), [str(a) for a in args])


def test_pooling_by_hand():
    grid = (2, 4)
    x = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)  # (layers, tokens, channels)
    out = pool_tokens(x, grid, 2)
    assert out.shape == (2, 2, 3)
    # tokens of the first 2 x 2 cell: (row 0: 0, 1; row 1: 4, 5); of the second: 2, 3, 6, 7
    np.testing.assert_allclose(out[0, 0], x[0, [0, 1, 4, 5]].mean(0))
    np.testing.assert_allclose(out[1, 1], x[1, [2, 3, 6, 7]].mean(0))
    assert pool_tokens(x, grid, 1) is x


def test_pca_matches_sklearn_and_apply_matches_the_definition(toy):
    _, _, path = toy
    store = open_store(path)
    red = fit_reduction(store, dim=5, pool=2, fit_tokens=10**9, progress=False)  # every token: exact PCA
    assert red.components.shape == (len(LAYERS), CHANNELS, 5) and red.grid == (GRID[0] // 2, GRID[1] // 2)
    for l in range(len(LAYERS)):
        x = np.concatenate([pool_tokens(F.layer_norm(torch.from_numpy(store.read(i, 0)), (CHANNELS,)), GRID, 2)[l]
                            .numpy() for i in range(24)])
        ref = PCA(n_components=5).fit(x)
        # the store's float16 tokens are normed and pooled in float16 (norm_pool): one float16 rounding apart
        np.testing.assert_allclose(red.mean[l], ref.mean_, atol=2e-4)
        dots = np.abs(np.sum(red.components[l].T * ref.components_, axis=1))
        np.testing.assert_allclose(dots, 1.0, atol=1e-3)  # the same directions, up to sign
        np.testing.assert_allclose(red.components[l].T @ red.components[l], np.eye(5), atol=1e-5)
    tokens = torch.from_numpy(store.read(3, 1))
    pooled = pool_tokens(F.layer_norm(tokens, (CHANNELS,)), GRID, 2)
    mean, comps = torch.from_numpy(red.mean)[:, None], torch.from_numpy(red.components)
    expected = (pooled - mean) @ comps
    # float32 tokens: normed and pooled in float32, rounded to float16 once (as an in-pass side store keeps them)
    np.testing.assert_allclose(red.apply(tokens).numpy(), ((pooled.half().float() - mean) @ comps).numpy(),
                               atol=1e-5)
    assert float((red.apply(tokens) - expected).norm() / expected.norm()) < 1e-3
    from_stored = red.apply(store.read_values(3, 1))  # float16: within the float16 rounding of the normed tokens
    assert from_stored.dtype == torch.float32
    assert float((from_stored - expected).norm() / expected.norm()) < 1e-3


def test_the_fit_in_bf16_keeps_the_subspace_and_its_clean_views_reduce_alike(toy, tmp_path, monkeypatch):
    """bf16 Gram matrices (where the CPU has them) move the PCA subspace far less than the data does; the fit's
    kept clean views give the store reading them again gives, bit for bit."""
    import biomass_cache.store.reduce as reduce_module

    torch.manual_seed(0)
    mix = (torch.arange(1, 65.0) ** -0.8)[:, None] * torch.linalg.qr(torch.randn(64, 64))[0]
    images = [(torch.randn(1, 200, 64) @ mix + 0.02 * torch.randn(1, 200, 64)) for _ in range(16)]
    fits = {}
    for bf16 in (False, True):
        monkeypatch.setattr(reduce_module, "native_bf16", lambda device, bf16=bf16: bf16)
        fits[bf16] = torch.from_numpy(reduce_module.fit_pca(enumerate(images), 16, 8, fit_tokens=10**6)[1][0])
    x = torch.cat(images)[:, 0]
    moved = (x @ fits[True] @ fits[True].T - x @ fits[False] @ fits[False].T).norm() / (x @ fits[False]).norm()
    assert 0 < float(moved) < 0.02
    monkeypatch.undo()
    _, _, path = toy
    store = open_store(path)
    kept: dict = {}
    red = fit_reduction(store, dim=5, pool=2, progress=False, keep=kept)
    assert sorted(kept) == list(range(24)) and all(v.dtype == torch.float16 for v in kept.values())
    a = reduce_store(store, red, tmp_path / "a.zarr", progress=False, clean=kept)
    b = reduce_store(store, red, tmp_path / "b.zarr", progress=False)
    assert not kept  # each taken as it is used
    for i in (0, 7, 23):
        for v in range(VIEWS):
            np.testing.assert_array_equal(a.read(i, v), b.read(i, v))
    assert reduce_module.keep_clean_views(store, 2) and not reduce_module.keep_clean_views(store, 2, share=0.0)


def test_norm_pool_in_float16_is_float32_rounded_once():
    x = (torch.randn(3, 8 * 12, 64) * 3 + 1).half()
    exact = pool_tokens(F.layer_norm(x.float(), (64,)), (8, 12), 2)
    fast = norm_pool(x, (8, 12), 2)
    assert fast.dtype == torch.float32 and fast.shape == exact.shape
    # each normed value is rounded to float16 once (relative 2^-11), then averaged and rounded once more
    assert float((fast - exact).abs().max()) <= 2 * 2 ** -11 * float(exact.abs().max())
    for dtype in (torch.bfloat16, torch.float32):  # every other dtype: normed in float32, the result rounded once
        y = x.to(dtype)
        torch.testing.assert_close(norm_pool(y, (8, 12), 2),
                                   pool_tokens(F.layer_norm(y.float(), (64,)), (8, 12), 2).half().float(), rtol=0, atol=0)


@pytest.mark.slow
def test_reduced_store_is_plain_zarr_with_a_chained_fingerprint(toy, tmp_path):
    _, _, path = toy
    src = open_store(path)
    red = fit_reduction(src, dim=4, pool=2, progress=False)
    store = reduce_store(src, red, tmp_path / "red.zarr", progress=False)
    group = zarr.open_group(tmp_path / "red.zarr", mode="r")  # no project code needed to read it
    assert group["tokens"].shape == (24, VIEWS, len(LAYERS), 4 * 2, 4)
    assert group["reduction_components"].shape == (len(LAYERS), CHANNELS, 4)
    fp = dict(group.attrs)["fingerprint"]
    assert fp == {"parent": src.fingerprint, "reduce": {"method": "pca-layernorm", "dim": 4, "pool": 2,
                                                          "projection_sha256": red.sha256}}
    assert store.grid == (4, 2) and store.channels == 4 and store.random_weights
    np.testing.assert_allclose(store.read(5, 1), red.apply(torch.from_numpy(src.read(5, 1))).numpy(), atol=2e-2)
    again = Reduction.of_store(store)
    assert again.sha256 == red.sha256 and again.parent_fingerprint == src.fingerprint
    assert not list(tmp_path.glob(".*"))  # no temporary store left


@pytest.mark.slow
def test_bad_requests_are_refused_and_write_nothing(toy, tmp_path):
    root, _, path = toy
    cases = [
        (["--dim", CHANNELS + 1], f"--dim {CHANNELS + 1}: must be between 1 and the {CHANNELS} channels"),
        (["--dim", 4, "--pool", 3], r"--pool 3: must be >= 1 and divide the patch grid \[8, 4\]"),
    ]
    for extra, message in cases:
        result = cli("--cache", path, "--out", tmp_path / "out.zarr", *extra)
        assert not (tmp_path / "out.zarr").exists()
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert re.search("error: " + message, result.output), result.output
    _, half = make_toy(root / "half", n=24, done=False)  # half the images never extracted
    with pytest.raises(DataError, match=r"12 image\(s\) are not completely extracted.*resume the extraction"):
        fit_reduction(open_store(half), 4, 2, progress=False)
    (tmp_path / "taken.zarr").mkdir()
    red = fit_reduction(open_store(path), 4, 2, progress=False)
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        reduce_store(open_store(path), red, tmp_path / "taken.zarr", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.zarr"]


@pytest.mark.slow
def test_what_reduce_may_not_write_or_fit_is_refused_before_the_fit(toy, tmp_path, monkeypatch):
    """--pool 0; an --out that is not a store (even with --overwrite), holds the input, lies under a file or exists;
    a reduced store reduced again; --like with other settings, or a run trained on full tokens: one line each,
    before any PCA is fitted, and nothing written or deleted."""
    root, data, path = toy
    nest = tmp_path / "nest"
    shutil.copytree(path, nest / "in.zarr")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    (tmp_path / "afile").write_text("")
    (tmp_path / "taken.zarr").mkdir()
    reduced = tmp_path / "reduced.zarr"
    assert cli("--cache", path, "--out", reduced, "--dim", 4, "--pool", 2).exit_code == 0
    run = tmp_path / "run_full"
    (run / "fold0").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    import biomass_cache.store.reduce as reduce_module
    monkeypatch.setattr(reduce_module, "pca_of", lambda *a, **k: pytest.fail("fitted before refusing"))
    cases = [
        ([path, "--out", tmp_path / "p.zarr", "--pool", 0], r"--pool 0: must be >= 1"),
        ([path, "--out", tmp_path / "notes", "--overwrite"], "refusing to overwrite it, it is not a token store"),
        ([nest / "in.zarr", "--out", nest, "--overwrite"], "is, holds or lies in the input store"),
        ([nest / "in.zarr", "--out", nest / "in.zarr" / "sub.zarr"], "is, holds or lies in the input store"),
        ([path, "--out", tmp_path / "afile" / "r.zarr"], "afile is a file, not a folder"),
        ([path, "--out", tmp_path / "taken.zarr"], "already exists; pass --overwrite"),
        ([reduced, "--out", tmp_path / "rr.zarr"], "is a reduced store already"),
        ([path, "--out", tmp_path / "l.zarr", "--like", reduced, "--dim", 8], r"leave out --dim"),
        ([path, "--out", tmp_path / "l.zarr", "--like", run], "a run trained on full tokens has none"),
    ]
    for (cache, *rest), message in cases:
        result = cli("--cache", cache, *rest)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert re.search("error: .*" + message, result.output), (message, result.output)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine" and (nest / "in.zarr" / "zarr.json").is_file()
    assert not (nest / "in.zarr" / "sub.zarr").exists()
    assert not any((tmp_path / n).exists() for n in ("p.zarr", "rr.zarr", "l.zarr"))


@pytest.mark.slow
def test_a_store_of_other_tokens_is_refused_by_the_projection(toy, tmp_path):
    root, _, path = toy
    _, other = make_toy(root / "other", n=24, seed=5)  # same shapes, another fingerprint (seed)
    red = fit_reduction(open_store(path), 4, 2, progress=False)
    with pytest.raises(DataError, match=r"another configuration than the store the projection was fitted on.*"
                                        r"seed: 0 -> 5"):
        reduce_store(open_store(other), red, tmp_path / "x.zarr", progress=False)
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.slow
def test_a_test_store_differing_only_in_split_and_views_takes_the_projection(toy, tmp_path):
    _, _, path = toy
    src = open_store(path)
    red = fit_reduction(src, 4, 2, progress=False)
    spec = StoreSpec(image_ids=["T1", "T2"], n_views=3, layers=LAYERS, grid=GRID, channels=CHANNELS,
                     fingerprint={**src.fingerprint, "split": "test", "n_views": 3}, split="test")
    test = create_store(tmp_path / "test.zarr", spec)
    for i in range(2):
        test.write_image(i, np.random.default_rng(i).normal(size=(3, len(LAYERS), GRID[0] * GRID[1], CHANNELS)))
    out = reduce_store(open_store(tmp_path / "test.zarr"), red, tmp_path / "test_red.zarr", progress=False)
    assert out.n_views == 3 and Reduction.of_store(out).sha256 == red.sha256


@pytest.mark.slow
def test_training_on_a_reduced_store_and_the_mismatch_refusals(toy, tmp_path):
    from biomass_cache.train.crossval import run_training
    from biomass_cache.train.config import resolve

    _, data, path = toy
    assert cli("--cache", path, "--out", tmp_path / "red.zarr", "--dim", 4, "--pool", 2).exit_code == 0
    cfg, members = resolve({}, [], dict(folds=2, epochs=1, device="cpu", workers=0, plots=False), ["density"])
    run_training(tmp_path / "red.zarr", data, tmp_path / "run", cfg, members)
    assert reduction_of(tmp_path / "run").sha256 == reduction_of(tmp_path / "red.zarr").sha256
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert "held on cpu" in config["tokens"] and "reduce" in config["cache"]["fingerprint"]
    _, meta = runs.load_head(tmp_path / "run" / "fold0" / "density.json")
    with pytest.raises(DataError, match=r"trained on a reduced token store .*pca-layernorm.*is not reduced: "
                                        r"reduce it with `biomass reduce"):
        runs.check_compatible(meta, open_store(path))
    runs.check_compatible(meta, open_store(tmp_path / "red.zarr"))
    cfg, members = resolve({}, [], dict(folds=2, epochs=1, device="cpu", workers=0, plots=False), ["mlp"])
    run_training(path, data, tmp_path / "full_run", cfg, members)
    _, full_meta = runs.load_head(tmp_path / "full_run" / "fold0" / "mlp.json")
    with pytest.raises(DataError, match="trained on unreduced tokens; .* is a reduced store"):
        runs.check_compatible(full_meta, open_store(tmp_path / "red.zarr"))
    # --like applies the run's projection to another store of the same tokens
    assert cli("--cache", path, "--out", tmp_path / "like.zarr", "--like", tmp_path / "run").exit_code == 0
    np.testing.assert_array_equal(open_store(tmp_path / "like.zarr").read(0, 0),
                                  open_store(tmp_path / "red.zarr").read(0, 0))


@pytest.mark.slow
@pytest.mark.parametrize("precision, times", [("fp32", 1), ("bf16", 2)])
def test_a_run_reads_the_store_once_for_every_fold(toy, tmp_path, monkeypatch, precision, times):
    """Once into the bank; a bf16 run reads each sample once more, for its fp32 OOF predictions (each image is in one
    fold's validation set, every view of it predicted)."""
    from biomass_cache.train.crossval import run_training
    from biomass_cache.store.handle import TokenStore
    from biomass_cache.train.config import resolve

    _, data, path = toy
    reads = []
    original = TokenStore.read
    monkeypatch.setattr(TokenStore, "read", lambda self, i, v, layers=None: reads.append((i, v)) or
                        original(self, i, v, layers))
    cfg, members = resolve({}, [], dict(folds=3, epochs=2, device="cpu", workers=0, plots=False,
                                        precision=precision), ["density"])
    run_training(path, data, tmp_path / "run", cfg, members)
    assert sorted(reads) == sorted((i, v) for i in range(24) for v in range(VIEWS) for _ in range(times))


@pytest.mark.slow
def test_submit_from_a_run_on_a_reduced_store(tmp_path):
    """Synthetic photos -> tiny backbone cache -> reduce -> train -> submit: the test cache is extracted, then
    reduced with the run's projection, and a second submission reuses both."""
    from biomass_cache.train.crossval import run_training
    from biomass_cache.submit.spec import spec_from_options
    from biomass_cache.extract.pipeline import extract
    from biomass_cache.extract.config import ExtractConfig
    from biomass_cache.submit.ensemble import submit
    from biomass_cache.synth.generate import generate
    from biomass_cache.train.config import resolve

    data = tmp_path / "data"
    generate(data, n_train=24, n_test=4, seed=0, size=(128, 64), progress=False)
    extract(ExtractConfig(data_dir=data, split="train", out=tmp_path / "train.zarr", weights="random", size=(64, 32),
                          layers=[0, 1], views=2, device="cpu", overrides=dict(depth=2, embed_dim=64, num_heads=2)),
            progress=False)
    assert cli("--cache", tmp_path / "train.zarr", "--out", tmp_path / "red.zarr", "--dim", 16).exit_code == 0
    cfg, members = resolve({}, [], dict(folds=2, epochs=2, device="cpu", workers=0, plots=False), ["density"])
    run_training(tmp_path / "red.zarr", data, tmp_path / "run", cfg, members)
    spec = spec_from_options(None, str(tmp_path / "run"))
    submit(spec, data, tmp_path / "out" / "submission.csv", progress=False)
    sub = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert len(sub) == 4 * 5 and np.isfinite(sub["target"]).all()
    caches = sorted(p.name for p in (tmp_path / "out" / "cache").glob("*.zarr"))
    sha = reduction_of(tmp_path / "run").sha256[:16]
    assert len(caches) == 1 and caches[0].endswith(f"-reduced-{sha}.zarr")  # reduced in the pass: no full cache
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cache").rglob("*") if p.is_file()}
    submit(spec, data, tmp_path / "out" / "again.csv", progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "cache").rglob("*") if p.is_file()} == stamp
    assert Path(tmp_path / "out" / "again.csv").read_bytes() == (tmp_path / "out" / "submission.csv").read_bytes()


@pytest.mark.slow
def test_the_config_table_sets_the_defaults_and_flags_override_it(toy, tmp_path):
    _, _, path = toy
    config = tmp_path / "c.toml"
    config.write_text("[reduce]\ndim = 3\npool = 2\n")
    assert cli("--cache", path, "--out", tmp_path / "a.zarr", "--config", config).exit_code == 0
    assert open_store(tmp_path / "a.zarr").channels == 3 and open_store(tmp_path / "a.zarr").grid == (4, 2)
    assert cli("--cache", path, "--out", tmp_path / "b.zarr", "--config", config, "--pool", 1).exit_code == 0
    assert open_store(tmp_path / "b.zarr").grid == GRID
    config.write_text("[reduce]\ndims = 3\n")
    result = cli("--cache", path, "--out", tmp_path / "c.zarr", "--config", config)
    assert result.exit_code == 2 and "unknown key(s) ['dims']" in result.output and not (tmp_path / "c.zarr").exists()
    default = Path(__file__).resolve().parents[1] / "configs" / "cpu_demo.toml"
    from biomass_cache.store.reduce import load_settings
    assert load_settings(default) == {"dim": 128, "pool": "auto", "fit_tokens": 100000}


def test_auto_pooling_keeps_the_benchmarked_grid():
    from biomass_cache.store.reduce import auto_pool

    assert auto_pool((30, 60)) == 2  # ViT at 960 x 480 -> 15 x 30
    assert auto_pool((14, 28)) == 1 and auto_pool((7, 14)) == 1 and auto_pool((8, 4)) == 1
    assert auto_pool((60, 120)) == 4 and auto_pool((28, 56)) == 2


@pytest.mark.slow
def test_in_threads_keeps_the_order_and_the_callers_torch_threads():
    """Workers run single-threaded torch ops; the caller keeps its own count, even in a fresh process where the
    workers are the first to set one (the first setting used to become the process's)."""
    code = ("import torch; from biomass_cache.store.reduce import in_threads; "
            "print(torch.get_num_threads()); torch.set_num_threads(2); "  # the default, first read in this process
            "seen = [(i, x, torch.get_num_threads()) for i, x in in_threads(lambda i: (i * i, torch.get_num_threads()),"
            " list(range(9)))]; print(seen == [(i, (i * i, 1), 2) for i in range(9)], torch.get_num_threads())")
    fresh = ("import torch; from biomass_cache.store.reduce import in_threads; "
             "list(in_threads(lambda i: torch.ones(2).sum(), list(range(5)))); print(torch.get_num_threads())")
    import subprocess
    import sys
    default, *out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout.split()
    assert out == ["True", "2"]
    assert subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True,
                          check=True).stdout.split() == [default]
