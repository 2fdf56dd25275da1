"""Found by trying to break it: changed photos, kills between growing and recording, a second writer, oversized
photos, corrupt finished samples, bad images fixed later, read-only re-runs, truncated shards and leftovers."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pandas as pd
import pytest
import zarr
from PIL import Image
from typer.testing import CliRunner

from biomass_cache.common.photo import load_image
from biomass_cache.common.errors import DataError
from biomass_cache.extract.pipeline import extract
from biomass_cache.store.layout import create_store, open_store
from biomass_cache.common.errors import StoreError
from biomass_cache.store.verify import verify
from biomass_cache.cli.verify import verify_command
from biomass_cache.common.lock import WriterLock
from biomass_cache.common.errors import LockedError
from toys import ROOT, assert_same_arrays, cfg_json, chunk_offset, config, huge_jpeg, write_data
from toys import store_spec as spec
from toys import store_tokens as tokens


def snapshot(path: Path) -> dict[str, tuple[str, int]]:
    """Every file under `path`: content hash and mtime (a no-op must change neither, nor add a file)."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path):
    """A finished 4-image store (3 views) and its config."""
    ids = write_data(tmp_path / "data", 4)
    cfg = config(tmp_path, batch_size=3)
    extract(cfg, progress=False)
    return cfg, ids


def fresh_copy(cfg, tmp_path: Path, name: str):
    """The same extraction from scratch into another store (what a repaired store must equal)."""
    other = config(tmp_path, data_dir=cfg.data_dir, out=tmp_path / name, batch_size=3)
    extract(other, progress=False)
    return other.out


# ---------------------------------------------------------------------------------------- 1. stale photos
@pytest.mark.slow
def test_changed_photo_is_re_extracted_alone(finished, tmp_path, capsys):
    cfg, ids = finished
    photo = cfg.data_dir / "train" / f"{ids[1]}.jpg"
    shutil.copy(cfg.data_dir / "train" / f"{ids[2]}.jpg", photo)  # another photo under the old name
    before = {p.name: p.stat().st_mtime_ns for p in (cfg.out / "tokens").iterdir()}
    summary = extract(cfg, progress=False)
    assert summary["images_extracted"] == 1 and "1 photo(s) changed" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (cfg.out / "tokens").iterdir()}
    assert [n for n in after if after[n] != before.get(n)] == ["c.1.0.0.0.0"]
    assert open_store(cfg.out).content_hashes[ids[1]] == hashlib.sha256(photo.read_bytes()).hexdigest()
    assert_same_arrays(cfg.out, fresh_copy(cfg, tmp_path, "fresh.zarr"))


@pytest.mark.slow
def test_deleted_photo_keeps_its_tokens_and_old_stores_adopt_hashes(finished):
    cfg, ids = finished
    group = zarr.open_group(cfg.out, mode="r+")
    recorded = dict(group.attrs)["content_sha256"]
    group.attrs.__delitem__("content_sha256")  # a store written before content hashes were recorded
    (cfg.data_dir / "train" / f"{ids[0]}.jpg").unlink()
    summary = extract(cfg, progress=False)
    assert summary["views_extracted"] == 0 and summary["samples_done"] == 12
    assert open_store(cfg.out).content_hashes == {**recorded, ids[0]: None}


