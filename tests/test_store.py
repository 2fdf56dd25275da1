"""Token store: round trips per storage dtype, layout seen by plain zarr, completion mask, integrity, growth."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from biomass_cache.store import layout as st
from biomass_cache.store import handle
from biomass_cache.store.shards import ShardGeometry
from biomass_cache.store.layout import StoreSpec, create_store, open_store
from biomass_cache.common.errors import StoreError
from biomass_cache.store.verify import verify
from biomass_cache.cli.verify import verify_command
from toys import STORE_C as C
from toys import STORE_FP as FP
from toys import STORE_LAYERS as LAYERS
from toys import chunk_offset
from toys import store_spec as spec
from toys import store_tokens as tokens

def test_float16_round_trip_exact(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(n_prefix=5))
    x, p = tokens(2, seed=1), np.random.default_rng(2).standard_normal((2, 3, 5, C)).astype(np.float32)
    s.write_image(0, x, p)
    s.write(2, 1, torch.from_numpy(x[1]), torch.from_numpy(p[1]))  # torch input accepted
    r = open_store(tmp_path / "s.zarr")
    for i, v in [(0, 0), (0, 1), (2, 1)]:
        got = r.read(i, v)
        assert got.dtype == np.float32 and got.shape == (3, 12, C)
        np.testing.assert_array_equal(got, x[v].astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(r.read_prefix(i, v), p[v].astype(np.float16).astype(np.float32))


def test_bfloat16_round_trip_exact(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(dtype="bfloat16"))
    x = tokens(2, seed=3, scale=1e5)  # beyond float16 range: bfloat16 keeps it
    s.write_image(1, x)
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    for v in range(2):
        np.testing.assert_array_equal(open_store(s.path).read(1, v), want[v])
    raw = zarr.open_group(s.path, mode="r")["tokens"]
    assert raw.dtype == np.uint16  # documented: raw bfloat16 bits, float32 = bits << 16
    np.testing.assert_array_equal((raw[1].astype(np.uint32) << 16).view(np.float32), want)


def test_int8_error_bound(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(dtype="int8", n_prefix=5))
    x = tokens(2, seed=4)
    x[0, 1, 3] = 0.0  # an all-zero token must survive (scale 0)
    p = tokens(2, seed=5)[:, :, :5]
    s.write_image(0, x, p)
    for v in range(2):
        got = s.read(0, v)
        bound = np.abs(x[v]).max(-1, keepdims=True) / 254 * (1 + 1e-5) + 1e-7
        assert (np.abs(got - x[v]) <= bound).all()
        assert (got[1, 3] == 0).all() if v == 0 else True
        assert np.abs(s.read_prefix(0, v) - p[v]).max() <= np.abs(p[v]).max() / 254 * 1.001
    g = zarr.open_group(s.path, mode="r")
    assert g["tokens"].dtype == np.int8 and g["scales"].dtype == np.float32 and g["scales"].shape == (3, 2, 3, 12)


@pytest.mark.parametrize("codec,layout", [("none", "image/layer"), ("none", "image/sample"), ("none", "sample/layer"),
                                          ("zstd", "image/layer"), ("blosc-lz4", "sample/layer")])
def test_every_layout_reads_what_zarr_decodes(tmp_path, codec, layout):
    """The direct reader of uncompressed shards and zarr's own decode agree, for every layer selection."""
    s = create_store(tmp_path / "s.zarr", spec(dtype="bfloat16", n_prefix=5), codec=codec, layout=layout)
    x = tokens(2, seed=12)
    s.write_image(1, x, x[:, :, :5])
    g = zarr.open_group(s.path, mode="r")
    assert ShardGeometry.of(g["tokens"]).plain == (codec == "none")
    for layers, pos in [(None, [0, 1, 2]), ([7], [2]), ([7, 2], [2, 0])]:
        want = (g["tokens"][1, 1][pos].astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(s.read(1, 1, layers), want)
        np.testing.assert_array_equal(s.read_prefix(1, 1, layers), want[:, :5])
    report = verify(s.path, progress=False)
    assert not report.corrupt and report.n_done == 2 and len(report.missing) == 4


def test_read_detects_corruption(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec())
    s.write_image(0, tokens(2))
    shard = s.shard_path("tokens", 0, 0)
    raw = bytearray(shard.read_bytes())
    g = s._geometry["tokens"]
    index_bytes = int(np.prod(g.grid)) * 16 + 4
    assert g.plain and g.index_at_start  # the default layout: index, then the chunks in order
    first_chunk, index = index_bytes + 50, 10
    raw[first_chunk] ^= 0x01  # inside the first inner chunk, (view 0, layer 0)
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"inner chunk \(0, 0, 0, 0, 0\) is corrupt"):
        s.read(0, 0)
    s.read(0, 0, [5])  # the other chunks are fine
    raw[first_chunk] ^= 0x01
    raw[index] ^= 0x01  # the shard index
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="shard index is corrupt"):
        s.read(0, 0, [5])
    shard.unlink()
    with pytest.raises(StoreError, match="shard file missing"):
        s.read(0, 0)


