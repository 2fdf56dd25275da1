"""Every user error of every command is one `error:` line and exit status 2, with nothing written; bugs and
`--debug` keep their traceback. Bad option values, bad tables, bad photos, a full or read-only disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from biomass_cache.cli import app
from biomass_cache.common.data import read_long_csv
from biomass_cache.common.errors import DataError
from biomass_cache.cli.errors import script_app
from biomass_cache.common.folds import grouped_folds
from biomass_cache.common.photo import check_photos
from toys import huge_jpeg, make_toy

FAST = ["--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-plots", "--device", "cpu"]


def biomass(*args, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_user_error(result, *fragments: str) -> str:
    """One `error:` line, the last on stderr (progress bars may come before), naming `fragments`; exit status 2,
    no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("errors")
    data, store = make_toy(root, n=12)
    return root, data, store


@pytest.mark.parametrize("args, fragments", [
    (["--folds", "1"], ["folds must be an integer >= 2, got 1", "--folds"]),
    (["--folds", "50"], ["cannot make 50 grouped folds from 12", "--folds 12 or fewer", "train.csv"]),
    (["--epochs", "0"], ["epochs must be an integer >= 1, got 0"]),
    (["--lr", "-1"], ["lr must be a number > 0, got -1.0"]),
    (["--batch-size", "0"], ["batch_size must be an integer >= 1, got 0", "--batch-size"]),
    (["--workers", "-1"], ["workers must be an integer >= 0"]),
    (["--device", "foo"], ["--device 'foo'", "cuda:N"]),
    (["--head", "nope"], ["head must be one of", "'nope'"]),
    (["--epochs", "two"], ["'--epochs'", "valid integer"]),  # click's own validation, same one line
    (["--bogus"], ["No such option: --bogus"]),
    (["--seed", "-1"], ["seed must be an integer from 0 to 4294967295, got -1 (--seed or [train] seed)"]),
])
def test_bad_train_options(toy, tmp_path, args, fragments):
    root, data, store = toy
    out = tmp_path / "run"
    assert_user_error(biomass("train", "--cache", store, "--data", data, "--out", out, *FAST, *args), *fragments)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(toy, tmp_path):
    root, data, store = toy
    result = biomass("train", "--cache", store, "--data", data, "--out", tmp_path / "run", *FAST, "--device", "cuda")
    assert_user_error(result, "--device cuda", "no CUDA device")
    assert not (tmp_path / "run").exists()


def test_config_that_is_not_toml(toy, tmp_path):
    root, data, store = toy
    result = biomass("train", "--cache", store, "--data", data, "--out", tmp_path / "run",
                     "--config", data / "train.csv")
    assert_user_error(result, "train.csv: --config takes a TOML file", "not a .csv file")
    result = biomass("extract", "--data", data, "--out", tmp_path / "t.zarr", "--config", data / "train.csv")
    assert_user_error(result, "train.csv: --config takes a .toml or .json file")
    assert not (tmp_path / "run").exists() and not (tmp_path / "t.zarr").exists()


