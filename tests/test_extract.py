"""Extraction: store layout and fingerprint, tokens equal the backbone's own forward, resume after a crash, no-op
re-runs, fingerprint refusal, appended images, bad images, the CLI and a 2-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from typer.testing import CliRunner

import biomass_cache
from biomass_cache.backbone.vit import create_backbone, forward_tokens
from biomass_cache.common.errors import DataError
from biomass_cache.cli.errors import script_app
from biomass_cache.extract.pipeline import default_layers, extract
from biomass_cache.cli.extract import extract_command
from biomass_cache.store.layout import open_store
from biomass_cache.store.handle import TokenStore
from biomass_cache.common.errors import StoreError
from biomass_cache.backbone.views import ViewPolicy, load_photo, make_view
from toys import EXTRACT_TINY as TINY
from toys import ROOT, assert_same_arrays, cfg_json, config, write_data

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted single-process run that several tests compare against."""
    tmp = tmp_path_factory.mktemp("ref")
    ids = write_data(tmp / "data", 7)
    cfg = config(tmp)
    return cfg, ids, extract(cfg, progress=False)


def test_layout_and_fingerprint(reference):
    cfg, ids, summary = reference
    group = zarr.open_group(cfg.out, mode="r")
    attrs = dict(group.attrs)
    assert group["tokens"].shape == (7, 3, 2, 2 * 4, 32) and group["tokens"].dtype == np.float16
    assert group["prefix"].shape == (7, 3, 2, 5, 32)
    assert group["done"][:].all()
    assert attrs["image_ids"] == ids and attrs["split"] == "train" and attrs["grid"] == [2, 4]
    assert attrs["layers"] == [0, 1] and attrs["n_views"] == 3 and attrs["channels"] == 32
    assert attrs["random_weights"] is True and attrs["bad_ids"] == {} and attrs["storage_dtype"] == "float16"
    fp = attrs["fingerprint"]
    assert fp["backbone"]["weights_sha256"] == "random" and fp["backbone"]["overrides"] == TINY
    assert fp["backbone"]["random_seed"] == 3 and fp["seed"] == 3
    assert fp["size"] == [64, 32] and fp["grid"] == [2, 4] and fp["layers"] == [0, 1] and fp["norm"] is True
    assert fp["policy"] == json.loads(json.dumps(ViewPolicy().to_dict()))
    assert fp["version"] == biomass_cache.__version__ and fp["compute"] == "float32" and fp["n_views"] == 3
    assert summary["samples_done"] == summary["samples_total"] == 21 and summary["views_extracted"] == 21
    assert summary["bytes_on_disk"] > 21 * 2 * 13 * 32 * 2 and summary["random_weights"] is True


