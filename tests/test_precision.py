"""Compute precision and the split backbone: fp16 autocast on the CPU recorded in the fingerprint, a forced fp16
overflow stopping with nothing marked done, and `--devices cpu,cpu` writing the single-device store bit for bit."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from biomass_cache.cli.errors import script_app

import biomass_cache.extract.pipeline as extract_module
from biomass_cache.backbone.vit import create_backbone, forward_tokens, place_backbone, split_points
from biomass_cache.submit.members import _extract_settings
from biomass_cache.extract.pipeline import extract
from biomass_cache.cli.extract import extract_command
from biomass_cache.backbone.precision import (COMPUTE, finite_rows, non_finite_error, precision_of_compute,
                                                resolve_precision)
from biomass_cache.common.errors import NonFiniteError
from biomass_cache.store.layout import open_store
from toys import assert_same_arrays, config, write_data

CLI = ["--size", "64x32", "--layers", "0,1", "--views", "2", "--workers", "0", "--batch-size", "4"]


def cli(tmp_path, *args):
    """`extract_features.py ARGS`: a user error is one `error:` line and exit status 2."""
    app = script_app(extract_command)
    conf = tmp_path / "tiny.toml"
    conf.write_text("[extract]\noverrides = { depth = 2, embed_dim = 32, num_heads = 2 }\n")
    return CliRunner().invoke(app, ["--config", str(conf), "--data", str(tmp_path / "data"), *CLI, *args])


def test_resolution_and_fingerprint_values():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert [resolve_precision(p, cpu) for p in ("bf16", "fp16", "fp32")] == ["bf16", "fp16", "fp32"]
    assert COMPUTE["bf16"] == "bfloat16-autocast" and COMPUTE["fp32"] == "float32"  # existing stores' values
    assert all(precision_of_compute(COMPUTE[p]) == p for p in COMPUTE)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("half", cpu)


@pytest.mark.slow
def test_fp16_on_cpu_is_in_the_fingerprint_and_close_to_fp32(tmp_path):
    write_data(tmp_path / "data", 2)
    fp16 = cli(tmp_path, "--out", str(tmp_path / "fp16.zarr"), "--precision", "fp16", "--device", "cpu")
    assert fp16.exit_code == 0, fp16.output
    assert "fp16 compute" in fp16.output
    fp32 = cli(tmp_path, "--out", str(tmp_path / "fp32.zarr"), "--device", "cpu")  # auto on the CPU
    assert fp32.exit_code == 0, fp32.output
    a, b = open_store(tmp_path / "fp16.zarr"), open_store(tmp_path / "fp32.zarr")
    assert a.fingerprint["compute"] == "float16-autocast" and b.fingerprint["compute"] == "float32"
    ta, tb = a.read(1, 1), b.read(1, 1)
    assert not np.array_equal(ta, tb) and np.allclose(ta, tb, atol=0.05)
    resumed = cli(tmp_path, "--out", str(tmp_path / "fp16.zarr"), "--device", "cpu")  # auto = fp32 here
    assert resumed.exit_code == 2 and "error: " in resumed.output and "compute" in resumed.output
    # a test cache is rebuilt in the training cache's precision
    settings = _extract_settings({"cache": {"fingerprint": a.fingerprint}}, tmp_path / "config.json")
    assert settings["precision"] == "fp16"


@pytest.mark.slow
def test_forced_fp16_overflow_is_a_clear_error_with_nothing_done(tmp_path, monkeypatch):
    """Through the command: one `error:` line naming the image, the block and what to do; exit status 2."""
    write_data(tmp_path / "data", 3)
    real = extract_module.create_backbone

    def huge(*args, **kwargs):  # patch-embedding weights that put activations beyond fp16's 65504
        bb = real(*args, **kwargs)
        with torch.no_grad():
            bb.model.patch_embed.proj.weight.mul_(1e6)
        return bb

    monkeypatch.setattr(extract_module, "create_backbone", huge)
    monkeypatch.delenv("BIOMASS_DEBUG", raising=False)
    out = tmp_path / "fp16.zarr"
    result = cli(tmp_path, "--out", str(out), "--precision", "fp16", "--device", "cpu", "--no-norm")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"image 'ID100\d' at cached block 0 .*fp16 overflowed.*bf16.*fp32",
                                          errors[0]), result.stderr
    assert not open_store(out).done().any()
    with pytest.raises(NonFiniteError):  # the library raises the error type the command reports
        extract(config(tmp_path, out=tmp_path / "lib.zarr", precision="fp16", device="cpu", norm=False),
                progress=False)
    done = extract(config(tmp_path, out=tmp_path / "fp32.zarr", precision="fp32", norm=False, dtype="bfloat16"),
                   progress=False)
    assert done["samples_done"] == 9  # the same weights are finite in fp32


def check_finite(tokens, prefix, image_ids, views_per_image, layers, precision) -> None:
    error = non_finite_error(finite_rows(tokens, prefix), image_ids, views_per_image, layers, precision)
    if error is not None:
        raise error


def test_check_finite_names_the_image_of_the_bad_row():
    tokens = torch.zeros(5, 2, 4, 3)  # images A (2 views), B (3 views)
    tokens[3, 1, 0, 0] = float("inf")
    check_finite(tokens[:3], torch.zeros(3, 2, 0, 3), ["A", "B"], [2, 1], [4, 9], "bf16")
    with pytest.raises(NonFiniteError, match=r"image .B. at cached block 9 \(.*\) in bf16 compute; check the backbone"):
        check_finite(tokens, torch.zeros(5, 2, 1, 3), ["A", "B"], [2, 3], [4, 9], "bf16")


@pytest.mark.slow
def test_split_points_and_placement():
    bb = create_backbone("vit_small_patch16_dinov3", overrides=dict(depth=6, embed_dim=32, num_heads=2))
    assert split_points(bb.model, 1) == []
    points = split_points(bb.model, 3)
    assert len(points) == 2 and 0 < points[0] < points[1] < 6
    x = torch.randn(2, 3, 32, 64)
    with torch.no_grad():
        ref = forward_tokens(bb, x, [1, 4, 5], norm=True)
        assert place_backbone(bb, ["cpu", "cpu"], [4]) == [0, 4]
        assert all(len(blk._forward_pre_hooks) == 1 for blk in bb.model.blocks)
        split = forward_tokens(bb, x, [1, 4, 5], norm=True)
    assert all(torch.equal(a, b) for a, b in zip(ref, split))
    with pytest.raises(ValueError, match="increasing block indices in 1..5"):
        place_backbone(bb, ["cpu", "cpu"], [6])


@pytest.mark.slow
def test_devices_cpu_cpu_store_equals_single_device_bit_for_bit(tmp_path):
    write_data(tmp_path / "data", 3)
    one = cli(tmp_path, "--out", str(tmp_path / "one.zarr"), "--device", "cpu")
    two = cli(tmp_path, "--out", str(tmp_path / "two.zarr"), "--devices", "cpu,cpu")
    assert one.exit_code == 0 and two.exit_code == 0, two.output
    assert "backbone split: blocks 0..0 on cpu, blocks 1..1 on cpu" in two.output
    assert_same_arrays(tmp_path / "one.zarr", tmp_path / "two.zarr")
    bad = cli(tmp_path, "--out", str(tmp_path / "x.zarr"), "--devices", "cpu,cpu", "--split-at", "1,2")
    assert bad.exit_code == 2 and "split_at" in bad.output
    mixed = cli(tmp_path, "--out", str(tmp_path / "x.zarr"), "--devices", "cpu,meta")
    assert mixed.exit_code == 2 and "not a cpu or cuda device" in mixed.output