@pytest.mark.parametrize("config, fragments", [
    ("[train]\nhead_kwargs = { bogus = 1 }\n", ["member 'density'", "bogus"]),
    ("[train]\nhead_kwargs = { dropout = 2.0 }\n", ["dropout must be in [0, 1)"]),
    ("[train]\nlayers = [99]\n", ["layers [99] are not in the token store"]),
    ("[train]\nwarmup_frac = 1.5\n", ["warmup_frac must be a number in [0, 1), got 1.5 ([train] warmup_frac)"]),
    ("[trian]\nepochs = 1\n", ["c.toml: unknown table [trian]; did you mean [train]?"]),
])
def test_bad_config_values(toy, tmp_path, config, fragments):
    root, data, store = toy
    (tmp_path / "c.toml").write_text(config)
    result = biomass("train", "--cache", store, "--data", data, "--out", tmp_path / "run", *FAST,
                     "--config", tmp_path / "c.toml")
    assert_user_error(result, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("drop, fragments", [
    ("target", ["no `target` column: training needs the labels"]),
    ("Sampling_Date", ["lacks ['Sampling_Date']", "--folds-csv"]),
    ("State", ["lacks ['State']", "--folds-csv"]),
])
def test_train_csv_without_labels_or_groups(toy, tmp_path, drop, fragments):
    root, data, store = toy
    (tmp_path / "data").mkdir()
    pd.read_csv(data / "train.csv").drop(columns=[drop]).to_csv(tmp_path / "data" / "train.csv", index=False)
    result = biomass("train", "--cache", store, "--data", tmp_path / "data", "--out", tmp_path / "run", *FAST)
    assert_user_error(result, str(tmp_path / "data" / "train.csv"), *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_stratify_flag_reaches_the_folds(toy, tmp_path):
    root, data, store = toy
    result = biomass("train", "--cache", store, "--data", data, "--out", tmp_path / "run", *FAST, "--folds", "3",
                     "--stratify", "--seed", "1")
    assert result.exit_code == 0, result.output
    folds = pd.read_csv(tmp_path / "run" / "folds.csv")["fold"].to_numpy()
    table = read_long_csv(data / "train.csv", check_images=False)
    np.testing.assert_array_equal(folds, grouped_folds(table, n_splits=3, seed=1, stratify=True))


def test_debug_shows_the_traceback(toy, tmp_path):
    root, data, store = toy
    args = ["train", "--cache", store, "--data", data, "--out", tmp_path / "run", *FAST, "--folds", "50"]
    result = biomass("--debug", *args)
    assert result.exit_code != 2 and isinstance(result.exception, DataError)
    result = biomass(*args, env={"BIOMASS_DEBUG": "1"})
    assert isinstance(result.exception, DataError)


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch, tmp_path):
    import biomass_cache.cli.synth as synth

    def broken(*a, **k):
        raise KeyError("an internal key")

    monkeypatch.setattr(synth, "generate", broken)
    result = biomass("synth", tmp_path / "d")
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)


@pytest.mark.parametrize("code, fragment", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "read-only file system"),
                                            (errno.EACCES, "permission denied")])
def test_disk_full_and_read_only(monkeypatch, tmp_path, code, fragment):
    """The mapping from errno to advice (the real faults, on real processes: test_faults.py)."""
    import biomass_cache.cli.synth as synth

    target = tmp_path / "d" / "train.csv"

    def failing(*a, **k):
        raise OSError(code, "os message", str(target))

    monkeypatch.setattr(synth, "generate", failing)
    assert_user_error(biomass("synth", tmp_path / "d"), f"{target}: {fragment}")


def test_scripts_report_errors_the_same_way(toy, tmp_path):
    from biomass_cache.cli.train import train_command

    root, data, store = toy
    result = CliRunner().invoke(script_app(train_command), [str(a) for a in [
        "--cache", store, "--data", data, "--out", tmp_path / "run", *FAST, "--epochs", "0"]])
    assert_user_error(result, "epochs must be an integer >= 1")


def test_help_keeps_bracketed_defaults():
    for command, text in [("submit", "[the folder of --out]"), ("lora", "[train], [lora], [extract]"),
                          ("predict", "[the folder of --out]")]:
        result = biomass(command, "--help")
        assert result.exit_code == 0 and text in " ".join(result.output.split()), result.output


def test_a_misspelt_command_gets_a_suggestion():
    assert_user_error(biomass("extrct"), "No such command 'extrct'. Did you mean 'extract'")
    assert_user_error(biomass("predct", "--help"), "Did you mean 'predict'")
    assert "Did you mean" not in assert_user_error(biomass("zzz"), "No such command 'zzz'.")


def test_score_of_an_empty_file(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "labels.csv").write_text("sample_id,target\nID1__Dry_Total_g,1.0\n")
    assert_user_error(biomass("score", tmp_path / "empty.csv", "--labels", tmp_path / "labels.csv"),
                      "empty.csv: not a readable CSV")
    assert_user_error(biomass("score", tmp_path / "none.csv", "--labels", tmp_path / "labels.csv"),
                      "none.csv: file not found")


