"""The fingerprint record: new fingerprints are byte for byte the JSON written before the record existed (fixtures
captured from that code), JSON round trips, the diff names every difference, the test-cache relaxation and the
settings a test cache inherits, and the store's weights path."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import timm

import biomass_cache
from biomass_cache.backbone.vit import create_backbone
from biomass_cache.store.fingerprint import (PRECISION_KEYS, Fingerprint, diff, inherited_settings, of_extraction,
                                             of_lora, of_prefix_cache, reduced, relaxed_diff, root)
from biomass_cache.common.errors import FingerprintError
from biomass_cache.lora import LoraSettings, lora_fingerprint
from biomass_cache.store.layout import create_store, open_store
from biomass_cache.common.errors import StoreError
from biomass_cache.backbone.views import ViewPolicy
from toys import EXTRACT_TINY as TINY
from toys import config
from toys import store_spec as spec

NAME = "vit_small_patch16_dinov3"
# Captured from the code before fingerprint.py (extract.make_fingerprint, lora_fingerprint, build_prefix_cache);
# BACKBONE, POLICY and VERSION stand for the parts that follow timm, ViewPolicy's defaults and the package version.
BACKBONE = ('{"name": "vit_small_patch16_dinov3", "weights_sha256": "random", "random_seed": 3, "overrides": '
            '{"depth": 2, "embed_dim": 32, "num_heads": 2}, "embed_dim": 32, "depth": 2, "patch_size": 16, '
            '"n_prefix": 5, "timm_version": TIMM}')
TODAY = {
    "extract": '{"backbone": BACKBONE, "size": [64, 32], "grid": [2, 4], "layers": [0, 1], "norm": true, '
               '"storage_dtype": "float16", "prefix": true, "split": "train", "n_views": 3, "policy": POLICY, '
               '"seed": 3, "compute": "float32", "version": VERSION}',
    "extract_tiled": '{"backbone": BACKBONE, "size": [64, 32], "grid": [2, 4], "tiles": 2, "layers": [1], '
                     '"norm": false, "storage_dtype": "int8", "prefix": false, "split": "test", "n_views": 4, '
                     '"policy": POLICY, "seed": 5, "compute": "float16-autocast", "version": VERSION}',
    "lora": '{"kind": "lora", "backbone": BACKBONE, "size": [64, 32], "layers": [0, 1], "norm": true, '
            '"view_seed": 0, "policy": POLICY, "adapted_blocks": [1]}',
    "lora_tiled": '{"kind": "lora", "backbone": BACKBONE, "size": [64, 32], "tiles": 2, "layers": [0, 1], '
                  '"norm": true, "view_seed": 0, "policy": POLICY, "adapted_blocks": [1]}',
    "prefix": '{"kind": "lora_prefix", "backbone": BACKBONE, "size": [64, 32], "block": 1, "view_seed": 0, '
              '"policy": POLICY}',
}


def today(name: str) -> str:
    return (TODAY[name].replace("BACKBONE", BACKBONE).replace("TIMM", json.dumps(timm.__version__))
            .replace("POLICY", json.dumps(json.loads(json.dumps(ViewPolicy().to_dict()))))
            .replace("VERSION", json.dumps(biomass_cache.__version__)))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Fingerprint]:
    tmp = tmp_path_factory.mktemp("fp")
    bb = create_backbone(NAME, seed=3, overrides=TINY)
    s = LoraSettings(backbone=NAME, weights="random", overrides=TINY, size=(64, 32), layers=[0, 1], blocks=1, rank=4)
    tiled = config(tmp, tiles=2, split="test", views=4, dtype="int8", store_prefix=False, norm=False, seed=5)
    return {"extract": of_extraction(config(tmp), bb, [0, 1], (2, 4), "fp32"),
            "extract_tiled": of_extraction(tiled, bb, [1], (2, 4), "fp16"),
            "lora": of_lora(bb, s, [0, 1], [1]),
            "lora_tiled": of_lora(bb, replace(s, tiles=2), [0, 1], [1]),
            "prefix": of_prefix_cache(bb, s, 1)}


@pytest.mark.parametrize("name", list(TODAY))
def test_json_is_todays_byte_for_byte_and_round_trips(built, name):
    stored = built[name].to_dict()
    assert json.dumps(stored) == today(name)  # key order included: zarr.json and config.json keep their bytes
    assert Fingerprint.from_dict(json.loads(today(name))) == built[name]
    assert json.dumps(Fingerprint.from_dict(stored).to_dict()) == today(name)


def test_lora_fingerprint_resolves_layers_and_blocks(built):
    bb = create_backbone(NAME, seed=3, overrides=TINY)
    s = LoraSettings(backbone=NAME, weights="random", overrides=TINY, size=(64, 32), layers=[0, 1], blocks=1, rank=4)
    assert json.dumps(lora_fingerprint(bb, s)) == today("lora")


def test_older_stores_without_tiles_or_compute_read_back_as_they_are(built):
    old = json.loads(today("extract"))
    del old["compute"]  # a store from before the compute precision was recorded
    record = Fingerprint.from_dict(old)
    assert record.compute is None and record.tiles == 1 and record.to_dict() == old
    assert list(record.to_dict()) == list(old)
    assert diff(old, built["extract"]) == ['compute: <missing> -> "float32"']


def test_from_dict_refuses_what_it_cannot_read():
    with pytest.raises(FingerprintError, match=r"unknown fingerprint keys \['colour'\]"):
        Fingerprint.from_dict({"size": [64, 32], "colour": "red"})
    with pytest.raises(FingerprintError, match="unknown fingerprint kind 'lora2'"):
        Fingerprint.from_dict({"kind": "lora2"})
    with pytest.raises(FingerprintError, match="a fingerprint is a JSON object, got list"):
        Fingerprint.from_dict([1])


def test_diff_names_every_difference():
    old = {"layers": [3, 5], "backbone": {"name": "a", "weights_sha256": "random", "depth": 2}, "size": (960, 480),
           "norm": True, "split": "train"}
    new = {"layers": [3, 6], "backbone": {"name": "b", "weights_sha256": "random", "patch_size": 16},
           "size": [960, 480], "seed": 1, "split": {"a": 1}}
    assert diff(old, new) == ['backbone.depth: 2 -> <missing>', 'backbone.name: "a" -> "b"',
                              "backbone.patch_size: <missing> -> 16", "layers: [3, 5] -> [3, 6]",
                              "norm: true -> <missing>", "seed: <missing> -> 1", 'split: "train" -> {"a": 1}']
    assert diff(old, old) == [] and diff(old, dict(old, size=[960, 480])) == []  # a tuple equals its list
    record = Fingerprint(size=(64, 32), layers=(0, 1), tiles=2)
    assert diff(record, {"size": [64, 32], "layers": [0, 1]}) == ["tiles: 2 -> <missing>"]
    assert diff(record, replace(record, tiles=1, norm=False)) == ["norm: <missing> -> false", "tiles: 2 -> <missing>"]
    with pytest.raises(FingerprintError, match="JSON-serialisable"):
        diff({"a": float("nan")}, {})


def test_test_cache_relaxation(built):
    trained = built["extract"].to_dict()
    test = replace(built["extract"], split="test", n_views=4)
    assert diff(trained, test) == ['n_views: 3 -> 4', 'split: "train" -> "test"']
    assert relaxed_diff(trained, test) == []
    half = replace(test, compute="float16-autocast", seed=4)
    assert relaxed_diff(trained, half) == ['compute: "float32" -> "float16-autocast"', "seed: 3 -> 4"]
    assert relaxed_diff(trained, half, PRECISION_KEYS) == ["seed: 3 -> 4"]
    # a reduced store chains its parent's: relaxed at every level, the reduction itself compared in full
    settings = {"method": "pca-layernorm", "dim": 4, "pool": 2, "projection_sha256": "ab"}
    chain = reduced(trained, settings)
    assert chain == {"parent": trained, "reduce": settings} and root(chain) == trained and root(trained) == trained
    assert relaxed_diff(chain, reduced(half.to_dict(), settings), PRECISION_KEYS) == ["parent.seed: 3 -> 4"]
    assert relaxed_diff(chain, reduced(test.to_dict(), dict(settings, dim=8))) == ["reduce.dim: 4 -> 8"]


def test_inherited_settings(built):
    fp = built["extract_tiled"].to_dict()
    settings = inherited_settings(reduced(fp, {"method": "pca-layernorm"}))  # a reduced store: the extraction's
    assert settings == {"size": [64, 32], "layers": [1], "norm": False, "dtype": "int8", "store_prefix": False,
                        "policy": fp["policy"], "seed": 5, "backbone": NAME, "overrides": TINY,
                        "weights_sha256": "random", "precision": "fp16", "tiles": 2}
    assert "tiles" not in inherited_settings(built["extract"].to_dict())  # absent = 1: the settings of before tiling
    old = dict(fp)
    del old["compute"]
    with pytest.raises(FingerprintError, match=r"lacks the field\(s\) \['compute'\]"):
        inherited_settings(old)
    with pytest.raises(FingerprintError, match=r"lacks the field\(s\) \['backbone.name'\]"):
        inherited_settings(dict(fp, backbone={"weights_sha256": "random"}))
    with pytest.raises(FingerprintError, match="unknown compute precision 'float8'"):
        inherited_settings(dict(fp, compute="float8"))


def test_store_weights_path(tmp_path):
    store = create_store(tmp_path / "s.zarr", spec())
    assert store.weights_path is None and "weights_path" not in store.attrs  # older stores: not recorded
    assert store.record_weights_path(None, write=False) and "weights_path" not in store.attrs
    assert store.record_weights_path("/w/a.safetensors")
    assert not store.record_weights_path("/w/a.safetensors")  # unchanged: no write
    assert open_store(store.path).weights_path == "/w/a.safetensors"
    assert open_store(store.path).record_weights_path("/w/b.safetensors", write=False)
    with pytest.raises(StoreError, match="read-only"):
        open_store(store.path).record_weights_path("/w/b.safetensors")
    assert open_store(store.path).weights_path == "/w/a.safetensors"


def test_a_store_of_todays_main_resumes_under_the_built_record(tmp_path, built):
    store = create_store(tmp_path / "old.zarr", replace(spec(), fingerprint=json.loads(today("extract"))))
    open_store(store.path).check_fingerprint(built["extract"])  # resumed and grown: equal
    with pytest.raises(StoreError, match=r"different configuration: seed: 3 -> 4 \(use --overwrite"):
        open_store(store.path).check_fingerprint(replace(built["extract"], seed=4))
