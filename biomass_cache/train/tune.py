"""`biomass tune`: an Optuna study over `[train]` settings on a token cache, then a multi-seed re-check of the best.

Every trial is a grouped k-fold run (train.crossval.run_training) on the study folder's folds.csv, scored by its pooled OOF
competition_r2. While a trial trains it reports, after every (fold, epoch), the mean of its folds' latest validation
scores (finished folds: their last epoch; the running fold: this epoch) at step = epochs done so far, so a pruner
compares trials on the same fold at the same epoch and stops bad ones early (with `epochs` searched: at equal
epochs done). The second stage re-runs the top K
trials with fresh seeds on the same folds (single runs on a few hundred images differ mostly by noise) and writes
the one with the best mean as STUDY_DIR/best.toml.

STUDY_DIR/
  study.db                    the Optuna storage unless --storage names another (sqlite, database URL, journal file)
  folds.csv                   the folds of every trial (written once; recorded in the study with the cache fingerprint)
  trials/NNNN/                each trial's run folder (history.csv of a pruned trial stops at its last epoch)
  stage2/NNNN/seedS/          the second stage's runs
  stage2.json, best.toml      the second stage's table and the winner's [train] config
  plots/*.png                 optimisation history, parameter importances, parallel coordinates
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomllib
from tqdm.auto import tqdm

from biomass_cache.common.data import read_training_table
from biomass_cache.common.errors import DataError
from biomass_cache.common.folds import grouped_folds, read_folds, write_folds
from biomass_cache.common.io import atomic_path, write_json
from biomass_cache.common.signals import HeldStop, held_stops
from biomass_cache.store.fingerprint import diff as fingerprint_diff
from biomass_cache.store.layout import open_store
from biomass_cache.train.config import TrainConfig, resolve
from biomass_cache.train.crossval import run_training
from biomass_cache.train.runs import write_history
from biomass_cache.train.tune_space import Space, parse_space

PRUNERS = ("median", "halving", "none")
KEEP = ("all", "top")


# ----------------------------------------------------------------------------------------------------- the study
def _optuna():
    try:
        import optuna
    except ImportError as e:
        raise DataError('biomass tune needs Optuna: pip install -e ".[tune]"') from e
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str):
    """`journal:PATH` -> a journal file (shared filesystems); anything else -> an SQLAlchemy database URL."""
    optuna = _optuna()
    for attempt in range(3):  # processes started together race to create a new database's tables: the loser retries
        try:
            if url.startswith("journal:"):
                from optuna.storages.journal import JournalFileBackend

                path = Path(url.removeprefix("journal:"))
                path.parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
            return optuna.storages.RDBStorage(url)
        except Exception as e:  # any driver, path or URL error: the storage cannot be used
            if attempt == 2 or url.startswith("journal:"):
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"  # not the SQL that failed
                if any(words in str(e) for words in ("disk is full", "disk I/O error", "File too large")):
                    raise DataError(f"the study's storage {url} cannot be written ({reason}): free space or raise "
                                    "ulimit -f, or give the study another --out or --storage") from e
                raise DataError(f"the study's storage {url} cannot be opened ({reason}); give --storage "
                                "sqlite:///PATH, journal:PATH or a database URL") from e
            time.sleep(1 + attempt)


def make_pruner(kind: str, prune_after: int):
    optuna = _optuna()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=prune_after)
    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def study_folds(study, study_dir: Path, table: pd.DataFrame, n_folds: int, seed: int,
                folds_csv: Path | None) -> dict[str, int]:
    """The study's folds: the recorded ones (a new study records them); STUDY_DIR/folds.csv holds them."""
    target = study_dir / "folds.csv"
    recorded = study.user_attrs.get("folds")
    given = folds_csv or (target if target.is_file() else None)
    folds = None if given is None else read_folds(given, table)
    if recorded is None:
        if folds is None:
            folds = grouped_folds(table, n_splits=n_folds, seed=seed)
        recorded = dict(zip(table["image_id"], folds.tolist()))
        study.set_user_attr("folds", recorded)
    elif folds is not None and dict(zip(table["image_id"], folds.tolist())) != recorded:
        raise DataError(f"{given}: these folds differ from the ones recorded in study {study.study_name!r}; "
                        "resume with the study's folds (remove the file to have them rewritten) or start a new "
                        "--study")
    if set(table["image_id"]) != set(recorded):
        other = sorted(set(table["image_id"]) ^ set(recorded))
        raise DataError(f"study {study.study_name!r} was run on other images than {len(table)} of this data "
                        f"({len(other)} differ, e.g. {other[:5]}); resume with the study's data or start a new --study")
    write_folds(target, table, np.array([recorded[i] for i in table["image_id"]]))
    return recorded