def test_tokens_equal_backbone_forward(reference):
    cfg, ids, _ = reference
    backbone = create_backbone(cfg.backbone, seed=cfg.seed, overrides=TINY)
    store = open_store(cfg.out)
    for i, v in [(0, 0), (3, 1), (6, 2)]:
        image = load_photo(cfg.data_dir / "train" / f"{ids[i]}.jpg", cfg.size, cfg.policy)
        x = make_view(image, ids[i], v, cfg.seed, cfg.size, cfg.policy, "train")
        with torch.inference_mode():
            tokens, prefix = forward_tokens(backbone, x[None], [0, 1], norm=True)
        np.testing.assert_allclose(store.read(i, v), tokens[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(store.read_prefix(i, v), prefix[0].numpy(), rtol=2e-3, atol=2e-3)
    assert not np.array_equal(store.read(0, 0), store.read(0, 1))  # augmented views differ from the clean one


def test_second_run_is_a_noop(reference, capsys):
    cfg, _, _ = reference
    shards = {p: p.stat().st_mtime_ns for p in (cfg.out / "tokens").iterdir()}
    summary = extract(cfg, progress=False)
    assert summary["views_extracted"] == 0 and summary["already_done"] == 21
    assert "already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (cfg.out / "tokens").iterdir()} == shards


def test_resume_after_crash_is_identical(reference, tmp_path, monkeypatch):
    ref_cfg, _, _ = reference
    cfg = config(tmp_path, data_dir=ref_cfg.data_dir)
    real_write, calls = TokenStore.write_encoded, []

    def crash_after_two(self, *args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of the run
        calls.append(1)
        real_write(self, *args, **kw)

    monkeypatch.setattr(TokenStore, "write_encoded", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract(cfg, progress=False)
    monkeypatch.undo()
    done = open_store(cfg.out).done()
    assert done.sum(axis=1).tolist() == [3, 3, 0, 0, 0, 0, 0]
    summary = extract(cfg, progress=False)
    assert summary["views_extracted"] == 15 and summary["already_done"] == 6
    assert_same_arrays(cfg.out, ref_cfg.out)


@pytest.mark.slow
def test_resume_after_kill_9(reference, tmp_path):
    """A process killed with SIGKILL mid-run leaves a store that resumes to the uninterrupted arrays."""
    ref_cfg, _, _ = reference
    cfg = config(tmp_path, data_dir=ref_cfg.data_dir, batch_size=3)
    script = f"""
import os, signal
from biomass_cache.extract.pipeline import ExtractConfig, extract
from biomass_cache.store.handle import TokenStore
real, n = TokenStore.write_encoded, []
def write_then_die(self, *a, **k):
    real(self, *a, **k)
    n.append(1)
    if len(n) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
TokenStore.write_encoded = write_then_die
extract(ExtractConfig(**{cfg_json(cfg)!r}), progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert 3 <= open_store(cfg.out).done().all(axis=1).sum() < 7
    extract(cfg, progress=False)
    assert_same_arrays(cfg.out, ref_cfg.out)


def test_fingerprint_mismatch_refused_then_overwrite(tmp_path):
    write_data(tmp_path / "data", 3)
    extract(config(tmp_path), progress=False)
    with pytest.raises(StoreError, match=r"layers: \[0, 1\] -> \[1\]"):
        extract(config(tmp_path, layers=[-1]), progress=False)
    with pytest.raises(StoreError, match=r"norm: true -> false"):
        extract(config(tmp_path, norm=False), progress=False)
    summary = extract(config(tmp_path, layers=[-1], overwrite=True), progress=False)
    assert open_store(tmp_path / "tokens.zarr").layers == [1] and summary["views_extracted"] == 9


def test_appended_images_are_extracted_alone(reference, tmp_path):
    ref_cfg, ids, _ = reference
    data = tmp_path / "data"
    write_data(data, 7)
    full_csv = pd.read_csv(data / "train.csv")
    full_csv[full_csv["image_path"].isin([f"train/{i}.jpg" for i in ids[:4]])].to_csv(data / "train.csv", index=False)
    cfg = config(tmp_path)
    extract(cfg, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (cfg.out / "tokens").glob("c.*")}
    full_csv.to_csv(data / "train.csv", index=False)
    summary = extract(cfg, progress=False)
    assert summary["images_extracted"] == 3 and summary["already_done"] == 12
    assert open_store(cfg.out).image_ids == ids
    assert all((cfg.out / "tokens" / name).stat().st_mtime_ns == t for name, t in before.items())
    assert_same_arrays(cfg.out, ref_cfg.out)


def _break_image(data: Path, image_id: str, how: str) -> Path:
    path = data / "train" / f"{image_id}.jpg"
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:200])  # truncated JPEG
    return path


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_bad_image_stops_naming_the_path(tmp_path, how):
    ids = write_data(tmp_path / "data", 6)
    path = _break_image(tmp_path / "data", ids[4], how)
    cfg = config(tmp_path, batch_size=3)  # one image per batch: the images before the bad one get written
    with pytest.raises(DataError, match=str(path)):
        extract(cfg, progress=False)
    store = open_store(cfg.out)
    assert store.done().all(axis=1).tolist() == [True] * 4 + [False] * 2
    assert not any(p.name.startswith("c.4.") for p in (cfg.out / "tokens").iterdir())  # nothing written for it


def test_skip_bad_records_and_goes_on(tmp_path, capsys):
    ids = write_data(tmp_path / "data", 6)
    path = _break_image(tmp_path / "data", ids[2], "truncated")
    cfg = config(tmp_path, skip_bad=True, num_workers=2)  # the decode error happens in a worker process
    summary = extract(cfg, progress=False)
    store = open_store(cfg.out)
    assert list(store.bad_ids) == [ids[2]] and str(path) in store.bad_ids[ids[2]]
    assert store.done().all(axis=1).tolist() == [True, True, False, True, True, True]
    assert summary["bad_ids"].keys() == {ids[2]} and summary["views_extracted"] == 15
    capsys.readouterr()
    assert extract(cfg, progress=False)["views_extracted"] == 0
    assert "marked bad in an earlier run" in capsys.readouterr().out


def test_test_split_tta_views(tmp_path):
    ids = write_data(tmp_path / "data", 2, split="test")
    cfg = config(tmp_path, split="test", views=4, layers=None, store_prefix=False, dtype="int8")
    extract(cfg, progress=False)
    store = open_store(cfg.out)
    assert store.split == "test" and store.n_prefix == 0 and store.layers == default_layers(2) == [0, 1]
    hflip = store.read(1, 1).reshape(2, 2, 4, 32)
    assert store.image_ids == ids and store.storage_dtype == "int8" and np.isfinite(hflip).all()
    with pytest.raises(ValueError, match=r"views must be at most 4 \(the TTA views"):
        config(tmp_path, split="test", views=5)


def test_cli_config_file_flags_and_warning(tmp_path):
    write_data(tmp_path / "data", 2)
    conf = tmp_path / "extract.toml"
    conf.write_text('[extract]\nsize = [64, 32]\nlayers = [0, 1]\nviews = 2\nnum_workers = 0\n'
                    'overrides = { depth = 2, embed_dim = 32, num_heads = 2 }\n')
    app = script_app(extract_command)  # as extract_features.py runs it
    where = ["--config", str(conf), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t.zarr")]
    args = [*where, "--layers", "-1", "--dtype", "bfloat16", "--no-prefix"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "RANDOM BACKBONE WEIGHTS" in result.output and "kB per image-view" in result.output
    store = open_store(tmp_path / "t.zarr")
    assert store.layers == [1] and store.storage_dtype == "bfloat16" and store.n_views == 2 and store.n_prefix == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already done" in again.output
    refused = CliRunner().invoke(app, [*where, "--layers", "-1", "--no-prefix"])  # float16 (the default)
    assert refused.exit_code == 2 and refused.output.startswith("error: ") and "storage_dtype" in refused.output


@pytest.mark.slow
def test_torchrun_two_ranks_equal_single_process(reference, tmp_path):
    ref_cfg, _, _ = reference
    conf = tmp_path / "cfg.json"
    conf.write_text(json.dumps(cfg_json(replace(ref_cfg, out=tmp_path / "ddp.zarr"))))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "biomass_cache", "extract", "--config", str(conf), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s)" in proc.stdout
    assert_same_arrays(tmp_path / "ddp.zarr", ref_cfg.out)
