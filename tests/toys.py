"""Toy data shared by the tests: a signal-carrying token store, a Kaggle-format photo folder, extraction settings,
store specs and crafted image files. Fixtures live in conftest.py; these are the plain builders they and the tests
call with their own sizes."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from biomass_cache.extract.config import ExtractConfig
from biomass_cache.store.layout import StoreSpec, create_store
from biomass_cache.common.targets import TARGETS, to_density

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_VIT = dict(depth=2, embed_dim=64, num_heads=2)  # the tiny random DINOv3 of conftest's `pipeline`


# ------------------------------------------------------------------ a token store whose tokens carry the targets
GRID, CHANNELS, LAYERS, VIEWS = (8, 4), 16, [3, 7], 2


def make_toy(root: Path, n: int = 24, seed: int = 0, extra_store_ids: int = 0, done: bool = True
             ) -> tuple[Path, Path]:
    """A Kaggle-format train.csv and a token store whose tokens carry the targets (channel j of every token ~
    component j's density + noise), so a head can learn from them; returns (data_dir, store_path)."""
    rng = np.random.default_rng(seed)
    ids = [f"ID{1000000 + k}" for k in range(n)]
    comps = rng.gamma(2.0, [4.0, 6.0, 12.0], size=(n, 3))  # grams of clover, dead, green
    comps[rng.random(n) < 0.2, 0] = 0.0
    five = np.column_stack([comps, comps[:, 0] + comps[:, 2], comps.sum(1)])
    states = np.array(["Tas", "Vic", "NSW", "WA"])[np.arange(n) % 4]
    dates = [f"2015/{1 + (k // 4) % 6}/{1 + k % 3}" for k in range(n)]  # 18 (date, State) groups
    rows = []
    for k, iid in enumerate(ids):
        for t in sorted(TARGETS):
            rows.append(dict(sample_id=f"{iid}__{t}", image_path=f"train/{iid}.jpg", Sampling_Date=dates[k],
                             State=states[k], Species="Ryegrass_Clover", Pre_GSHH_NDVI=round(0.3 + 0.01 * k, 3),
                             Height_Ave_cm=round(2 + five[k, 4] / 10, 2), target_name=t,
                             target=round(float(five[k, TARGETS.index(t)]), 4)))
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(data / "train.csv", index=False)

    store_ids = ids + [f"ID{2000000 + k}" for k in range(extra_store_ids)]
    spec = StoreSpec(image_ids=store_ids, n_views=VIEWS, layers=LAYERS, grid=GRID, channels=CHANNELS,
                     fingerprint={"backbone": "toy", "weights_sha256": "random", "seed": seed})
    store = create_store(root / "train.zarr", spec)
    density = to_density(comps) / 100.0
    for i in range(len(store_ids) if done else n // 2):
        x = rng.normal(0, 0.3, size=(VIEWS, len(LAYERS), GRID[0] * GRID[1], CHANNELS)).astype(np.float32)
        if i < n:
            x[..., :3] += density[i]
        store.write_image(i, x)
    return data, root / "train.zarr"


# ----------------------------------------------------------------------- photos and extraction settings
EXTRACT_TINY = dict(depth=2, embed_dim=32, num_heads=2)  # a tiny random DINOv3 for extraction tests


def write_data(folder: Path, n: int, seed: int = 0, split: str = "train") -> list[str]:
    """A tiny Kaggle-format folder: `{split}.csv` in long format and random JPEGs of varied sizes."""
    rng = np.random.default_rng(seed)
    (folder / split).mkdir(parents=True, exist_ok=True)
    rows, ids = [], [f"ID{1000 + k}" for k in range(n)]
    for k, image_id in enumerate(ids):
        pixels = rng.integers(0, 256, (40 + 4 * k, 90 + 2 * k, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / split / f"{image_id}.jpg", quality=90)
        for t in TARGETS:
            row = {"sample_id": f"{image_id}__{t}", "image_path": f"{split}/{image_id}.jpg", "target_name": t}
            if split == "train":
                row |= {"Sampling_Date": "2015/9/4", "State": "Tas", "Species": "Ryegrass",
                        "Pre_GSHH_NDVI": 0.6, "Height_Ave_cm": 4.0, "target": float(rng.uniform(0, 50))}
            rows.append(row)
    pd.DataFrame(rows).to_csv(folder / f"{split}.csv", index=False)
    return ids


def config(tmp_path: Path, **kw) -> ExtractConfig:
    base = dict(data_dir=tmp_path / "data", out=tmp_path / "tokens.zarr", size=(64, 32), layers=[0, 1], views=3,
                batch_size=6, num_workers=0, overrides=EXTRACT_TINY, seed=3)
    return ExtractConfig(**(base | kw))


def raw(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store as stored (bit-level comparisons)."""
    group = zarr.open_group(path, mode="r")
    return {name: arr[:] for name, arr in group.arrays()}


def assert_same_arrays(a: Path, b: Path) -> None:
    ra, rb = raw(a), raw(b)
    assert ra.keys() == rb.keys()
    for name in ra:
        np.testing.assert_array_equal(ra[name], rb[name], err_msg=name)


def cfg_json(cfg: ExtractConfig) -> dict:
    """An ExtractConfig as JSON, for a subprocess or a torchrun config file."""
    return {"data_dir": str(cfg.data_dir), "out": str(cfg.out), "size": list(cfg.size), "layers": cfg.layers,
            "views": cfg.views, "batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
            "overrides": cfg.overrides, "seed": cfg.seed}


# ---------------------------------------------------------------------------- store specs and raw shards
STORE_LAYERS = [2, 5, 7]
STORE_GRID = (3, 4)
STORE_C = 16
STORE_FP = {"backbone": {"name": "vit_tiny", "weights_sha256": "random"}, "layers": STORE_LAYERS, "size": [64, 48]}


def store_spec(n=3, views=2, dtype="float16", n_prefix=0, **kw) -> StoreSpec:
    """A small store of `n` images (the store's own tests: layers 2, 5, 7 of a 3 x 4 grid, 16 channels)."""
    return StoreSpec(image_ids=[f"ID{k}" for k in range(n)], n_views=views, layers=list(STORE_LAYERS),
                     grid=STORE_GRID, channels=STORE_C, fingerprint=STORE_FP, dtype=dtype, n_prefix=n_prefix, **kw)


def store_tokens(*lead: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """Seeded tokens of shape (*lead, layers, grid cells, channels) for `store_spec` stores."""
    rng = np.random.default_rng(seed)
    shape = (*lead, len(STORE_LAYERS), STORE_GRID[0] * STORE_GRID[1], STORE_C)
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def chunk_offset(s, name: str, shard: bytes, view: int, layer: int) -> int:
    """Byte offset of inner chunk (view, layer) in a shard, from its index (Zarr v3 sharding spec)."""
    g = s._geometry[name]
    n = int(np.prod(g.grid)) * 16
    raw = shard[:n] if g.index_at_start else shard[-n - 4: -4]
    index = np.frombuffer(raw, "<u8").reshape(*g.grid, 2)
    return int(index[0, view % g.views_per_shard, layer, 0, 0, 0])


# ------------------------------------------------------------------------------------- crafted image files
def huge_jpeg(path: Path, w: int, h: int) -> None:
    """A small JPEG whose header announces w x h (PIL reads the size from the SOF marker)."""
    Image.new("RGB", (16, 8)).save(path, quality=90)
    raw = bytearray(path.read_bytes())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5: sof + 9] = struct.pack(">HH", h, w)
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------- a real headless browser
def chromium() -> str:
    """The headless browser's executable: Debian's chromium (.ci/run installs it); skipped elsewhere, never in CI."""
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (CI installs it)")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (apt-get install chromium): .ci/run does")
        pytest.skip("no chromium here (apt-get install chromium)")
    return path


def open_in_browser(html: Path, screenshot: Path) -> dict:
    """Load the page from disk; what the browser saw: console errors, failed requests, images, text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors, failed = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto(html.resolve().as_uri())
        seen = {"errors": errors, "failed": failed, "text": page.inner_text("body"),
                "images": page.evaluate("Array.from(document.images).map(i => [i.id, i.complete && "
                                        "i.naturalWidth > 0, i.src.slice(0, 22)])"),
                "score": page.inner_text("#score") if page.query_selector("#score") else ""}
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    return seen