def check_recorded(study, key: str, value: Any, what: str) -> None:
    """Record `value` in a new study; refuse to resume a study that recorded another one."""
    value, recorded = json.loads(json.dumps(value)), study.user_attrs.get(key)  # as the storage keeps it
    if recorded is None:
        study.set_user_attr(key, value)
    elif recorded != value:
        diff = "; ".join(fingerprint_diff(recorded, value)) if key == "cache_fingerprint" else ""
        raise DataError(f"study {study.study_name!r} was run with another {what}" + (f" ({diff})" if diff else "")
                        + "; resume with the same one or start a new --study")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(worker: str) -> bool:
    """False only for a process of this host that no longer exists (other hosts cannot be checked)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study) -> list[int]:
    """Mark FAIL the trials left running by killed processes of this host, so a restart neither waits for them nor
    counts them; their numbers are not reused."""
    state = _optuna().trial.TrialState
    dead = [t.number for t in study.get_trials(deepcopy=False, states=(state.RUNNING,))
            if not _alive(t.user_attrs.get("worker", ""))]
    for number in dead:
        study.tell(number, state=state.FAIL, skip_if_finished=True)
    return dead


class Surplus(Exception):
    """A trial beyond the study's total (other processes hold the last slots): recorded FAIL, never trained."""


@dataclass
class Settings:
    """`biomass tune`'s options other than the paths (see `tune_command`)."""

    trials: int
    storage: str | None = None  # default: sqlite:///STUDY_DIR/study.db
    study: str | None = None  # default: STUDY_DIR's name
    pruner: str = "median"
    prune_after: int = 5  # median pruner: trials finished before any is pruned
    top_k: int = 3
    seeds: int = 3  # second stage: fresh seeds per top trial (0 = no re-check; the best trial wins)
    keep: str = "all"
    folds: int | None = None  # folds of a new study (default: [fixed] folds, else 5)
    folds_csv: Path | None = None

    def check(self) -> None:
        if self.trials < 1 or self.top_k < 1 or self.seeds < 0 or self.prune_after < 0:
            raise DataError(f"--trials and --top-k must be >= 1, --seeds and --prune-after >= 0; got trials "
                            f"{self.trials}, top-k {self.top_k}, seeds {self.seeds}, prune-after {self.prune_after}")
        if self.pruner not in PRUNERS or self.keep not in KEEP:
            raise DataError(f"--pruner must be one of {list(PRUNERS)} and --keep one of {list(KEEP)}; got "
                            f"{self.pruner!r}, {self.keep!r}")
        if self.folds is not None and self.folds < 2:
            raise DataError(f"--folds must be at least 2, got {self.folds}")


