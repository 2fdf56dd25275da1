"""`biomass tune`: the space file, a tiny real study (best.toml, resume, refusals), pruning, dead trials, two
processes sharing one storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomllib
from typer.testing import CliRunner

from biomass_cache.cli.errors import script_app

optuna = pytest.importorskip("optuna")

from toys import open_in_browser, ROOT, make_toy  # noqa: E402

from biomass_cache.cli.train import train_command  # noqa: E402
from biomass_cache.cli.tune import tune_command  # noqa: E402
from biomass_cache.common.errors import DataError  # noqa: E402
from biomass_cache.common.targets import TARGETS  # noqa: E402
from biomass_cache.train.tune_study import open_storage, worker_id
from biomass_cache.train.tune_space import parse_space  # noqa: E402

FIXED = "batch_size = 8\nworkers = 0\nthreads = 1\nfolds = 3\nplots = false\n"
SPACE = f"""[space]
lr = {{ log_uniform = [1e-3, 3e-2] }}
head = {{ choice = ["density", "mlp"] }}
[fixed]
epochs = 2
{FIXED}"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tune")
    data, store = make_toy(root, n=36)
    (root / "space.toml").write_text(SPACE)
    return root, data, store


def invoke(app_fn, *args) -> tuple[int, str]:
    result = CliRunner().invoke(script_app(app_fn), [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def tune(toy, out: Path, *args) -> tuple[int, str]:
    root, data, store = toy
    return invoke(tune_command, "--cache", store, "--data", data, "--out", out, *args)


def load(out: Path, name: str | None = None):
    return optuna.load_study(study_name=name or out.name, storage=f"sqlite:///{out / 'study.db'}")


def finished(study) -> list:
    return [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


# ------------------------------------------------------------------------------------------------- the space file
def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_space_covers_every_kind_and_head_options(tmp_path):
    space = parse_space(write(tmp_path, """[space]
lr = { log_uniform = [1e-4, 1e-2] }
weight_decay = { uniform = [0.0, 0.1] }
epochs = { int = [2, 8], step = 2 }
layers = { choice = [[5, 8], [8, 11]] }
head_kwargs.hidden = { int = [64, 512], log = true }
[fixed]
head = "density"
head_kwargs = { dropout = 0.1 }
"""))
    assert [p.name for p in space.params] == ["lr", "weight_decay", "epochs", "layers", "head_kwargs.hidden"]
    trial = optuna.trial.FixedTrial({"lr": 1e-3, "weight_decay": 0.05, "epochs": 4, "layers": "[8, 11]",
                                     "head_kwargs.hidden": 128})
    assert space.train_section(trial) == {"head": "density", "head_kwargs": {"dropout": 0.1, "hidden": 128},
                                          "lr": 1e-3, "weight_decay": 0.05, "epochs": 4, "layers": [8, 11]}
    assert space.fixed == {"head": "density", "head_kwargs": {"dropout": 0.1}}  # the fixed table stays as read
    assert len(parse_space(ROOT / "configs" / "tune_example.toml").params) == 6  # the documented example


@pytest.mark.parametrize("text, match", [
    ("[space]\nlearning_rate = { uniform = [0.1, 0.2] }", r"unknown key\(s\) \['learning_rate'\]"),
    ("[space]\nlr = { uniform = [0.2, 0.1] }", r"lr: empty range \[0.2, 0.1\]"),
    ("[space]\nepochs = { int = [3, 3] }", r"epochs: empty range \[3, 3\]"),
    ("[space]\nhead = { choice = [] }", "head: empty choice list"),
    ("[space]\nlr = { log_uniform = [0, 0.1] }", "log_uniform needs low > 0"),
    ("[space]\nlr = { normal = [0, 1] }", "lr needs exactly one of"),
    ("[space]\nlr = { uniform = [0.1, 0.2], step = 1 }", r"unknown option\(s\) \['step'\]"),
    ("[space]\nseed = { int = [0, 9] }", "seed cannot be searched"),
    ("[space]\nlr = { uniform = [0.1, 0.2] }\n[fixed]\nlr = 0.1", r"\['lr'\] both searched and fixed"),
    ("[space]\nhead = { choice = ['density', 'mlp'] }\nhead_kwargs.pools = { choice = [['mean']] }",
     r"head 'density' takes no option\(s\) \['pools'\]"),
    ("[space]\nhead = { choice = ['density', 'nope'] }", "unknown head 'nope'"),
    ("[space]\nlr = { uniform = [0.1, 0.2] }\n[tune]\nx = 1", r"unknown section\(s\) \['tune'\]"),
    ("[fixed]\nlr = 0.1", r"\[space\] is empty"),
    ("[space]\nlr = { uniform = [0.1, 0.2] }\n[fixed]\nfull = true", "full = true trains without folds"),
    ("[space]\nlr = { uniform = [0.1, 0.2] }\n[fixed]\ntta = 'some'", "tta must be 'all' or a view index"),
])
def test_space_errors_name_the_key(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        parse_space(write(tmp_path, text))


@pytest.mark.slow
def test_bad_space_or_storage_is_one_error_line(toy, tmp_path):
    root, _, _ = toy
    code, out = tune(toy, tmp_path / "s", "--space", write(tmp_path, "[space]\nlr = { uniform = [1, 0] }"),
                     "--trials", 1)
    assert code == 2 and out.startswith("error: ") and "empty range" in out and "Traceback" not in out
    code, out = tune(toy, tmp_path / "s", "--space", root / "space.toml", "--trials", 1, "--storage",
                     "nosuchdb://host/x")
    assert code == 2 and out.startswith("error: the study's storage nosuchdb://host/x cannot be opened")


# --------------------------------------------------------------------------------------------- a tiny real study
@pytest.fixture(scope="module")
def study_dir(toy) -> Path:
    root, _, _ = toy
    out = root / "study"
    code, output = tune(toy, out, "--space", root / "space.toml", "--trials", 3, "--pruner", "none", "--top-k", 2,
                        "--seeds", 2)
    assert code == 0, output
    return out


@pytest.mark.slow
def test_study_writes_best_toml_that_train_reproduces(study_dir, toy, tmp_path):
    _, data, store = toy
    study = load(study_dir)
    assert len(finished(study)) == 3 and all((study_dir / "trials" / f"{k:04d}" / "metrics.json").is_file()
                                             for k in range(3))
    summary = json.loads((study_dir / "stage2.json").read_text())
    assert [r["trial"] for r in summary["rows"]] == [t.number for t in sorted(
        finished(study), key=lambda t: -t.value)][:2]
    for row in summary["rows"]:
        assert row["seeds"] == [1, 2] and len(row["r2"]) == 2 and row["std"] is not None
        for seed, r2 in zip(row["seeds"], row["r2"]):
            run = study_dir / "stage2" / f"{row['trial']:04d}" / f"seed{seed}"
            assert json.loads((run / "metrics.json").read_text())["competition_r2"] == r2
            assert json.loads((run / "config.json").read_text())["train"]["seed"] == seed
    winner = max(summary["rows"], key=lambda r: r["mean"])
    assert summary["winner"] == winner["trial"]
    best = tomllib.loads((study_dir / "best.toml").read_text())["train"]
    assert best == {**study.trials[winner["trial"]].params, **tomllib.loads(SPACE)["fixed"], "folds": 3}
    assert {p.name for p in (study_dir / "plots").iterdir()} == {"history.png", "importances.png", "parallel.png"}
    seen = open_in_browser(study_dir / "report.html", tmp_path / "study.png")  # written by the command
    assert seen["errors"] == [] and seen["failed"] == [], seen
    assert {i for i, ok, _ in seen["images"] if ok} == {"spread", "plot-history", "plot-importances", "plot-parallel"}
    assert f"trial {winner['trial']}" in seen["score"] and f"{winner['mean']:.4f}" in seen["score"]
    assert "Second stage" in seen["text"] and "Every trial" in seen["text"]

    code, output = invoke(train_command, "--cache", store, "--data", data, "--out", tmp_path / "retrain", "--config",
                          study_dir / "best.toml", "--folds-csv", study_dir / "folds.csv", "--no-plots")
    assert code == 0, output
    retrained = json.loads((tmp_path / "retrain" / "metrics.json").read_text())["competition_r2"]
    assert retrained == pytest.approx(winner["search_r2"], abs=1e-6)  # the winner's own trial, same seed and folds


@pytest.mark.slow
def test_resume_continues_and_refuses_another_cache_or_folds(study_dir, toy, tmp_path):
    root, data, _ = toy
    before = {t.number: t.value for t in finished(load(study_dir))}
    code, output = tune(toy, study_dir, "--space", root / "space.toml", "--trials", 4, "--pruner", "none",
                        "--top-k", 1, "--seeds", 0)
    assert code == 0, output
    after = load(study_dir)
    assert len(finished(after)) == 4 and {t.number: t.value for t in finished(after)[:3]} == before

    _, other = make_toy(tmp_path / "other", n=36, seed=1)  # another extraction fingerprint
    code, output = invoke(tune_command, "--cache", other, "--data", data, "--out", study_dir, "--space",
                          root / "space.toml", "--trials", 5)
    assert code == 2 and "another token cache" in output and "seed: 0 -> 1" in output
    folds = pd.read_csv(study_dir / "folds.csv")
    folds["fold"] = (folds["fold"] + 1) % 3
    folds.to_csv(tmp_path / "moved.csv", index=False)
    code, output = tune(toy, study_dir, "--space", root / "space.toml", "--trials", 5, "--folds-csv",
                        tmp_path / "moved.csv")
    assert code == 2 and "differ from the ones recorded" in output
    changed = write(tmp_path, SPACE.replace("3e-2", "5e-2"))
    code, output = tune(toy, study_dir, "--space", changed, "--trials", 5)
    assert code == 2 and "another space" in output
    assert len(finished(load(study_dir))) == 4  # nothing lost, nothing run


@pytest.mark.slow
def test_pruned_trials_stop_early(toy, tmp_path):
    """A trial that cannot learn (tiny lr), after one that does: the median pruner stops it within fold 0."""
    root, _, _ = toy
    out = tmp_path / "prune"
    space = write(tmp_path, f"[space]\nlr = {{ log_uniform = [1e-7, 1e-1] }}\n[fixed]\nepochs = 4\n"
                            f"eval_every = 1\n{FIXED}")
    out.mkdir()
    study = optuna.create_study(study_name="prune", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    study.enqueue_trial({"lr": 3e-2})
    study.enqueue_trial({"lr": 1e-7})
    code, output = tune(toy, out, "--space", space, "--trials", 2, "--pruner", "median", "--prune-after", 1,
                        "--seeds", 0, "--top-k", 1)
    assert code == 0, output
    good, bad = load(out).trials
    assert good.state == optuna.trial.TrialState.COMPLETE and bad.state == optuna.trial.TrialState.PRUNED
    assert len(good.intermediate_values) == 3 * 4 and len(bad.intermediate_values) < 4
    history = pd.read_csv(out / "trials" / "0001" / "history.csv")
    assert len(history) == len(bad.intermediate_values) and set(history["fold"]) == {"fold0"}
    assert len(pd.read_csv(out / "trials" / "0000" / "history.csv")) == 3 * 4
    assert "pruned after" in output and tomllib.loads((out / "best.toml").read_text())["train"]["lr"] == 3e-2


@pytest.mark.slow
def test_a_killed_trial_is_failed_on_restart_and_keep_top(toy, tmp_path):
    root, _, _ = toy
    out = tmp_path / "killed"
    out.mkdir()
    storage = open_storage(f"sqlite:///{out / 'study.db'}")
    study = optuna.create_study(study_name="killed", storage=storage, direction="maximize")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = study.ask()  # as a process killed mid-trial leaves it: RUNNING, its worker gone
    left.set_user_attr("worker", worker_id().rsplit(":", 1)[0] + ":" + gone.stdout.strip())
    code, output = tune(toy, out, "--space", root / "space.toml", "--trials", 2, "--seeds", 0, "--top-k", 1,
                        "--keep", "top")
    assert code == 0, output
    trials = load(out).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL and "trials [0] were left running" in output
    assert len(finished(load(out))) == 2 and [t.number for t in finished(load(out))] == [1, 2]
    best = max(finished(load(out)), key=lambda t: t.value).number
    assert [p.name for p in (out / "trials").iterdir()] == [f"{best:04d}"]  # --keep top: the top K = 1 only


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_processes_share_one_study(toy, tmp_path, kind):
    root, data, store = toy
    url = f"sqlite:///{tmp_path / 'shared.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'shared.log'}"
    cmd = [sys.executable, "-m", "biomass_cache", "tune", "--cache", str(store), "--data", str(data), "--space",
           str(root / "space.toml"), "--trials", "5", "--out", str(tmp_path / "study"), "--storage", url, "--study",
           "shared", "--top-k", "1", "--seeds", "1", "--pruner", "none"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=open_storage(url))
    done = finished(study)
    assert len(done) == 5  # the study's total, not 5 per process
    workers = {t.user_attrs["worker"] for t in done}
    # every finished trial came from one of the two (a toy trial is so short that one process may finish them all
    # before the other has imported torch: which of them took part is timing, not behaviour)
    assert workers <= {f"{worker_id().rsplit(':', 1)[0]}:{p.pid}" for p in procs}
    assert all(t.user_attrs.get("surplus") for t in study.trials if t not in done)  # the others never trained
    assert sorted(p.name for p in (tmp_path / "study" / "trials").iterdir()) == [f"{t.number:04d}" for t in done]
    assert sum("winner: trial" in o for o in outputs) == 1 and (tmp_path / "study" / "best.toml").is_file()


@pytest.mark.slow
def test_a_diverging_trial_fails_and_the_study_goes_on(toy, tmp_path, monkeypatch):
    from biomass_cache.train import loop as train_module

    real = train_module.task_losses
    calls = []

    def nan_first_trial(out, batch, zscore, **kw):  # every loss of the first trial is NaN
        losses = real(out, batch, zscore, **kw)
        calls.append(1)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) <= 3 else losses

    monkeypatch.setattr(train_module, "task_losses", nan_first_trial)
    space = write(tmp_path, SPACE.replace("[fixed]", "[fixed]\nmax_nonfinite = 3"))
    code, output = tune(toy, tmp_path / "nan", "--space", space, "--trials", 1, "--seeds", 0, "--top-k", 1)
    assert code == 0, output
    trials = load(tmp_path / "nan").trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert "trial 0: failed (head " in output and "3 non-finite losses in a row" in trials[0].user_attrs["fail_reason"]


@pytest.mark.slow
def test_ctrl_c_inside_optunas_storage_stops_cleanly_and_resumes(toy, tmp_path, monkeypatch):
    """A real SIGINT landing while optuna writes a trial's state (it broke optuna: UnboundLocalError
    `updated_state`, exit 1): held until the next trial's start, then one `error: interrupted` line, exit 130; the
    same command continues the study."""
    import signal

    real = optuna.storages.RDBStorage.set_trial_state_values
    sent = []

    def interrupted_write(self, *args, **kwargs):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", interrupted_write)
    out = tmp_path / "ctrl-c"
    root, data, store = toy
    result = CliRunner().invoke(script_app(tune_command), [str(a) for a in (
        "--cache", store, "--data", data, "--out", out, "--space", root / "space.toml", "--trials", 2, "--seeds", 0,
        "--top-k", 1)])
    assert result.exit_code == 130 and result.stderr.strip().splitlines()[-1] == "error: interrupted (Ctrl-C)"
    assert "UnboundLocalError" not in result.output and sent
    states = [t.state for t in load(out).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]  # the 2nd stopped at its start
    code, output = tune(toy, out, "--space", toy[0] / "space.toml", "--trials", 2, "--seeds", 0, "--top-k", 1)
    assert code == 0 and len(finished(load(out))) == 2 and (out / "best.toml").is_file(), output


# ------------------------------------------------------------------------------------------ trials side by side
DENSITY = (f"[space]\nlr = {{ log_uniform = [1e-7, 1e-1] }}\n[fixed]\nhead = \"density\"\nepochs = 4\n"
           f"eval_every = 1\n{FIXED}")


@pytest.mark.slow
def test_trials_side_by_side_train_as_they_would_alone(toy, tmp_path):
    """--parallel 2: one sweep of two trials per group. The group's first trial is the very run `biomass train` makes
    with its settings on the study's folds (same batches, same initial weights)."""
    root, data, store = toy
    out = tmp_path / "side"
    space = write(tmp_path, DENSITY)
    out.mkdir()
    study = optuna.create_study(study_name="side", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    for lr in (3e-2, 1e-2, 2e-2):
        study.enqueue_trial({"lr": lr})
    code, output = tune(toy, out, "--space", space, "--trials", 3, "--parallel", 2, "--pruner", "none",
                        "--seeds", 0, "--top-k", 1)
    assert code == 0, output
    trials = load(out).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert [t.user_attrs["run_dir"] for t in trials] == [str(out / "trials" / n) for n in ("0000", "0000", "0002")]
    group = json.loads((out / "trials" / "0000" / "metrics.json").read_text())
    assert set(group["heads"]) == {"trial0000", "trial0001"}
    assert trials[1].value == pytest.approx(group["heads"]["trial0001"]["competition_r2"])
    alone, config = tmp_path / "alone", tmp_path / "trial0.toml"
    config.write_text("[train]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                            for k, v in trials[0].user_attrs["train"].items()))
    code, output = invoke(train_command, "--cache", store, "--data", data, "--out", alone, "--config", config,
                          "--folds-csv", out / "folds.csv")
    assert code == 0, output
    pd.testing.assert_frame_equal(pd.read_csv(alone / "oof.csv"), pd.read_csv(out / "trials" / "0000" /
                                                                             "oof_trial0000.csv"))


@pytest.mark.slow
def test_a_trial_pruned_in_a_group_stops_alone(toy, tmp_path):
    """A trial that cannot learn beside one that does, after a group of the same two (the median pruner compares with
    finished trials; in the same places of a group they train alike): it stops within fold 0, the other finishes;
    the group's folder keeps the finished trial's models only."""
    out = tmp_path / "prune"
    space = write(tmp_path, DENSITY)
    out.mkdir()
    study = optuna.create_study(study_name="prune", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    for lr in (1e-7, 3e-2, 1e-7, 3e-2):
        study.enqueue_trial({"lr": lr})
    code, output = tune(toy, out, "--space", space, "--trials", 4, "--parallel", 2, "--pruner", "median",
                        "--prune-after", 1, "--seeds", 0, "--top-k", 1)
    assert code == 0, output
    states = [t.state for t in load(out).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED,
                                                              optuna.trial.TrialState.COMPLETE]
    bad, good = load(out).trials[2:]
    assert len(good.intermediate_values) == 3 * 4 and len(bad.intermediate_values) < 4
    run = out / "trials" / "0002"
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["heads"]) == ["trial0003"] and metrics["stopped"]["trial0002"].startswith("fold0: pruned")
    assert sorted(p.name for p in run.glob("fold*/*.json")) == ["trial0003.json"] * 3
    assert not (run / "oof_trial0002.csv").exists()


def test_side_by_side_refuses_a_space_that_changes_the_batches(toy, tmp_path):
    space = write(tmp_path, f"[space]\nepochs = {{ int = [2, 4] }}\n[fixed]\n{FIXED}")
    code, output = tune(toy, tmp_path / "s", "--space", space, "--trials", 2, "--parallel", 2)
    assert code == 2 and "error: --parallel 2: the space searches ['epochs'], which define the batches" in output


@pytest.mark.slow
def test_the_second_stage_stacks_a_trials_seeds_as_train_seeds_does(toy, tmp_path):
    """Where the folds stack (here forced on the CPU), the second stage trains a trial's seeds x folds as one model:
    its seed runs are `biomass train --seeds` fold by fold on the study's folds, within float tolerance."""
    root, data, store = toy
    space = write(tmp_path, f"""[space]\nlr = {{ log_uniform = [1e-3, 3e-2] }}\n[fixed]\nhead = "density"
epochs = 3\nprecision = "fp32"\nstack_folds = true\n{FIXED}""")
    out = tmp_path / "study"
    code, output = tune(toy, out, "--space", space, "--trials", 1, "--pruner", "none", "--top-k", 1, "--seeds", 2)
    assert code == 0, output
    assert "6 folds stacked" in output  # 2 seeds x 3 folds; the search's trial trained fold by fold
    code, output = invoke(train_command, "--cache", store, "--data", data, "--out", tmp_path / "loop", "--config",
                          out / "best.toml", "--folds-csv", out / "folds.csv", "--seeds", "1,2", "--no-stack-folds",
                          "--no-plots")
    assert code == 0, output
    for seed in (1, 2):
        a, b = (pd.read_csv(d / f"seed{seed}" / "oof.csv") for d in (out / "stage2" / "0000", tmp_path / "loop"))
        np.testing.assert_allclose(a[list(TARGETS)], b[list(TARGETS)], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_stopped_second_stage_resumes_and_more_seeds_extend_it(toy, tmp_path, monkeypatch):
    """Ctrl-C in the second stage's last seed: the same command trains that seed again (its unfinished folder is the
    study's own) and keeps the seeds already run; asking for more seeds later trains only those."""
    from biomass_cache.train.crossval import CrossValidation

    space = write(tmp_path, f"""[space]\nlr = {{ log_uniform = [1e-3, 3e-2] }}\n[fixed]\nhead = "density"
epochs = 2\n{FIXED}""")
    out, args = tmp_path / "study", ["--space", space, "--trials", 1, "--pruner", "none", "--top-k", 1]
    trained, seeds_run, stops = CrossValidation.train_fold_by_fold, [], [KeyboardInterrupt]

    def stop_in_the_last_seed(self, on_epoch):
        seeds_run.append(self.cfg.seed)
        if self.out.name == "seed2" and stops:
            raise stops.pop()
        return trained(self, on_epoch)

    monkeypatch.setattr(CrossValidation, "train_fold_by_fold", stop_in_the_last_seed)
    root, data, store = toy
    stopped = CliRunner().invoke(script_app(tune_command), [str(a) for a in (
        "--cache", store, "--data", data, "--out", out, *args, "--seeds", 2)])
    assert stopped.exit_code == 130, stopped.output
    first = (out / "stage2" / "0000" / "seed1" / "metrics.json").read_bytes()
    seeds_run.clear()
    code, output = tune(toy, out, *args, "--seeds", 2)
    assert code == 0 and seeds_run == [2], (seeds_run, output)
    assert (out / "stage2" / "0000" / "seed1" / "metrics.json").read_bytes() == first
    seeds_run.clear()
    code, output = tune(toy, out, *args, "--seeds", 3)
    assert code == 0 and seeds_run == [3], (seeds_run, output)
    assert json.loads((out / "stage2.json").read_text())["rows"][0]["seeds"] == [1, 2, 3]


def test_a_group_folder_is_found_in_the_study_folder_from_any_directory(tmp_path):
    """A side-by-side group's folder recorded as a relative path from another directory: still the study's own
    (`--keep top` once deleted a folder of that name under the current directory)."""
    from types import SimpleNamespace

    from biomass_cache.train.tune import run_dir_of

    st = SimpleNamespace(out=tmp_path / "study")
    assert run_dir_of(st, SimpleNamespace(number=3, user_attrs={"run_dir": "P/trials/0002"})) == \
        tmp_path / "study" / "trials" / "0002"
    assert run_dir_of(st, SimpleNamespace(number=3, user_attrs={})) == tmp_path / "study" / "trials" / "0003"


def test_a_study_folder_holds_one_study(tmp_path):
    """A second --study in the same --out is refused (it reused the first study's second stage, and its trial
    folders collided with the first's); the same study resumes; a folder from before study.json is its storage's
    study's."""
    from biomass_cache.train.tune import claim_folder

    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    claim_folder(tmp_path, "A", storage)
    claim_folder(tmp_path, "A", storage)
    with pytest.raises(DataError, match=f"{tmp_path} holds the trials of study 'A': resume it with --study A, or "
                                        "give study 'B' another --out"):
        claim_folder(tmp_path, "B", storage)
    older = tmp_path / "older"  # from before study.json: a second stage names the study
    older.mkdir()
    (older / "stage2.json").write_text(json.dumps({"study": "A"}))
    with pytest.raises(DataError, match="holds the trials of study 'A'"):
        claim_folder(older, "B", storage)
    midway = tmp_path / "midway"  # from before study.json, no second stage yet: its trials are its storage's study
    (midway / "trials" / "0000").mkdir(parents=True)
    optuna.create_study(storage=storage, study_name="midway")
    with pytest.raises(DataError, match="holds the trials of study 'midway'"):
        claim_folder(midway, "other", storage)
    claim_folder(midway, "midway", storage)