def test_shard_index_at_either_end_reads_the_same(tmp_path, monkeypatch):
    import biomass_cache.store.layout as st

    x = tokens(2, seed=3)
    for where in ("start", "end"):
        monkeypatch.setattr(st, "INDEX_LOCATION", where)
        s = create_store(tmp_path / f"{where}.zarr", spec())
        s.write_image(0, x)
        g = open_store(tmp_path / f"{where}.zarr")._geometry["tokens"]
        assert g.plain and g.index_at_start == (where == "start")  # both take the direct read path
        for v in range(2):
            np.testing.assert_array_equal(open_store(tmp_path / f"{where}.zarr").read(0, v),
                                          x[v].astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("layout", st.LAYOUTS)
@pytest.mark.parametrize("where", ["start", "end"])
def test_direct_shard_writes_equal_zarr_writes(tmp_path, monkeypatch, layout, where):
    """Whole shards written by `write_shard` decode in plain zarr exactly as zarr's own writes do (int8 scales
    and prefix included), a single view written later (zarr merges a partly covered shard) sits beside them, and
    no temporary file is left. writev is cut to 7 bytes a call, so short writes are resumed mid-buffer."""
    from dataclasses import replace

    from biomass_cache.store import shards

    monkeypatch.setattr(st, "INDEX_LOCATION", where)
    x, p = tokens(2, seed=21), tokens(2, seed=22)[:, :, :5]
    arrays = {}
    for how in ("direct", "zarr"):
        s = create_store(tmp_path / f"{how}.zarr", spec(dtype="int8", n_prefix=5), layout=layout)
        assert all(g.plain for g in s._geometry.values())
        with monkeypatch.context() as m:
            if how == "zarr":
                s._geometry = {k: replace(g, plain=False) for k, g in s._geometry.items()}
            else:
                writev = os.writev
                m.setattr(shards.os, "writev", lambda fd, bufs: writev(fd, [b"".join(map(bytes, bufs))[:7]]))
            s.write_image(0, x, p)
            s.write(2, 1, x[1], p[1])
        g = zarr.open_group(s.path, mode="r")
        arrays[how] = {name: g[name][:] for name in ("tokens", "prefix", "scales", "prefix_scales", "done")}
        assert not list(s.path.rglob("*.partial"))
        assert not verify(s.path, progress=False).corrupt
    for name, want in arrays["zarr"].items():
        np.testing.assert_array_equal(arrays["direct"][name], want, err_msg=name)
    assert arrays["direct"]["done"].tolist() == [[True, True], [False, False], [False, True]]
    r = open_store(tmp_path / "direct.zarr")
    np.testing.assert_allclose(r.read(2, 1), x[1], atol=np.abs(x).max() / 254)


def test_layer_subset_reads(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(dtype="int8"))
    x = tokens(2, seed=6)
    s.write_image(0, x)
    full = s.read(0, 1)
    for layers, pos in [([5], [1]), ([5, 7], [1, 2]), ([7, 2], [2, 0]), ([2, 7], [0, 2]), (LAYERS, [0, 1, 2])]:
        np.testing.assert_array_equal(s.read(0, 1, layers), full[pos])
    for bad in ([3], [5, 5], []):
        with pytest.raises(StoreError, match="layers"):
            s.read(0, 1, bad)


def test_done_mask_semantics(tmp_path, monkeypatch):
    s = create_store(tmp_path / "s.zarr", spec(n_prefix=5))
    assert s.done().shape == (3, 2) and not s.done().any()
    with pytest.raises(StoreError, match="not marked done"):
        s.read(0, 0)
    s.write(1, 1, tokens(seed=7), tokens(seed=8)[:, :5])
    want = np.zeros((3, 2), bool)
    want[1, 1] = True
    np.testing.assert_array_equal(open_store(s.path).done(), want)

    # a failure after the data but before the durability barrier never marks the sample done
    def boom(path):
        raise OSError("disk gone")

    monkeypatch.setattr(handle, "_fsync", boom)
    with pytest.raises(OSError):
        s.write(2, 0, tokens(seed=9), tokens(seed=9)[:, :5])
    monkeypatch.undo()
    np.testing.assert_array_equal(open_store(s.path).done(), want)
    # refused inputs write nothing
    for bad, match in [(tokens(seed=1)[:2], "shape"), (np.full((3, 12, C), np.nan, np.float32), "NaN"),
                       (tokens(seed=1, scale=1e6), "float16 range")]:
        with pytest.raises(StoreError, match=match):
            s.write(0, 0, bad, tokens(seed=8)[:, :5])
    with pytest.raises(StoreError, match="prefix missing"):
        s.write(0, 0, tokens(seed=1))
    with pytest.raises(IndexError):
        s.write(3, 0, tokens(seed=1), tokens(seed=8)[:, :5])
    with pytest.raises(StoreError, match="read-only"):
        open_store(s.path).write(0, 0, tokens(seed=1), tokens(seed=8)[:, :5])
    np.testing.assert_array_equal(open_store(s.path).done(), want)


KILL_SCRIPT = textwrap.dedent("""
    import sys, numpy as np
    from biomass_cache.store.layout import open_store
    s = open_store(sys.argv[1], mode="r+")
    for i in range(len(s.image_ids)):
        for v in range(s.n_views):
            s.write(i, v, np.full((3, 12, 16), i * 10 + v + 0.5, np.float32))
            if i == 0 and v == 0:
                print("started", flush=True)
""")


@pytest.mark.slow
def test_kill_9_never_leaves_half_data_marked_done(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(n=200, views=3))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(s.path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.stdout.readline().strip() == b"started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = open_store(s.path)
    done = r.done()
    assert 0 < done.sum() < done.size, "kill landed outside the write loop; make the loop longer"
    for i, v in zip(*np.nonzero(done)):
        assert (r.read(i, v) == i * 10 + v + 0.5).all()
    report = verify(s.path, progress=False)
    assert not report.corrupt and len(report.missing) == done.size - done.sum()


def test_plain_zarr_layout(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(n_prefix=5, split="test"))
    s.write_image(0, tokens(2), tokens(2)[:, :, :5])
    g = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert sorted(g.array_keys()) == ["done", "prefix", "tokens"]
    t, p, d = g["tokens"], g["prefix"], g["done"]
    assert (t.shape, t.dtype, t.shards, t.chunks) == ((3, 2, 3, 12, C), np.float16, (1, 2, 3, 12, C), (1, 1, 1, 12, C))
    assert (p.shape, d.shape, d.dtype, d.chunks) == ((3, 2, 3, 5, C), (3, 2), np.bool_, (1, 2))
    assert t.metadata.dimension_names == ("image", "view", "layer", "token", "channel")
    meta = json.loads((tmp_path / "s.zarr" / "tokens" / "zarr.json").read_text())
    shard = meta["codecs"][0]["configuration"]
    assert shard["codecs"][-1]["name"] == "crc32c" and shard["index_codecs"][-1]["name"] == "crc32c"
    a = g.attrs
    assert a["image_ids"] == ["ID0", "ID1", "ID2"] and a["split"] == "test" and a["grid"] == [3, 4]
    assert a["layers"] == LAYERS and a["n_views"] == 2 and a["channels"] == C and a["n_prefix"] == 5
    assert a["storage_dtype"] == "float16" and a["random_weights"] is True and a["bad_ids"] == {}
    assert a["format_version"] == st.FORMAT_VERSION and a["fingerprint"] == FP
    assert np.isnan(t[1]).all()  # unwritten samples read as NaN, never as zeros
    np.testing.assert_array_equal(t[0, 1].astype(np.float32), s.read(0, 1))


def test_verify_reports_corrupt_and_missing(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec())
    for i in range(3):
        s.write_image(i, tokens(2, seed=i))
    s.mark_bad("ID2", "truncated jpeg")
    s._arrays["done"][2] = False
    s._arrays["done"][1, 1] = False
    shard = s.shard_path("tokens", 0, 0)
    raw = bytearray(shard.read_bytes())
    raw[chunk_offset(s, "tokens", raw, view=0, layer=1) + 100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    report = verify(tmp_path / "s.zarr", progress=False)
    assert not report.ok and report.n_samples == 6 and report.n_done == 3
    assert report.missing == [("ID1", 1)] and report.bad == {"ID2": "truncated jpeg"}
    assert len(report.corrupt) == 1
    key, err = report.corrupt[0]
    assert key == f"tokens/{shard.name} (view 0, layers from position 1)" and "checksum" in err.lower()
    result = CliRunner().invoke(_app(), [str(tmp_path / "s.zarr")])
    assert result.exit_code == 1 and "corrupt" in result.output and "FAILED" in result.output
    # a done sample whose shard vanished is reported too
    shard.unlink()
    assert any("unwritten" in e for _, e in verify(tmp_path / "s.zarr", progress=False).corrupt)


def test_verify_command_ok(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(n=1, dtype="int8"))
    s.write_image(0, tokens(2))
    result = CliRunner().invoke(_app(), [str(tmp_path / "s.zarr")])
    assert result.exit_code == 0 and "OK" in result.output


def _app():
    import typer

    app = typer.Typer()
    app.command()(verify_command)
    return app


def test_append_images(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec(n=2, dtype="int8", n_prefix=5))
    x = tokens(2, seed=11)
    s.write_image(1, x, x[:, :, :5])
    before = s.read(1, 1)
    s.append_images(["ID7", "ID8"])
    r = open_store(s.path, mode="r+")
    assert r.image_ids == ["ID0", "ID1", "ID7", "ID8"] and r.done().shape == (4, 2)
    assert r.done()[1].all() and not r.done()[2:].any()
    np.testing.assert_array_equal(r.read(1, 1), before)
    r.write_image(3, x, x[:, :, :5])
    np.testing.assert_array_equal(r.read(3, 1), before)
    for dup in (["ID1"], ["ID9", "ID9"], [""]):
        with pytest.raises(StoreError, match="append_images refused"):
            r.append_images(dup)
    assert open_store(s.path).image_ids == ["ID0", "ID1", "ID7", "ID8"]


def test_create_refuses_overwrite(tmp_path):
    path = tmp_path / "s.zarr"
    create_store(path, spec()).write_image(0, tokens(2))
    with pytest.raises(StoreError, match="overwrite"):
        create_store(path, spec())
    assert open_store(path).done()[0].all()
    s = create_store(path, spec(n=5), overwrite=True)
    assert len(s.image_ids) == 5 and not s.done().any()
    (tmp_path / "notes").mkdir()
    with pytest.raises(StoreError, match="not a zarr store"):
        create_store(tmp_path / "notes", spec(), overwrite=True)
    with pytest.raises(StoreError, match="duplicates"):
        create_store(tmp_path / "x.zarr", StoreSpec(["a", "a"], 1, [1], (2, 2), 4, FP))
    with pytest.raises(StoreError, match="random_weights"):
        create_store(tmp_path / "y.zarr", StoreSpec(["a"], 1, [1], (2, 2), 4, {"layers": [1]}))
    assert create_store(tmp_path / "z.zarr", StoreSpec(["a"], 1, [1], (2, 2), 4, {}, random_weights=False)) \
        .random_weights is False


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not a directory"):
        open_store(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="empty is not a Zarr v3 group"):
        open_store(tmp_path / "empty")
    zarr.create_group(tmp_path / "plain.zarr", attributes={"hello": 1})
    with pytest.raises(StoreError, match="not a token store"):
        open_store(tmp_path / "plain.zarr")
    s = create_store(tmp_path / "s.zarr", spec())
    s._set_attrs(format_version=99)
    with pytest.raises(StoreError, match="format_version 99"):
        open_store(s.path)
    s._set_attrs(format_version=st.FORMAT_VERSION)
    zarr.open_group(s.path, mode="r+").__delitem__("done")
    with pytest.raises(StoreError, match="'done' is missing"):
        open_store(s.path)


def test_check_fingerprint(tmp_path):
    s = create_store(tmp_path / "s.zarr", spec())
    s.check_fingerprint(FP)
    with pytest.raises(StoreError, match=r"different configuration: layers: \[2, 5, 7\] -> \[2, 5\]"):
        s.check_fingerprint({**FP, "layers": [2, 5]})
    many = {f"k{j}": j for j in range(12)}  # e.g. a reduced store's fingerprint against a full one: the first few
    with pytest.raises(StoreError, match=r"; and 4 more \(use --overwrite to replace it, or another --keep-full\)"):
        s.check_fingerprint({**FP, **many}, "--keep-full")
