"""The reduced store written in the extraction pass (extract/inpass.py) against `extract` + `reduce`: the same tokens
within float rounding, the same fingerprint semantics, the resumes after a kill in either phase, `--like` for a test
cache, `--keep-full`, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from biomass_cache.cli.errors import script_app
from biomass_cache.cli.extract import extract_command
from biomass_cache.common.errors import DataError
from biomass_cache.extract import inpass
from biomass_cache.extract.pipeline import extract
from biomass_cache.store.fingerprint import reduced
from biomass_cache.store.layout import open_store
from biomass_cache.store.reduce import Reduction, fit_reduction, reduce_store
from toys import config, write_data

TOLERANCE = 2e-3  # relative RMS: the reduced tokens are stored in float16 (relative rounding up to 4.9e-4)
REDUCE = dict(reduce=True, dim=8, pool=2)


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


def tokens(path) -> np.ndarray:
    store = open_store(path)
    return np.stack([[store.read(i, v) for v in range(store.n_views)] for i in range(len(store.image_ids))])


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory):
    """The same training images extracted + reduced (the two commands) and reduced in the pass."""
    root = tmp_path_factory.mktemp("inpass")
    write_data(root / "data", 6)
    write_data(root / "data", 3, seed=1, split="test")
    base = dict(size=(128, 64))
    extract(config(root, out=root / "full.zarr", **base), progress=False)
    full = open_store(root / "full.zarr")
    red = fit_reduction(full, dim=8, pool=2, progress=False)
    reduce_store(full, red, root / "two_steps.zarr", progress=False)
    summary = extract(config(root, out=root / "inpass.zarr", **base, **REDUCE), progress=False)
    return root, base, summary


def test_in_pass_equals_extract_then_reduce(two_ways):
    root, _, summary = two_ways
    a, b = open_store(root / "inpass.zarr"), open_store(root / "two_steps.zarr")
    assert rel_rms(tokens(a.path), tokens(b.path)) < TOLERANCE
    ra, rb = Reduction.of_store(a), Reduction.of_store(b)
    assert rel_rms(ra.components, rb.components) < TOLERANCE and ra.parent_fingerprint == rb.parent_fingerprint
    # the same fingerprint semantics: the extraction's chained with the reduction's settings
    assert a.fingerprint == reduced(open_store(root / "full.zarr").fingerprint, ra.settings())
    assert (a.grid, a.channels, a.n_views, a.image_ids) == (b.grid, b.channels, b.n_views, b.image_ids)
    assert a.content_hashes == b.content_hashes and a.done().all()
    assert not inpass.fit_store_path(root / "inpass.zarr").exists()  # the side store is gone
    assert summary["views_extracted"] == 6 + 6 * 2  # phase one: the clean views; phase two: two augmented ones
    assert a.nbytes_on_disk() < open_store(root / "full.zarr").nbytes_on_disk() / 4


def test_a_test_cache_with_like_equals_reduce_like(two_ways):
    root, base, _ = two_ways
    extract(config(root, split="test", views=2, out=root / "test_full.zarr", **base), progress=False)
    red = Reduction.of_store(open_store(root / "inpass.zarr"))
    reduce_store(open_store(root / "test_full.zarr"), red, root / "test_two.zarr", progress=False)
    summary = extract(config(root, split="test", views=2, out=root / "test_inpass.zarr", like=root / "inpass.zarr",
                             **base, **REDUCE), progress=False)
    assert summary["views_extracted"] == 3 * 2  # no phase one
    assert rel_rms(tokens(root / "test_inpass.zarr"), tokens(root / "test_two.zarr")) < TOLERANCE
    assert open_store(root / "test_inpass.zarr").fingerprint == open_store(root / "test_two.zarr").fingerprint


def killed_after_two_images(monkeypatch, sink: type, cfg) -> None:
    """Run the extraction of `cfg` until `sink` has taken two images, then stop it as Ctrl-C would."""
    original, calls = sink.samples, []

    def dies(self, item, tokens, prefix):
        calls.append(item.image_id)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return original(self, item, tokens, prefix)

    with monkeypatch.context() as m:
        m.setattr(sink, "samples", dies)
        with pytest.raises(KeyboardInterrupt):
            extract(cfg, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("phase", [1, 1.5, 2])
def test_a_kill_in_either_phase_or_between_resumes(two_ways, tmp_path, monkeypatch, phase):
    """Killed in phase one (after 2 clean views), after it (the projection fitted, the reduced store not made) or
    in phase two (after 2 images): the rerun does only what is missing and gives the uninterrupted store; in phase
    two the projection is not fitted again."""
    root, base, _ = two_ways
    out = tmp_path / "r.zarr"
    cfg = config(root, out=out, **base, **REDUCE)
    if phase == 1.5:
        with monkeypatch.context() as m:
            m.setattr(inpass, "reduced_spec", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                extract(cfg, progress=False)
    else:
        killed_after_two_images(monkeypatch, inpass.CleanSink if phase == 1 else inpass.ReducedSink, cfg)
    assert inpass.fit_store_path(out).exists() and out.exists() == (phase == 2)
    if phase == 2:
        sha = Reduction.of_store(open_store(out)).sha256
        monkeypatch.setattr(inpass, "fit_pca", lambda *a, **k: pytest.fail("fitted again"))
    summary = extract(cfg, progress=False)
    assert summary["already_done"] == (2 * 3 if phase == 2 else 0)
    assert summary["views_extracted"] == {1: 4 + 12, 1.5: 12, 2: 12 - 4}[phase]
    assert np.array_equal(tokens(out), tokens(root / "inpass.zarr"))
    assert phase != 2 or Reduction.of_store(open_store(out)).sha256 == sha
    assert not inpass.fit_store_path(out).exists()


@pytest.mark.slow
def test_keep_full_writes_both_stores(two_ways, tmp_path):
    root, base, _ = two_ways
    extract(config(root, out=tmp_path / "r.zarr", keep_full=tmp_path / "f.zarr", **base, **REDUCE), progress=False)
    assert np.array_equal(tokens(tmp_path / "f.zarr"), tokens(root / "full.zarr"))
    assert open_store(tmp_path / "f.zarr").fingerprint == open_store(root / "full.zarr").fingerprint
    assert np.array_equal(tokens(tmp_path / "r.zarr"), tokens(root / "inpass.zarr"))


def cli(*args) -> object:
    return CliRunner().invoke(script_app(extract_command), [str(a) for a in args])


@pytest.mark.parametrize("flags, message", [
    (["--dim", "999"], "--dim 999: must be between 1 and the 384 channels"),
    (["--pool", "3"], "--pool 3: must be >= 1 and divide the patch grid [4, 8]"),
    (["--like", "nowhere.zarr"], "nowhere.zarr"),
])
def test_bad_settings_are_refused_before_any_forward(two_ways, tmp_path, flags, message):
    root, _, _ = two_ways
    result = cli("--data", root / "data", "--out", tmp_path / "r.zarr", "--size", "128x64", "--layers", "0,1",
                 "--weights", "random", "--reduce", *flags)
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())  # nothing made


def test_refusals(two_ways, tmp_path):
    root, base, _ = two_ways
    with pytest.raises(DataError, match="another configuration than the store the projection was fitted on"):
        extract(config(root, out=tmp_path / "x.zarr", like=root / "inpass.zarr", **(base | {"seed": 4}), **REDUCE),
                progress=False)
    with pytest.raises(DataError, match="a store of full tokens, not a reduced one"):
        extract(config(root, out=root / "full.zarr", **base, **REDUCE), progress=False)
    with pytest.raises(DataError, match="holds 8 channels pooled 2 x 2; resume it with --dim 8 --pool 2"):
        extract(config(root, out=root / "inpass.zarr", **(base | REDUCE | {"dim": 4})), progress=False)
    with pytest.raises(DataError, match="need reduce"):
        config(root, like=root / "inpass.zarr")
    for out in ("out", "keep_full"):  # a test extraction that would write over the training store
        with pytest.raises(DataError, match="out and keep_full must be other stores"):
            config(root, **{"out": tmp_path / "t.zarr", out: root / "inpass.zarr"}, like=root / "inpass.zarr",
                   **REDUCE)
    result = cli("--data", root / "data", "--out", tmp_path / "r.zarr", "--dim", "8", "--pool", "2")
    assert result.exit_code == 2 and "--dim, --pool: settings of the reduction in the pass, which needs --reduce" \
        in result.output and "Traceback" not in result.output, result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_side_store_of_other_settings_is_kept_and_its_deletion_is_whole(two_ways, tmp_path, monkeypatch):
    """Phase one killed: a rerun with other settings is refused and leaves the clean views as they are (a typo
    costs nothing), the same settings resume; a kill while the finished side store is deleted leaves a leftover that
    the next run removes, never a half-deleted store at the side store's name."""
    import shutil

    from biomass_cache.store import layout

    root, base, _ = two_ways
    out = tmp_path / "r.zarr"
    side = inpass.fit_store_path(out)
    killed_after_two_images(monkeypatch, inpass.CleanSink, config(root, out=out, **base, **REDUCE))
    before = open_store(side).done().copy()
    for other, message in (({"pool": 1}, "holds the clean views of another --reduce extraction .interrupted, or "
                            "running. with other settings"), ({"pool": 3}, "--pool 3: must be >= 1 and divide")):
        with pytest.raises(DataError, match=message):
            extract(config(root, out=out, **base, **(REDUCE | other)), progress=False)
        assert np.array_equal(open_store(side).done(), before)
    deleting = shutil.rmtree

    def killed(path, *args, **kwargs):
        if ".fit.zarr.old-" in str(path):
            raise KeyboardInterrupt
        deleting(path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(layout.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            extract(config(root, out=out, **base, **REDUCE), progress=False)
    assert not side.exists() and len(list(tmp_path.glob(f".{side.name}.old-*"))) == 1
    assert np.array_equal(tokens(out), tokens(root / "inpass.zarr"))
    extract(config(root, out=out, **base, **REDUCE), progress=False)  # nothing to do; the leftover goes
    assert not list(tmp_path.glob(f".{side.name}.*"))


@pytest.mark.slow
@pytest.mark.parametrize("phase", [1, 2])
def test_a_full_disk_in_either_phase_is_one_line_and_resumes(two_ways, tmp_path, monkeypatch, phase):
    import errno

    from biomass_cache.store.handle import TokenStore

    root, _, _ = two_ways
    out = tmp_path / "r.zarr"
    target = inpass.fit_store_path(out) if phase == 1 else out
    original = TokenStore.write_encoded

    def full(self, sample):
        if self.path == target and sample.index == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, sample)

    args = ("--data", root / "data", "--out", out, "--size", "128x64", "--layers", "0,1", "--views", "3", "--seed",
            "3", "--batch-size", "6", "--workers", "0", "--reduce", "--dim", "8", "--pool", "2")
    with monkeypatch.context() as m:
        m.setattr(TokenStore, "write_encoded", full)
        result = cli(*args, "--config", config_file(tmp_path))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {out}: the disk is full: free space or write elsewhere"
    assert cli(*args, "--config", config_file(tmp_path)).exit_code == 0
    assert np.array_equal(tokens(out), tokens(root / "inpass.zarr"))


def config_file(folder):
    """The tiny backbone of toys.config, which no flag sets."""
    path = folder / "tiny.toml"
    path.write_text("[extract]\noverrides = { depth = 2, embed_dim = 32, num_heads = 2 }\nweights = \"random\"\n")
    return path


@pytest.mark.slow
def test_a_photo_changed_between_the_phases_is_not_taken_from_the_side_store(two_ways, tmp_path, monkeypatch):
    """Killed in phase two; a photo not written yet changes; the resumed run extracts its clean view anew (the
    side store's is of the old photo) and gives what a fresh run on the changed photos gives."""
    import shutil

    from PIL import Image

    root, base, _ = two_ways
    data = tmp_path / "data"
    shutil.copytree(root / "data", data)
    cfg = config(tmp_path, out=tmp_path / "r.zarr", **base, **REDUCE)
    killed_after_two_images(monkeypatch, inpass.ReducedSink, cfg)
    last = sorted((data / "train").iterdir())[-1]
    Image.fromarray(np.full((48, 96, 3), (200, 30, 30), np.uint8)).save(last)  # another photo, same id
    extract(cfg, progress=False)
    extract(config(tmp_path, out=tmp_path / "full.zarr", **base), progress=False)  # the changed photos' tokens
    k = open_store(tmp_path / "r.zarr").image_ids.index(last.stem)
    red = Reduction.of_store(open_store(tmp_path / "r.zarr"))
    expected = red.apply(torch.from_numpy(open_store(tmp_path / "full.zarr").read(k, 0))).numpy()
    np.testing.assert_allclose(tokens(tmp_path / "r.zarr")[k, 0], expected, rtol=0, atol=0.02)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_in_pass_equals_extract_then_reduce_for_other_dtypes(tmp_path, dtype):
    """The side store keeps the clean views in float16 whatever the dtype, and the two-step reduction rounds them
    alike (store/reduce.py `norm_pool`): the same fit, so the same tokens bit for bit and the same fingerprint.
    (Before, a bfloat16 store's differed by 0.4 % (relative RMS), an int8 one's by 3 %.)"""
    write_data(tmp_path / "data", 6)
    base = dict(size=(128, 64), dtype=dtype)
    extract(config(tmp_path, out=tmp_path / "full.zarr", **base), progress=False)
    full = open_store(tmp_path / "full.zarr")
    reduce_store(full, fit_reduction(full, dim=8, pool=2, progress=False), tmp_path / "two.zarr", progress=False)
    extract(config(tmp_path, out=tmp_path / "inpass.zarr", **base, **REDUCE), progress=False)
    a, b = open_store(tmp_path / "inpass.zarr"), open_store(tmp_path / "two.zarr")
    assert np.array_equal(tokens(a.path), tokens(b.path)) and a.fingerprint == b.fingerprint


def test_an_earlier_versions_bfloat16_side_store_is_refused(two_ways, tmp_path):
    """Clean views kept in bfloat16 (as before) would make a store that is not extract + reduce bit for bit."""
    from biomass_cache.store.layout import StoreSpec, create_store

    root, base, _ = two_ways
    out = tmp_path / "r.zarr"
    create_store(inpass.fit_store_path(out), StoreSpec(image_ids=["a"], n_views=1, layers=[0, 1], grid=(2, 4),
                                                       channels=32, fingerprint={"x": 1}, dtype="bfloat16",
                                                       random_weights=True))
    with pytest.raises(DataError, match="kept in bfloat16 by an earlier version, not float16"):
        extract(config(root, out=out, **base, **REDUCE), progress=False)
    assert not out.exists()