def test_bad_lora_options(toy, tmp_path):
    root, data, store = toy
    for args, fragment in [(["--lora-rank", "0"], "rank must be an integer >= 1, got 0 (--lora-rank or [lora] rank)"),
                           (["--layers", "a,b"], "--layers must be comma-separated"),
                           (["--lora-dropout", "1.5"], "dropout must be a number in [0, 1)")]:
        assert_user_error(biomass("lora", "--data", data, "--out", tmp_path / "run", *args), fragment)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ submit and predict on a real run
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Synthetic photos -> tiny random-ViT cache -> 2-fold density head without dropout (a few seconds)."""
    from biomass_cache.train.crossval import run_training
    from biomass_cache.extract.pipeline import extract
    from biomass_cache.extract.config import ExtractConfig
    from biomass_cache.synth.generate import generate
    from biomass_cache.train.config import resolve

    root = tmp_path_factory.mktemp("errors_run")
    data = root / "data"
    generate(data, n_train=12, n_test=3, seed=0, size=(128, 64), progress=False)
    extract(ExtractConfig(data_dir=data, split="train", out=root / "train.zarr", weights="random", size=(64, 32),
                          layers=[0, 1], views=1, device="cpu", num_workers=0,
                          overrides=dict(depth=2, embed_dim=32, num_heads=2)), progress=False)
    cfg, members = resolve({"plots": False}, [], dict(folds=2, epochs=1, device="cpu", workers=0), None)
    run_training(root / "train.zarr", data, root / "run", cfg, members)
    return data, root / "run"


@pytest.mark.slow
def test_submit_errors(run, tmp_path):
    data, run_dir = run
    out = tmp_path / "submission.csv"
    base = ["submit", "--data", data, "--members", run_dir, "--out", out]
    assert_user_error(biomass(*base, "--aggregation", "mc_dropout"), "no dropout", "MC-dropout")
    assert_user_error(biomass(*base, "--mc-samples", "0"), "'--mc-samples'")
    assert_user_error(biomass(*base, "--device", "foo"), "--device 'foo'")
    assert_user_error(biomass("submit", "--data", tmp_path, "--members", run_dir, "--out", out), "test.csv")
    (tmp_path / "e.toml").write_text(f'[[member]]\npath = "{run_dir}"\nweight = "heavy"\n')
    assert_user_error(biomass("submit", "--data", data, "--ensemble", tmp_path / "e.toml", "--out", out),
                      "e.toml: member #1: weight must be a number, got 'heavy'")
    assert not out.exists()


def photo_folder(data: Path, folder: Path) -> Path:
    folder.mkdir()
    for p in sorted((data / "test").glob("*.jpg")):
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.mark.slow
def test_predict_skips_bad_photos_only_when_told(run, tmp_path):
    data, run_dir = run
    photos = photo_folder(data, tmp_path / "photos")
    broken = photos / "broken.jpg"
    broken.write_bytes(next(photos.glob("ID*.jpg")).read_bytes()[:600])  # a truncated JPEG
    out = tmp_path / "pred.csv"
    refused = biomass("predict", photos, "--members", run_dir, "--out", out)
    assert_user_error(refused, "broken.jpg", "--skip-bad")
    assert not out.exists() and not (tmp_path / "cache").exists()
    huge_jpeg(photos / "bomb.jpg", 20000, 10000)  # a decompression bomb: refused from its header, never decoded
    done = biomass("predict", photos, "--members", run_dir, "--out", out, "--skip-bad")
    assert done.exit_code == 0, done.output
    assert "skipped 2 unreadable photo(s)" in done.stderr and "broken.jpg" in done.stderr
    assert "bomb.jpg" in done.stderr and "too large" in done.stderr
    assert sorted(pd.read_csv(out)["image_id"]) == sorted(p.stem for p in photos.glob("ID*.jpg"))
    for p in photos.glob("ID*.jpg"):
        p.unlink()
    assert_user_error(biomass("predict", photos, "--members", run_dir, "--out", tmp_path / "none.csv", "--skip-bad"),
                      "none of the 2 photos could be read")


@pytest.mark.slow
def test_predict_warns_about_a_photo_of_another_shape(run, tmp_path):
    data, run_dir = run
    photos = photo_folder(data, tmp_path / "photos")
    Image.new("RGB", (64, 96), (90, 140, 60)).save(photos / "portrait.jpg")
    Image.new("RGB", (132, 64), (90, 140, 60)).save(photos / "nearly.jpg")  # 3 % wider than 2:1: no warning
    result = biomass("predict", photos, "--members", run_dir, "--out", tmp_path / "pred.csv")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "portrait.jpg: aspect ratio (width/height) 0.67" in warnings[0]
    assert "64x32" in warnings[0] and "crop it to 64:32" in warnings[0]


def test_photos_are_checked_before_any_forward_pass(tmp_path, capsys):
    """A photo too small to show a quadrat is refused (a 1x1 got a prediction); one enlarged more than 4x to the
    model input is warned about; both before anything is extracted."""
    Image.new("RGB", (1, 1), (90, 140, 60)).save(tmp_path / "dot.png")
    Image.new("RGB", (200, 100), (90, 140, 60)).save(tmp_path / "thumb.jpg")
    Image.new("RGB", (480, 240), (90, 140, 60)).save(tmp_path / "half.jpg")
    with pytest.raises(DataError, match=r"dot.png: 1x1 px is too small to show a quadrat.*--skip-bad"):
        check_photos([tmp_path / "dot.png"], {(960, 480)}, skip_bad=False)
    good, bad = check_photos(sorted(tmp_path.iterdir()), {(960, 480)}, skip_bad=True)
    assert [p.name for p in good] == ["half.jpg", "thumb.jpg"] and [p.name for p, _ in bad] == ["dot.png"]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "thumb.jpg: 200x100 px is enlarged more than 4x to the model input 960x480" in \
        warnings[0]


def test_verify_and_demo_errors(tmp_path):
    assert_user_error(biomass("verify", tmp_path / "nothing.zarr"), "nothing.zarr: no token store here")
    assert_user_error(biomass("synth", tmp_path / "d", "--size", "64by32"), "'--size'", "WIDTHxHEIGHT")


def test_an_unnamed_write_error_is_named_after_the_output(tmp_path):
    """os.writev, zarr and safetensors raise a full disk without a file name: the output the user chose is named."""
    from biomass_cache.cli.errors import path_error_text
    from biomass_cache.common.io import atomic_path, writing

    with pytest.raises(OSError) as info, writing(tmp_path / "store.zarr"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert path_error_text(info.value) == f"{tmp_path / 'store.zarr'}: the disk is full: free space or write elsewhere"
    with pytest.raises(OSError) as info, atomic_path(tmp_path / "sub.csv") as tmp:
        raise OSError(errno.EFBIG, "File too large", str(tmp))
    assert info.value.filename == str(tmp_path / "sub.csv") and not list(tmp_path.iterdir())
    with pytest.raises(FileNotFoundError) as info, writing(tmp_path / "out"):
        open(tmp_path / "missing.txt")
    assert info.value.filename == str(tmp_path / "missing.txt")  # an error about another file keeps its name
    assert path_error_text(OSError(errno.ENOSPC, "No space left on device")) == (
        "while writing: the disk is full: free space or write elsewhere (No space left on device)")
    assert path_error_text(OSError(errno.EACCES, "Permission denied")) is None  # unnamed and no disk: a bug


def test_the_writer_lock_file_goes_with_its_holder(tmp_path):
    from biomass_cache.common.errors import LockedError
    from biomass_cache.common.lock import WriterLock

    with WriterLock(tmp_path / "run") as lock:
        assert lock.held and (tmp_path / ".run.lock").read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(LockedError, match=r"run is being written by pid \d+ .*\(two runs would mix\)"):
            WriterLock(tmp_path / "run", "two runs would mix").__enter__()
    assert not list(tmp_path.iterdir())
    with WriterLock(tmp_path / "run"):  # free again
        pass


def test_a_photo_folder_as_phones_and_file_managers_leave_it(tmp_path, capsys):
    """Hidden files (macOS `._NAME.jpg`, .DS_Store) are left out; a HEIC photo is listed, so that it is refused
    with its reason; anything else is named once, never passed over in silence."""
    from biomass_cache.common.photo import list_photos

    Image.new("RGB", (64, 32), (90, 140, 60)).save(tmp_path / "a.jpg")
    Image.new("RGB", (64, 32), (90, 140, 60)).save(tmp_path / "b.TIF")
    Image.new("RGB", (64, 32), (90, 140, 60)).save(tmp_path / "d.gif")  # a still GIF is a picture
    (tmp_path / "._a.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "c.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "notes.txt").write_text("field notes")
    (tmp_path / "raw").mkdir()
    assert [p.name for p in list_photos(tmp_path)] == ["a.jpg", "b.TIF", "c.heic", "d.gif"]
    assert "left out 2 entries that are not photos: ['notes.txt', 'raw/']" in capsys.readouterr().err
    good, bad = check_photos(list_photos(tmp_path), {(64, 32)}, skip_bad=True)
    assert [p.name for p in good] == ["a.jpg", "b.TIF", "d.gif"] and "a HEIC photo, which Pillow cannot" in bad[0][1]


def test_out_of_memory_is_one_line(monkeypatch):
    import biomass_cache.cli.synth as synth

    def exhausted(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(synth, "generate", exhausted)
    assert_user_error(biomass("synth", "d"), "out of memory: use a smaller --batch-size")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`biomass score ... | head -1`: the reader is gone before the scores are printed (click's own handling: exit
    status 1, nothing on stderr)."""
    import subprocess
    import sys

    labels = tmp_path / "labels.csv"
    targets = ("Dry_Clover_g", "Dry_Dead_g", "Dry_Green_g", "GDM_g", "Dry_Total_g")
    labels.write_text("sample_id,target\n" + "".join(f"ID{i}__{t},{i + k}\n" for i in range(5)
                                                      for k, t in enumerate(targets)))
    proc = subprocess.Popen([sys.executable, "-m", "biomass_cache", "score", str(labels), "--labels", str(labels)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 1 and err == "", err


def test_machine_limits_torch_reports_are_one_line():
    """The text torch gives (worker shared memory over `ulimit -f` or a full /dev/shm, seen on real runs; GPU out
    of memory) maps to what to do; any other RuntimeError stays a bug."""
    from biomass_cache.cli.errors import runtime_error_text

    shm = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...\nRuntimeError: "
                       "unable to resize file </torch_22033_1417_0> to the right size: File too large (27)")
    assert "use fewer workers (--workers 0 where the command has it" in runtime_error_text(shm)
    full = RuntimeError("unable to write to file </torch_18_1958557598_0>: No space left on device (28)")
    assert "docker --shm-size" in runtime_error_text(full)

    class OutOfMemoryError(RuntimeError):
        pass

    assert runtime_error_text(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")) == (
        "GPU out of memory: use a smaller --batch-size or fewer --workers (train: --preload false keeps the tokens on "
        "disk), or a machine with more memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert runtime_error_text(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_sigterm_swallowed_by_a_hook_is_raised_again():
    """A signal's exception can land in code that ignores exceptions (the at-fork hook of a starting DataLoader
    worker, a finalizer): the stop is raised again at the next batch, or when the command ends."""
    import signal

    from biomass_cache.common.signals import Terminated, check_stop, sigterm_raises

    with pytest.raises(Terminated), sigterm_raises():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Terminated:
            pass  # swallowed, as "Exception ignored in: <function _releaseLock ...>" does
        check_stop()
    with pytest.raises(Terminated), sigterm_raises():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Terminated:
            pass  # and no batch follows: the end of the command raises it
    with sigterm_raises():  # a new command starts without the old stop
        check_stop()


def test_an_output_folder_that_could_never_be_made_is_one_line(toy, tmp_path):
    root, data, store = toy
    (tmp_path / "afile").write_text("")
    for args in (["extract", "--data", data, "--out", tmp_path / "afile" / "x.zarr"],
                 ["extract", "--data", data, "--out", tmp_path / "afile"],
                 ["train", "--cache", store, "--data", data, "--out", tmp_path / "afile" / "run", *FAST]):
        assert_user_error(biomass(*args), "afile", "is a file, not a folder")
    assert (tmp_path / "afile").read_text() == ""


def test_keep_full_on_the_side_store_is_refused(toy, tmp_path):
    root, data, store = toy
    out = tmp_path / "r.zarr"
    for keep in (out, tmp_path / "r.fit.zarr"):
        assert_user_error(biomass("extract", "--data", data, "--out", out, "--reduce", "--keep-full", keep),
                          "keep_full must be another store than out and its side store")
    assert not any(tmp_path.iterdir())


def test_reduction_settings_given_with_like_are_refused(toy, tmp_path):
    """--like brings its projection: --dim, --pool or --fit-tokens beside it (which it would ignore) are refused,
    by extract --reduce as by reduce; the like's own settings are accepted."""
    root, data, store = toy
    reduced = tmp_path / "reduced.zarr"
    assert biomass("reduce", "--cache", store, "--out", reduced, "--dim", 4, "--pool", 2).exit_code == 0
    for args, says in ((["--dim", 8], "leave out --dim"), (["--pool", 1, "--fit-tokens", 9], "--pool, --fit-tokens")):
        assert_user_error(biomass("extract", "--data", data, "--out", tmp_path / "x.zarr", "--reduce", "--like",
                                  reduced, *args), "brings its projection (4 channels, pool 2)", says)
        assert_user_error(biomass("reduce", "--cache", store, "--out", tmp_path / "y.zarr", "--like", reduced,
                                  *args), "brings its projection (4 channels, pool 2)", says)
    assert biomass("reduce", "--cache", store, "--out", tmp_path / "y.zarr", "--like", reduced, "--dim", 4,
                   "--pool", 2).exit_code == 0


def test_a_config_setting_other_dim_or_pool_than_like_is_refused(toy, tmp_path):
    """With --like, a config's [reduce] dim or pool that differ from the projection it brings are refused, naming
    the file (they were silently ignored); the same config with matching values (and any fit_tokens: it serves the
    training store's fit) is accepted."""
    root, data, store = toy
    reduced = tmp_path / "reduced.zarr"
    assert biomass("reduce", "--cache", store, "--out", reduced, "--dim", 4, "--pool", 2).exit_code == 0
    config = tmp_path / "c.toml"
    config.write_text("[extract]\n[reduce]\ndim = 8\npool = 2\n")
    says = (f"{config} sets dim = 8", "reduce without --like")
    assert_user_error(biomass("reduce", "--cache", store, "--out", tmp_path / "y.zarr", "--like", reduced,
                              "--config", config), *says)
    assert_user_error(biomass("extract", "--data", data, "--out", tmp_path / "x.zarr", "--like", reduced,
                              "--config", config), *says)
    assert not (tmp_path / "y.zarr").exists() and not (tmp_path / "x.zarr").exists()
    config.write_text("[extract]\n[reduce]\npool = 0\n")
    assert_user_error(biomass("reduce", "--cache", store, "--out", tmp_path / "y.zarr", "--like", reduced,
                              "--config", config), str(config), "['pool'] must be at least 1")
    config.write_text("[extract]\n[reduce]\ndim = 4\npool = 2\nfit_tokens = 50\n")
    assert biomass("reduce", "--cache", store, "--out", tmp_path / "y.zarr", "--like", reduced,
                   "--config", config).exit_code == 0