# --------------------------------------------------------------------------- 2. growing, concurrent writers
@pytest.mark.slow
def test_kill_between_growing_and_recording_resumes(finished, tmp_path):
    cfg, ids = finished
    data = cfg.data_dir
    more = write_data(tmp_path / "more", 6)[4:]  # two more images, appended to the CSV
    for i in more:
        shutil.copy(tmp_path / "more" / "train" / f"{i}.jpg", data / "train")
    table = pd.read_csv(tmp_path / "more" / "train.csv")
    table.to_csv(data / "train.csv", index=False)
    script = f"""
import os, signal
from biomass_cache.extract.pipeline import ExtractConfig, extract
from biomass_cache.store.handle import TokenStore
real = TokenStore._set_attrs
def die_before_ids(self, **kw):
    if "image_ids" in kw:
        os.kill(os.getpid(), signal.SIGKILL)  # arrays grown, ids not recorded
    real(self, **kw)
TokenStore._set_attrs = die_before_ids
extract(ExtractConfig(**{cfg_json(cfg)!r}), progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert zarr.open_group(cfg.out, mode="r")["tokens"].shape[0] == 6  # grown ...
    store = open_store(cfg.out)  # ... but still opens, as the 4 recorded images
    assert store.image_ids == ids and store.done().shape == (4, 3)
    assert verify(cfg.out, progress=False).ok
    summary = extract(cfg, progress=False)
    assert summary["images_extracted"] == 2 and open_store(cfg.out).image_ids == ids + more
    assert_same_arrays(cfg.out, fresh_copy(cfg, tmp_path, "fresh.zarr"))


@pytest.mark.slow
def test_a_second_writer_is_refused_naming_the_holder(finished, tmp_path):
    cfg, ids = finished
    with WriterLock(cfg.out):
        with pytest.raises(LockedError, match=rf"being written by pid {os.getpid()} on "):
            extract(config(tmp_path, retry_bad=True), progress=False)
        with pytest.raises(LockedError, match="being written"):
            extract(config(tmp_path, overwrite=True), progress=False)
    assert extract(cfg, progress=False)["views_extracted"] == 0  # released: runs again


# ------------------------------------------------------------------------------ 4. decompression bombs
def _huge_png(path: Path, w: int, h: int) -> None:
    Image.new("RGB", (16, 8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", w, h)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))  # IHDR's CRC
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_oversized_photos_are_bad_images_not_crashes(tmp_path):
    ids = write_data(tmp_path / "data", 4)
    huge_jpeg(tmp_path / "data" / "train" / f"{ids[1]}.jpg", 20000, 10000)  # PIL's DecompressionBombError
    png = tmp_path / "big.png"
    _huge_png(png, 12649, 12649)  # 160 Mpx: PIL only warns, and would decode 480 MB
    for path in (tmp_path / "data" / "train" / f"{ids[1]}.jpg", png):
        with pytest.raises(DataError, match=rf"{path.name}: image too large \(.*limit is 64 Mpx"):
            load_image(path)
    with pytest.raises(DataError, match="image too large"):
        extract(config(tmp_path, batch_size=3), progress=False)
    summary = extract(config(tmp_path, skip_bad=True), progress=False)
    assert list(summary["bad_ids"]) == [ids[1]] and "too large" in summary["bad_ids"][ids[1]]
    assert summary["samples_done"] == 9


# ------------------------------------------------------------------ 5. re-checking finished samples, repair
def _flip(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_recheck_re_extracts_corrupt_and_missing_shards(finished, tmp_path, capsys):
    cfg, ids = finished
    store = open_store(cfg.out)
    shard = store.shard_path("tokens", 1, 0)
    _flip(shard, chunk_offset(store, "tokens", shard.read_bytes(), view=2, layer=1) + 7)
    store.shard_path("prefix", 3, 0).unlink()
    assert extract(cfg, progress=False)["views_extracted"] == 0  # a plain resume trusts `done`
    summary = extract(config(tmp_path, recheck=True, batch_size=3), progress=False)
    assert summary["images_extracted"] == 2 and "--recheck" in capsys.readouterr().out
    assert verify(cfg.out, progress=False).ok
    assert_same_arrays(cfg.out, fresh_copy(cfg, tmp_path, "fresh.zarr"))


@pytest.mark.slow
def test_corrupt_done_chunk_names_its_file_and_recheck_repairs_it(finished, tmp_path):
    cfg, ids = finished
    done_file = cfg.out / "done" / "c.2.0"
    _flip(done_file, 0)
    with pytest.raises(StoreError, match=r"done/c\.2\.0: `done` chunk of image 'ID1002' is corrupt .*--recheck"):
        extract(cfg, progress=False)
    summary = extract(config(tmp_path, recheck=True, batch_size=3), progress=False)
    assert summary["images_extracted"] == 1 and verify(cfg.out, progress=False).ok
    assert_same_arrays(cfg.out, fresh_copy(cfg, tmp_path, "fresh.zarr"))


@pytest.mark.slow
def test_verify_repair_then_extract(finished, tmp_path):
    cfg, ids = finished
    store = open_store(cfg.out)
    _flip(store.shard_path("tokens", 0, 0), 3)  # the shard index
    (cfg.out / "tokens" / "c.3.0.0.0.0.abc.partial").write_bytes(b"half a shard")
    result = CliRunner().invoke(_verify_app(), [str(cfg.out), "--repair"])
    assert result.exit_code == 0 and "repaired: 1 image(s) reset ['ID1000'], 1 temp file(s) deleted" in result.output
    assert "0 corrupt chunk(s)\nre-run the same `biomass extract`" in result.output
    assert result.output.strip().splitlines()[-1] == "REPAIRED"
    assert not list(cfg.out.rglob("*.partial"))
    assert open_store(cfg.out).done()[0].tolist() == [False] * 3
    assert extract(cfg, progress=False)["images_extracted"] == 1
    assert CliRunner().invoke(_verify_app(), [str(cfg.out)]).exit_code == 0


def _verify_app():
    import typer

    app = typer.Typer()
    app.command()(verify_command)
    return app


@pytest.mark.slow
def test_verify_reports_every_chunk_a_truncated_shard_lost(finished):
    cfg, _ = finished
    store = open_store(cfg.out)
    shard = store.shard_path("tokens", 2, 0)
    raw = shard.read_bytes()
    shard.write_bytes(raw[: chunk_offset(store, "tokens", raw, view=1, layer=0) + 10])  # views 1, 2 cut off
    corrupt = verify(cfg.out, progress=False).corrupt
    assert len(corrupt) == 4  # 2 views x 2 layers, each named
    assert {k.split(" (")[1] for k, _ in corrupt} == {f"view {v}, layers from position {p})" for v in (1, 2)
                                                     for p in (0, 1)}


def test_compressed_store_read_error_names_the_shard(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(), codec="zstd")
    s.write_image(0, tokens(2))
    _flip(s.shard_path("tokens", 0, 0), 200)
    with pytest.raises(StoreError, match=r"tokens/c\.0\.0\.0\.0\.0: corrupt shard"):
        s.read(0, 0)


@pytest.mark.slow
def test_bad_images_are_retried_when_fixed_or_asked(tmp_path, capsys):
    ids = write_data(tmp_path / "data", 4)
    photo = tmp_path / "data" / "train" / f"{ids[2]}.jpg"
    good = photo.read_bytes()
    photo.write_bytes(good[:200])
    cfg = config(tmp_path, skip_bad=True, batch_size=3)
    assert list(extract(cfg, progress=False)["bad_ids"]) == [ids[2]]
    capsys.readouterr()
    assert extract(cfg, progress=False)["views_extracted"] == 0
    assert "--retry-bad retries them all" in capsys.readouterr().out
    extract(config(tmp_path, skip_bad=True, retry_bad=True, batch_size=3), progress=False)  # still broken
    assert "--retry-bad: retrying 1 image(s)" in capsys.readouterr().out
    assert list(open_store(cfg.out).bad_ids) == [ids[2]]
    photo.write_bytes(good)  # fixed: retried by itself
    summary = extract(cfg, progress=False)
    assert summary["images_extracted"] == 1 and summary["bad_ids"] == {} and summary["samples_done"] == 12


@pytest.mark.slow
def test_finished_re_run_touches_nothing_and_works_read_only(finished, tmp_path, monkeypatch):
    cfg, ids = finished
    before = snapshot(cfg.out)
    assert extract(cfg, progress=False)["views_extracted"] == 0
    assert snapshot(cfg.out) == before
    monkeypatch.setattr(WriterLock, "__enter__", lambda self: self)  # as on a read-only file system
    assert extract(cfg, progress=False)["views_extracted"] == 0
    zarr.open_group(cfg.out, mode="r+")["done"][1, 2] = False
    with pytest.raises(StoreError, match="is read-only: cannot extract the samples not done yet"):
        extract(cfg, progress=False)


@pytest.mark.slow
def test_leftovers_of_killed_runs_are_removed(finished, tmp_path):
    cfg, _ = finished
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    old = tmp_path / f".tokens.zarr.old-{dead}"
    shutil.copytree(cfg.out, old)  # a whole old store, its deletion killed midway
    (tmp_path / f".tokens.zarr.creating-{dead}").mkdir()
    partial = cfg.out / "tokens" / "c.1.0.0.0.0.0123abc.partial"
    partial.write_bytes(b"x")
    extract(cfg, progress=False)
    assert not old.exists() and not partial.exists()
    assert not list(tmp_path.glob(".tokens.zarr.*-*"))
    extract(config(tmp_path, overwrite=True, batch_size=3), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tokens.zarr"]  # no lock file left
