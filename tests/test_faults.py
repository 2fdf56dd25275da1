"""Faults injected where they really happen, on real processes: a file-size limit (RLIMIT_FSIZE, `ulimit -f`) and
a full tmpfs under every command that writes, Ctrl-C and SIGTERM sent to a running command, two commands on one
output. Each ends in one `error:` line with its exit status and leaves nothing half-made: the output as it was,
or a run or store the same command resumes."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from biomass_cache.cli import app
from toys import PIPELINE_VIT, ROOT

pytestmark = pytest.mark.slow

TRAIN = ("--epochs", 2, "--folds", 2, "--batch-size", 8, "--workers", 0, "--no-plots")
EXTRACT = ("[extract]\nbackbone = \"vit_small_patch16_dinov3\"\nweights = \"random\"\nsize = [64, 32]\n"
           "layers = [0, 1]\nviews = 2\nbatch_size = 4\nnum_workers = 0\noverrides = { depth = %d, embed_dim = %d, "
           "num_heads = %d }\n" % (PIPELINE_VIT["depth"], PIPELINE_VIT["embed_dim"], PIPELINE_VIT["num_heads"]))


def start(*args, limit: int | None = None) -> subprocess.Popen:
    """`python -m biomass_cache ARGS` in its own process; with `limit`, no file it writes may exceed that many bytes
    (Python ignores SIGXFSZ, so the write fails with EFBIG as on a full disk)."""
    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen([sys.executable, "-m", "biomass_cache", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limited if limit else None,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def biomass(*args, limit: int | None = None) -> tuple[int, str]:
    proc = start(*args, limit=limit)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out + err


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------ full disk, every writer
def test_a_file_size_limit_is_one_line_naming_the_output(pipeline, tmp_path):
    root, data, run = pipeline
    before = listing(tmp_path)
    procs = [start("synth", tmp_path / "synth", "--n-train", 4, "--n-test", 2, "--size", "512x256", limit=8192),
             start("score", data / "test_labels.csv", "--labels", data / "test_labels.csv", "--json",
                   tmp_path / "scores.json", limit=64),
             # train: config.json and folds.csv fit under 20 kB, fold 0's density head (70 kB) does not
             start("train", "--cache", root / "train.zarr", "--data", data, "--out", tmp_path / "run", *TRAIN,
                   limit=20_000)]
    (synth, score, train) = [("".join(p.communicate(timeout=300)), p.returncode)[::-1] for p in procs]
    for code, output in (synth, score, train):
        assert code == 2 and "Traceback" not in output and "SafetensorError" not in output, output
    assert last_line(synth[1]) == (f"error: {tmp_path / 'synth'}: the file is larger than this process may write "
                                   "(ulimit -f): raise the limit or write elsewhere")
    assert last_line(score[1]).startswith(f"error: {tmp_path / 'scores.json'}: the file is larger")
    assert last_line(train[1]).startswith(f"error: {tmp_path / 'run'}/") and "ulimit -f" in last_line(train[1])
    assert listing(tmp_path) == before  # no data folder, no run folder (the rerun needs no --overwrite), no temp


def test_a_full_store_resumes_bit_identical(pipeline, tmp_path):
    _, data, _ = pipeline
    (tmp_path / "c.toml").write_text(EXTRACT.replace("views = 2", "views = 8"))  # 16 kB shards, smaller metadata
    full = tmp_path / "full.zarr"
    assert CliRunner().invoke(app, ["extract", "--config", str(tmp_path / "c.toml"), "--data", str(data), "--out",
                                    str(full)]).exit_code == 0
    cut = tmp_path / "cut.zarr"
    code, output = biomass("extract", "--config", tmp_path / "c.toml", "--data", data, "--out", cut, limit=12_000)
    assert code == 2 and "Traceback" not in output, output
    assert last_line(output).startswith(f"error: {cut}") and "ulimit -f" in last_line(output)
    assert not list(tmp_path.glob(".cut.zarr.lock"))
    resumed = CliRunner().invoke(app, ["extract", "--config", str(tmp_path / "c.toml"), "--data", str(data), "--out",
                                       str(cut)])
    assert resumed.exit_code == 0, resumed.output
    for shard in (full / "tokens").iterdir():
        assert (cut / "tokens" / shard.name).read_bytes() == shard.read_bytes()


def test_a_full_tmpfs_names_the_store(pipeline, tmp_path):
    """ENOSPC from a real 1 MB tmpfs (in a private mount namespace: no privileges needed where user namespaces are
    allowed; skipped elsewhere)."""
    _, data, _ = pipeline
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("no unshare -rm here: cannot mount a private tmpfs")
    (tmp_path / "c.toml").write_text(EXTRACT.replace("views = 2", "views = 8"))
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {disk} && {sys.executable} -m biomass_cache extract --config "
              f"{tmp_path / 'c.toml'} --data {data} --out {disk / 'train.zarr'}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output, output
    assert last_line(output).startswith(f"error: {disk / 'train.zarr'}") and "the disk is full" in last_line(output)


def test_submit_out_that_cannot_be_written_is_refused_before_any_work(pipeline, tmp_path):
    _, data, run = pipeline
    (tmp_path / "s1").mkdir()
    refused = CliRunner().invoke(app, ["submit", "--data", str(data), "--members", f"{run}:density", "--out",
                                       str(tmp_path / "s1"), "--work-dir", str(tmp_path / "work")])
    assert refused.exit_code == 2 and last_line(refused.output) == (
        f"error: --out {tmp_path / 's1'}: is a folder; give a file name (e.g. {tmp_path / 's1' / 'submission.csv'})")
    assert not (tmp_path / "work").exists()
    done = CliRunner().invoke(app, ["submit", "--data", str(data), "--members", f"{run}:density", "--out",
                                    str(tmp_path / "sub.csv"), "--work-dir", str(tmp_path / "work")])
    assert done.exit_code == 0, done.output
    (tmp_path / "sub.csv").unlink()  # again, the test cache and member predictions cached: only the CSV is written
    code, output = biomass("submit", "--data", data, "--members", f"{run}:density", "--out", tmp_path / "sub.csv",
                           "--work-dir", tmp_path / "work", limit=512)
    assert code == 2 and last_line(output).startswith(f"error: {tmp_path / 'sub.csv'}: the file is larger"), output
    assert not (tmp_path / "sub.csv").exists() and not list(tmp_path.glob(".sub.csv*"))


# ------------------------------------------------------------------------ one writer of a run folder, Ctrl-C, SIGTERM
def test_a_stopped_training_leaves_the_folder_as_it_found_it(pipeline, tmp_path):
    """Ctrl-C before any fold model is saved: the new folder disappears. SIGTERM to a `train --overwrite`: the
    earlier run is put back byte for byte, so the rerun needs no --overwrite. Meanwhile a second `train --overwrite`
    on that folder is refused (both exited 0, the folder holding only the second run)."""
    root, data, _ = pipeline
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", "--cache", str(root / "train.zarr"), "--data", str(data), "--out",
                                    str(out), *map(str, TRAIN)]).exit_code == 0
    earlier = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for target, extra, sig, code, text in ((tmp_path / "new", (), signal.SIGINT, 130, "interrupted (Ctrl-C)"),
                                           (out, ("--overwrite",), signal.SIGTERM, 143, "terminated (SIGTERM)")):
        args = ("train", "--cache", root / "train.zarr", "--data", data, "--out", target, *extra, "--epochs",
                100_000, *TRAIN[2:])
        proc = start(*args)
        wait_for(tmp_path / f".run.replaced-{proc.pid}" if extra else target / "config.json", proc)  # claimed
        if extra:
            second, output = biomass(*args)
            assert second == 2 and f"error: {out} is being written by pid {proc.pid} on " in last_line(output)
            assert "two runs would mix their models in one folder" in last_line(output)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code and last_line(err) == f"error: {text}" and "Traceback" not in err, err
        assert not list(tmp_path.glob(".*"))  # no lock file, no set-aside run
    assert not (tmp_path / "new").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier


def test_sigterm_during_reduce_removes_its_temporary_store(pipeline, tmp_path, monkeypatch):
    """A real SIGTERM to this process while `biomass reduce` writes: the temporary store goes; a leftover of a
    killed reduce (its process gone) is removed by the next one."""
    from biomass_cache.store import reduce as red

    root, _, _ = pipeline
    apply = red.Reduction.apply

    sent = []

    def apply_then_terminate(self, tokens):  # one SIGTERM, as a user or a scheduler sends it (apply runs in threads)
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGTERM))
        return apply(self, tokens)

    monkeypatch.setattr(red.Reduction, "apply", apply_then_terminate)
    out = tmp_path / "r.zarr"
    result = CliRunner().invoke(app, ["reduce", "--cache", str(root / "train.zarr"), "--out", str(out), "--dim", "8"])
    assert result.exit_code == 143 and last_line(result.output) == "error: terminated (SIGTERM)", result.output
    assert listing(tmp_path) == []
    monkeypatch.setattr(red.Reduction, "apply", apply)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".r.zarr.reducing-{dead}" / "tokens").mkdir(parents=True)
    result = CliRunner().invoke(app, ["reduce", "--cache", str(root / "train.zarr"), "--out", str(out), "--dim", "8"])
    assert result.exit_code == 0, result.output
    assert f"removed {tmp_path / f'.r.zarr.reducing-{dead}'}" in result.output and listing(tmp_path)[0] == "r.zarr"
    assert not list(tmp_path.glob(".*"))


def test_a_stopped_stacked_training_leaves_nothing(pipeline, tmp_path):
    """A real SIGTERM to a run training its folds as one stacked model (no fold model is saved until every fold has
    trained): one line, exit 143, and the new folder is gone."""
    root, data, _ = pipeline
    target = tmp_path / "stacked"
    proc = start("train", "--cache", root / "train.zarr", "--data", data, "--out", target, "--stack-folds",
                 "--epochs", 100_000, *TRAIN[2:])
    wait_for(target / "config.json", proc)
    time.sleep(1)  # into the stacked steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "2 folds stacked" in err, err
    assert proc.returncode == 143 and last_line(err) == "error: terminated (SIGTERM)" and "Traceback" not in err, err
    assert not target.exists() and not list(tmp_path.glob(".*"))


def test_a_killed_overwrite_gives_the_earlier_run_back(pipeline, tmp_path):
    """`kill -9` while `train --overwrite` runs leaves the earlier run set aside (.run.replaced-PID): the next claim
    of the folder puts it back byte for byte instead of deleting it as a leftover."""
    root, data, _ = pipeline
    out = tmp_path / "run"
    assert CliRunner().invoke(app, ["train", "--cache", str(root / "train.zarr"), "--data", str(data), "--out",
                                    str(out), *map(str, TRAIN)]).exit_code == 0
    earlier = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = start("train", "--cache", root / "train.zarr", "--data", data, "--out", out, "--overwrite", "--epochs",
                 100_000, *TRAIN[2:])
    wait_for(tmp_path / f".run.replaced-{proc.pid}", proc)
    wait_for(out / "config.json", proc)
    proc.kill()
    proc.communicate(timeout=60)
    again = CliRunner().invoke(app, ["train", "--cache", str(root / "train.zarr"), "--data", str(data), "--out",
                                     str(out), *map(str, TRAIN)])
    assert again.exit_code == 2 and "already holds a training run" in again.output
    assert f"put back the earlier run that a killed run (pid {proc.pid}) had set aside" in again.output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == earlier
    assert not list(tmp_path.glob(".*"))


def test_a_killed_seed_ensemble_gives_every_earlier_seed_run_back(pipeline, tmp_path):
    """`kill -9` during `train --seeds 0,1 --overwrite` leaves each seed's earlier run set aside; the next seed
    ensemble on the folder puts back all of them, also of the seeds it does not train itself."""
    root, data, _ = pipeline
    out = tmp_path / "ens"
    common = ["train", "--cache", str(root / "train.zarr"), "--data", str(data), "--out", str(out), *map(str, TRAIN)]
    assert CliRunner().invoke(app, [*common, "--seeds", "0,1"]).exit_code == 0
    earlier = {p: p.read_bytes() for p in (out / "seed1").rglob("*") if p.is_file()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # what kill -9 leaves: the aside of a gone process
    os.replace(out / "seed1", out / f".seed1.replaced-{dead}")
    (out / "seed1").mkdir()
    (out / "seed1" / "config.json").write_text("{}")  # what the killed run had begun to write
    again = CliRunner().invoke(app, [*common, "--seeds", "0", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert f"put back the earlier run that a killed run (pid {dead}) had set aside" in again.output
    assert {p: p.read_bytes() for p in (out / "seed1").rglob("*") if p.is_file()} == earlier
    assert not list(out.glob(".*"))