@dataclass
class Study:
    """One open study and what every trial shares."""

    study: Any  # optuna.Study
    space: Space
    cache: Path
    data: Path
    out: Path
    settings: Settings
    n_folds: int
    stop: HeldStop = field(default_factory=HeldStop)  # Ctrl-C / SIGTERM, raised only inside a trial (see tune)

    def finished(self) -> list:
        state = _optuna().trial.TrialState
        return self.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))

    def ranked(self) -> list:
        """Completed trials, best first."""
        state = _optuna().trial.TrialState
        return sorted(self.study.get_trials(deepcopy=False, states=(state.COMPLETE,)), key=lambda t: -t.value)

    def run(self, train: dict, run_dir: Path, on_epoch=None) -> dict:
        cfg, members = resolve(train, [], {"plots": False, "folds": self.n_folds}, None)
        return run_training(self.cache, self.data, run_dir, cfg, members, folds_csv=self.out / "folds.csv",
                            on_epoch=on_epoch, stops=(_optuna().TrialPruned,))


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def objective(st: Study, trial) -> float:
    """One trial: sample its [train] settings, cross-validate on the study's folds, report every (fold, epoch)."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    trial.set_user_attr("worker", worker_id())
    fail_dead_trials(st.study)  # a process of this machine killed since the start does not hold a slot
    ahead = [t for t in st.study.get_trials(deepcopy=False, states=(state.RUNNING,)) if t.number < trial.number]
    if len(st.finished()) + len(ahead) >= st.settings.trials:
        trial.set_user_attr("surplus", True)
        st.study.stop()
        raise Surplus(f"the study's {st.settings.trials} trials are finished or running elsewhere")
    st.stop.check()
    train = st.space.train_section(trial)
    trial.set_user_attr("train", train)
    run_dir, rows, fold_scores = trial_dir(st.out, trial.number), [], {}

    def report(epoch_rows: list[dict]) -> None:
        st.stop.check()
        if "val_competition_r2" not in epoch_rows[0]:  # an epoch between two validations (eval_every)
            return
        rows.extend(epoch_rows)
        fold_scores[epoch_rows[0]["fold"]] = epoch_rows[0]["val_competition_r2"]
        trial.report(float(np.mean(list(fold_scores.values()))), step=len(rows) - 1)
        if trial.should_prune():
            write_history(run_dir, rows)
            raise optuna.TrialPruned(f"{epoch_rows[0]['fold']} epoch {epoch_rows[0]['epoch']}")

    try:
        return st.run(train, run_dir, report)["competition_r2"]
    except FloatingPointError as e:  # diverged (e.g. too high an lr): this trial fails, the study goes on
        trial.set_user_attr("fail_reason", str(e))
        raise


def progress(st: Study, trial) -> None:
    """After each trial of this process: one line (and, with --keep top, drop the folders no longer needed)."""
    state = _optuna().trial.TrialState
    if trial.user_attrs.get("surplus"):
        return
    what = {state.COMPLETE: f"OOF competition_r2 {trial.value:.4f}" if trial.value is not None else "complete",
            state.PRUNED: f"pruned after {len(trial.intermediate_values)} epoch(s)",
            state.FAIL: f"failed ({trial.user_attrs.get('fail_reason', 'see above')})"}.get(trial.state, "")
    ranked = st.ranked()
    best = f"best {ranked[0].value:.4f} (trial {ranked[0].number})" if ranked else "no completed trial yet"
    tqdm.write(f"trial {trial.number}: {what}; {len(st.finished())}/{st.settings.trials} finished, {best}")
    if st.settings.keep == "top":
        drop_folders(st)


def drop_folders(st: Study) -> None:
    """--keep top: delete the run folders of finished trials outside the top K (running ones are never touched)."""
    state = _optuna().trial.TrialState
    keep = {t.number for t in st.ranked()[:st.settings.top_k]}
    for t in st.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.FAIL)):
        if t.number not in keep and trial_dir(st.out, t.number).exists():
            shutil.rmtree(trial_dir(st.out, t.number), ignore_errors=True)


# ------------------------------------------------------------------------------------ second stage and results
def second_stage(st: Study) -> dict:
    """Re-run the top K trials with fresh seeds on the study's folds; the best mean wins. Finished runs are reused."""
    top = st.ranked()[:st.settings.top_k]
    if not top:
        raise DataError(f"study {st.study.study_name!r} has no completed trial (all pruned or failed): nothing to "
                        "re-check; widen the space or use --pruner none")
    base = int(st.space.fixed.get("seed", TrainConfig.seed))
    seeds = [base + s for s in range(1, st.settings.seeds + 1)]
    rows = []
    for t in top:
        scores = []
        for seed in seeds:
            run_dir = st.out / "stage2" / f"{t.number:04d}" / f"seed{seed}"
            done = run_dir / "metrics.json"
            metrics = (json.loads(done.read_text()) if done.is_file()
                       else st.run({**t.user_attrs["train"], "seed": seed}, run_dir))
            scores.append(metrics["competition_r2"])
        rows.append({"trial": t.number, "search_r2": t.value, "seeds": seeds, "r2": scores,
                     "mean": float(np.mean(scores)) if scores else t.value,
                     "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else None, "train": t.user_attrs["train"]})
    winner = max(rows, key=lambda r: r["mean"])
    return {"rows": rows, "winner": winner["trial"], "best_toml": str(write_best(st, winner))}


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, booleans and lists are written alike in JSON and TOML


def write_best(st: Study, row: dict) -> Path:
    """STUDY_DIR/best.toml: the winner's [train] settings (with the study's number of folds), for `biomass train`."""
    train = {**row["train"], "folds": st.n_folds}
    spread = (f"second stage, seeds {row['seeds']}: {row['mean']:.4f} +- {row['std']:.4f} (std)" if row["std"]
              is not None else f"second stage, seeds {row['seeds']}: {row['mean']:.4f}" if row["seeds"] else
              "no second stage (--seeds 0)")
    text = "\n".join([
        f"# biomass tune: trial {row['trial']} of study {st.study.study_name!r}",
        f"# OOF competition_r2: search {row['search_r2']:.4f}; {spread}",
        f"# the study's folds: {st.out / 'folds.csv'} (the same folds: biomass train --config THIS --folds-csv it)",
        "[train]", *(f"{k} = {toml_value(v)}" for k, v in train.items()), ""])
    if tomllib.loads(text)["train"] != train:
        raise AssertionError(f"best.toml does not read back as {train}")
    path = st.out / "best.toml"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_plots(st: Study) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNG (skipped while too few trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    written = []
    for name, plot in (("history", vis.plot_optimization_history), ("importances", vis.plot_param_importances),
                       ("parallel", vis.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():  # optuna's notes on small studies (equal importances, flat axes)
                warnings.simplefilter("ignore", UserWarning)
                ax = plot(st.study)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:
            tqdm.write(f"plot {name} skipped: {e}")
            continue
        fig = ax.figure
        path = st.out / "plots" / f"{name}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def _stage_lock(out: Path):
    """An exclusive lock on STUDY_DIR/stage2.lock (freed when the process ends), or None when another holds it."""
    f = open(out / "stage2.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _table(rows: list[dict]) -> str:
    lines = [f"{'trial':>6} {'search':>8} {'mean':>8} {'std':>8}  seeds' OOF competition_r2"]
    for r in rows:
        std = f"{r['std']:.4f}" if r["std"] is not None else "-"
        lines.append(f"{r['trial']:>6} {r['search_r2']:>8.4f} {r['mean']:>8.4f} {std:>8}  "
                     + " ".join(f"{v:.4f}" for v in r["r2"]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- driver
def tune(cache: Path, data: Path, space_path: Path, out: Path, settings: Settings) -> dict:
    """Run (or continue) the study to `settings.trials` finished trials, then the second stage; returns the summary
    (also STUDY_DIR/stage2.json). With other processes still running trials, the last one to finish does stage two."""
    settings.check()
    optuna = _optuna()
    state = optuna.trial.TrialState
    space = parse_space(space_path)
    store = open_store(cache)
    table = read_training_table(Path(data) / "train.csv", check_images=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = settings.study or out.resolve().name
    study = optuna.create_study(storage=open_storage(url), study_name=name, direction="maximize", load_if_exists=True,
                                pruner=make_pruner(settings.pruner, settings.prune_after))
    check_recorded(study, "cache_fingerprint", store.fingerprint, f"token cache than {cache}")
    check_recorded(study, "space", space.doc, f"space than {space_path}")
    folds = study_folds(study, out, table, settings.folds or int(space.fixed.get("folds", 5)),
                        int(space.fixed.get("seed", TrainConfig.seed)), settings.folds_csv)
    n_folds = max(folds.values()) + 1
    if settings.folds is not None and settings.folds != n_folds:
        raise DataError(f"--folds {settings.folds}: study {name!r} has {n_folds} folds; resume without --folds")
    st = Study(study, space, Path(cache), Path(data), out, settings, n_folds)
    dead = fail_dead_trials(study)
    if dead:
        tqdm.write(f"trials {dead} were left running by a stopped process: marked failed (their numbers stay unused)")
    tqdm.write(f"study {name!r} ({url}): {len(st.finished())}/{settings.trials} trials finished, {n_folds} folds")
    if len(st.finished()) < settings.trials:
        enough = optuna.study.MaxTrialsCallback(settings.trials, states=(state.COMPLETE, state.PRUNED))
        # failed trials (diverged) do not count; starting at most 2N ends a space where every trial fails
        # A stop raised inside optuna's storage writes leaves it broken (UnboundLocalError): stops are held and
        # raised inside the trial, at its start or an epoch's end; optuna then records the trial failed.
        with held_stops() as st.stop:
            study.optimize(lambda trial: objective(st, trial), n_trials=2 * settings.trials,
                           catch=(Surplus, FloatingPointError), callbacks=[enough, lambda _, trial: progress(st, trial)])
    plots = write_plots(st)
    fail_dead_trials(study)
    running = [t.number for t in study.get_trials(deepcopy=False, states=(state.RUNNING,))]
    summary = {"study": name, "storage": url, "finished": len(st.finished()), "trials": settings.trials,
               "running": running, "plots": [str(p) for p in plots]}
    if running or len(st.finished()) < settings.trials:
        tqdm.write(f"{len(st.finished())}/{settings.trials} trials finished"
                   + (f", trials {running} still running elsewhere (the last process to finish runs the second stage)"
                      if running else "; run the command again to continue"))
        return summary
    lock = _stage_lock(out)
    if lock is None:
        tqdm.write(f"the second stage is running in another process ({out / 'stage2.lock'})")
        return summary
    with lock:
        done = out / "stage2.json"
        if done.is_file() and json.loads(done.read_text()).get("finished") == summary["finished"]:
            tqdm.write(f"the second stage of these {summary['finished']} trials was run by another process: {done}")
            return {**summary, **json.loads(done.read_text())}
        summary.update(second_stage(st))
        if settings.keep == "top":
            drop_folders(st)
        write_json(out / "stage2.json", summary)
    tqdm.write("\nsecond stage (top trials re-run with fresh seeds on the study's folds):\n" + _table(summary["rows"]))
    tqdm.write(f"winner: trial {summary['winner']} -> {summary['best_toml']}; plots in {out / 'plots'}")
    return summary
