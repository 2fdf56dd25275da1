"""Tiled extraction (--tiles): each side-by-side piece of a view goes through the backbone alone and the pieces'
token grids are stitched into the whole view's grid; tiles are in the fingerprint (absent = 1), test caches follow
the training store's tiles, and the LoRA path's live backbone tiles the same way."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from biomass_cache.backbone.vit import create_backbone, forward_tokens, split_tiles, stitch_tiles
from biomass_cache.cli import app
from biomass_cache.common.errors import DataError
from biomass_cache.submit.members import _extract_settings
from biomass_cache.submit.spec import EnsembleSpec, Member
from biomass_cache.extract.pipeline import extract
from biomass_cache.extract.config import ExtractConfig
from biomass_cache.store.fingerprint import of_extraction
from biomass_cache.store.layout import open_store
from biomass_cache.common.errors import StoreError
from biomass_cache.backbone.views import ViewPolicy, load_photo, make_view
from toys import EXTRACT_TINY as TINY
from toys import config, write_data

NAME = "vit_small_patch16_dinov3"
N_PREFIX = 5  # CLS + 4 registers


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A weights file of the tiny random backbone whose attention mixes the whole view: DINOv3's random init has
    layer scale 1e-5 and near-uniform attention, so its tokens hardly depend on the other patches and a test
    could not tell a tiled forward from an untiled one."""
    bb = create_backbone(NAME, seed=3, overrides=TINY)
    with torch.no_grad():
        for blk in bb.model.blocks:
            blk.attn.qkv.weight.mul_(30.0)
            blk.gamma_1.fill_(1.0)
            blk.gamma_2.fill_(1.0)
    path = tmp_path_factory.mktemp("weights") / "mixing.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return str(path)


def halves(x: torch.Tensor, layers: list[int], weights: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens (L, T, C), prefix (L, P, C)) of the left and the right half of the view `x`, each run alone."""
    bb = create_backbone(NAME, weights, overrides=TINY)
    w = x.shape[-1]
    out = []
    for half in (x[..., : w // 2], x[..., w // 2:]):
        with torch.inference_mode():
            tokens, prefix = forward_tokens(bb, half[None], layers, norm=True)
        out.append((tokens[0].numpy(), prefix[0].numpy()))
    return out


def as_grid(tokens: np.ndarray, rows: int) -> np.ndarray:
    """(L, rows * cols, C) -> (L, rows, cols, C)."""
    return tokens.reshape(tokens.shape[0], rows, -1, tokens.shape[-1])


def test_split_and_stitch_by_hand():
    images = torch.arange(2 * 3 * 2 * 8, dtype=torch.float32).reshape(2, 3, 2, 8)
    pieces = split_tiles(images, 2)
    assert pieces.shape == (4, 3, 2, 4)
    assert torch.equal(pieces[0], images[0, :, :, :4]) and torch.equal(pieces[1], images[1, :, :, :4])
    assert torch.equal(pieces[2], images[0, :, :, 4:]) and torch.equal(pieces[3], images[1, :, :, 4:])
    # tokens of 2 images x 2 tiles, 1 layer, a 2 x 2 grid per tile; the value names (image, tile, row, col)
    tokens = torch.tensor([[[[1000 * i + 100 * t + 10 * r + c] for r in range(2) for c in range(2)]]
                           for t in range(2) for i in range(2)], dtype=torch.float32)
    grid = stitch_tiles(tokens, 2, rows=2)
    assert grid.shape == (2, 1, 8, 1)
    assert grid[1, 0, :, 0].tolist() == [1000, 1001, 1100, 1101, 1010, 1011, 1110, 1111]
    assert torch.equal(stitch_tiles(tokens, 1, rows=2), tokens) and torch.equal(split_tiles(images, 1), images)


def test_one_tile_is_todays_forward_and_fingerprint(tmp_path, weights):
    bb = create_backbone(NAME, weights, overrides=TINY)
    x = torch.randn(2, 3, 32, 64)
    with torch.inference_mode():
        assert all(torch.equal(a, b) for a, b in zip(forward_tokens(bb, x, [0, 1], True, tiles=1),
                                                     forward_tokens(bb, x, [0, 1], True)))
        tiled, _ = forward_tokens(bb, x, [0, 1], True, tiles=2)
        assert not torch.allclose(tiled, forward_tokens(bb, x, [0, 1], True)[0], atol=0.1)  # attention is cut
    write_data(tmp_path / "data", 1)
    assert "tiles" not in of_extraction(config(tmp_path), bb, [0, 1], (2, 4), "fp32").to_dict()  # old stores match
    assert of_extraction(config(tmp_path, tiles=2), bb, [0, 1], (2, 4), "fp32").to_dict()["tiles"] == 2


@pytest.mark.slow
def test_cli_tiles_2_stitches_the_halves_run_alone(tmp_path, weights):
    """The contract: `biomass extract --tiles 2 --size 448x224` on a random backbone -> grid [14, 28], fingerprint
    tiles 2, view 0's stitched tokens = the tokens of each half run alone."""
    ids = write_data(tmp_path / "data", 2)
    conf = tmp_path / "tiny.toml"
    conf.write_text('[extract]\nlayers = [0, 1]\nviews = 2\nnum_workers = 0\nseed = 3\n'
                    'overrides = { depth = 2, embed_dim = 32, num_heads = 2 }\n')
    out = tmp_path / "t.zarr"
    result = CliRunner().invoke(app, ["extract", "--config", str(conf), "--data", str(tmp_path / "data"),
                                      "--out", str(out), "--size", "448x224", "--tiles", "2", "--weights", weights])
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.grid == (14, 28) and store.fingerprint["tiles"] == 2 and store.fingerprint["grid"] == [14, 28]
    assert store.fingerprint["size"] == [448, 224] and store.n_prefix == 2 * N_PREFIX
    for image_id in ids:
        i = store.image_ids.index(image_id)
        x = make_view(load_photo(tmp_path / "data" / "train" / f"{image_id}.jpg", (448, 224), ViewPolicy()),
                      image_id, 0, 3, (448, 224), ViewPolicy(), "train")
        (left, left_prefix), (right, right_prefix) = halves(x, [0, 1], weights)
        stored = as_grid(store.read(i, 0), 14)
        np.testing.assert_allclose(stored[:, :, :14], as_grid(left, 14), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(stored[:, :, 14:], as_grid(right, 14), rtol=2e-3, atol=2e-3)
        prefix = store.read_prefix(i, 0)
        np.testing.assert_allclose(prefix[:, :N_PREFIX], left_prefix, rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(prefix[:, N_PREFIX:], right_prefix, rtol=2e-3, atol=2e-3)
        with torch.inference_mode():
            whole, _ = forward_tokens(create_backbone(NAME, weights, overrides=TINY), x[None], [0, 1], norm=True)
        assert not np.allclose(stored, as_grid(whole[0].numpy(), 14), atol=0.1)  # not an untiled forward


def test_a_flip_swaps_and_mirrors_the_halves(tmp_path, weights):
    """The view is flipped whole, then cut: the flipped view's left tile is the clean view's right half, mirrored."""
    ids = write_data(tmp_path / "data", 1, split="test")
    cfg = config(tmp_path, split="test", views=2, tiles=2, weights=weights)
    extract(cfg, progress=False)
    store = open_store(cfg.out)
    image = load_photo(cfg.data_dir / "test" / f"{ids[0]}.jpg", cfg.size, cfg.policy)
    clean = make_view(image, ids[0], 0, cfg.seed, cfg.size, cfg.policy, "test")
    assert torch.equal(make_view(image, ids[0], 1, cfg.seed, cfg.size, cfg.policy, "test"), clean.flip(-1))
    (mirrored_right, _), (mirrored_left, _) = halves(clean.flip(-1), [0, 1], weights)
    flipped = as_grid(store.read(0, 1), 2)
    np.testing.assert_allclose(flipped[:, :, :2], as_grid(mirrored_right, 2), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(flipped[:, :, 2:], as_grid(mirrored_left, 2), rtol=2e-3, atol=2e-3)
    (right_alone, _) = halves(clean, [0, 1], weights)[1]
    assert not np.allclose(flipped[:, :, :2], as_grid(right_alone, 2), atol=0.1)  # mirrored, not just swapped


def test_tiles_mismatch_refused(tmp_path):
    write_data(tmp_path / "data", 2)
    extract(config(tmp_path, tiles=2), progress=False)
    with pytest.raises(StoreError, match=r"tiles: 2 -> <missing>"):
        extract(config(tmp_path), progress=False)
    with pytest.raises(StoreError, match=r"tiles: 2 -> 4"):
        extract(config(tmp_path, tiles=4), progress=False)


@pytest.mark.parametrize("size, tiles, what", [("80x32", "2", "80x32 does not split into tiles = 2"),
                                               ("64x32", "3", "64x32 does not split into tiles = 3"),
                                               ("64x32", "0", "tiles must be an integer >= 1")])
def test_a_size_that_does_not_split_is_one_error_line(tmp_path, size, tiles, what):
    write_data(tmp_path / "data", 1)
    result = CliRunner().invoke(app, ["extract", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t.zarr"),
                                      "--size", size, "--tiles", tiles])
    assert result.exit_code == 2 and result.output.startswith("error: ") and what in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "t.zarr").exists()


@pytest.mark.slow
def test_test_caches_follow_the_training_tiles(tmp_path):
    """A head trained on a tiled store gets a tiled test cache from the ensemble; an untiled store is refused."""
    import biomass_cache.submit.ensemble as ens
    from biomass_cache.train.crossval import run_training
    from biomass_cache.train.runs import check_compatible, load_head
    from biomass_cache.synth.generate import generate
    from biomass_cache.train.config import resolve

    data = tmp_path / "data"
    generate(data, n_train=12, n_test=2, seed=0, size=(128, 64), progress=False)
    common = dict(data_dir=data, backbone=NAME, size=(64, 32), layers=[0, 1], seed=0, device="cpu", num_workers=0,
                  overrides=TINY)
    extract(ExtractConfig(split="train", out=tmp_path / "train.zarr", views=2, tiles=2, **common), progress=False)
    cfg, members = resolve({}, [], dict(folds=2, epochs=1, device="cpu", workers=0, plots=False), ["density"])
    run_training(tmp_path / "train.zarr", data, tmp_path / "run", cfg, members)
    result = ens.run_ensemble(EnsembleSpec((Member(tmp_path / "run"),)), data, tmp_path / "ens",
                              progress=False)
    cache = open_store(result.caches[0])
    assert cache.fingerprint["tiles"] == 2 and cache.grid == (2, 4) and np.isfinite(result.grams).all()
    untiled = tmp_path / "test.zarr"
    extract(ExtractConfig(split="test", out=untiled, views=4, **common), progress=False)
    _, meta = load_head(tmp_path / "run" / "fold0" / "density.json")
    with pytest.raises(DataError, match=r"tiles: 2 -> <missing>"):
        check_compatible(meta, open_store(untiled))
    config_json = json.loads((tmp_path / "run" / "config.json").read_text())
    del config_json["cache"]["fingerprint"]["tiles"]  # a run from before tiling existed: its settings say nothing
    assert "tiles" not in _extract_settings(config_json, Path("config.json"))


def test_lora_live_backbone_tiles_like_extraction(weights):
    from biomass_cache.lora import LiveTokens, LoraSettings, inject_lora, lora_fingerprint

    s = LoraSettings(backbone=NAME, weights=weights, overrides=TINY, size=(64, 32), tiles=2, layers=[0, 1], blocks=1,
                     rank=4)
    bb = create_backbone(NAME, weights, overrides=TINY)
    x = torch.randn(3, 3, 32, 64)
    with torch.inference_mode():
        ref, _ = forward_tokens(bb, x, [0, 1], norm=True, tiles=2)
    inject_lora(bb, s)
    live = LiveTokens(bb, s, torch.device("cpu"))
    with torch.inference_mode():
        assert torch.equal(live({"pixels": x}), ref)  # adapters start at B = 0: the frozen tiled tokens
        assert not torch.allclose(ref, forward_tokens(bb, x, [0, 1], norm=True)[0], atol=0.1)
    assert live.grid == (2, 4) and lora_fingerprint(bb, s)["tiles"] == 2
    assert "tiles" not in lora_fingerprint(bb, replace(s, tiles=1))
    with pytest.raises(DataError, match="--lora-prefix-cache stores one hidden state per view"):
        live.check_prefix_layers()
    with pytest.raises(DataError, match="80x32 does not split into tiles = 2"):
        LiveTokens(bb, replace(s, size=(80, 32)), torch.device("cpu"))
