"""`biomass tune`: an Optuna study over `[train]` settings on a token cache, then a multi-seed re-check of the best.

Every trial is a grouped k-fold run (train.crossval.run_training) on the study folder's folds.csv, scored by its pooled OOF
competition_r2. While a trial trains it reports, after every (fold, epoch), the mean of its folds' latest validation
scores (finished folds: their last epoch; the running fold: this epoch) at step = epochs done so far, so a pruner
compares trials on the same fold at the same epoch and stops bad ones early (with `epochs` searched: at equal
epochs done). The second stage re-runs the top K
trials with fresh seeds on the same folds (single runs on a few hundred images differ mostly by noise) and writes
the one with the best mean as STUDY_DIR/best.toml. `--parallel K` trains K trials at a time side by side, as the
members of one sweep (`optimize_side_by_side`); the storage, pruner, folds and workers are train/tune_study.py.

STUDY_DIR/
  study.db                    the Optuna storage unless --storage names another (sqlite, database URL, journal file)
  study.json                  the study this folder holds (another study is refused: its trial numbers would collide)
  folds.csv                   the folds of every trial (written once; recorded in the study with the cache fingerprint)
  trials/NNNN/                each trial's run folder (history.csv of a pruned trial stops at its last epoch); with
                              --parallel, a group's (NNNN: its first trial), one sweep member per trial
  stage2/NNNN/seedS/          the second stage's runs
  stage2.json, best.toml      the second stage's table and the winner's [train] config
  plots/*.png                 optimisation history, parameter importances, parallel coordinates
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
from tqdm.auto import tqdm

from biomass_cache.common.config import MAX_SEED
from biomass_cache.common.data import read_training_table
from biomass_cache.common.errors import DataError
from biomass_cache.common.io import atomic_path, write_json
from biomass_cache.common.signals import HeldStop, held_stops
from biomass_cache.store.layout import open_store
from biomass_cache.train.config import SHARED_KEYS, TrainConfig, resolve
from biomass_cache.train.crossval import run_training, seed_dir
from biomass_cache.train.runs import write_history
from biomass_cache.train.tune_space import Space, parse_space
from biomass_cache.train.tune_study import (PRUNERS, check_recorded, fail_dead_trials, load_optuna, make_pruner,
                                           open_storage, study_folds, worker_id)

KEEP = ("all", "top")


# ----------------------------------------------------------------------------------------------------- the study
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
    parallel: int = 1  # trials trained side by side, on the same batches (`optimize_side_by_side`)

    def check(self) -> None:
        if self.trials < 1 or self.top_k < 1 or self.parallel < 1 or self.seeds < 0 or self.prune_after < 0:
            raise DataError(f"--trials, --top-k and --parallel must be >= 1, --seeds and --prune-after >= 0; got "
                            f"trials {self.trials}, top-k {self.top_k}, parallel {self.parallel}, seeds {self.seeds}, "
                            f"prune-after {self.prune_after}")
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
        state = load_optuna().trial.TrialState
        return self.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED))

    def ranked(self) -> list:
        """Completed trials, best first."""
        state = load_optuna().trial.TrialState
        return sorted(self.study.get_trials(deepcopy=False, states=(state.COMPLETE,)), key=lambda t: -t.value)

    def run(self, train: dict, run_dir: Path, on_epoch=None, side_by_side: dict[str, dict] | None = None,
            seeds: list[int] | None = None) -> dict:
        """One trial's run (`train`), or several trials' as members of one sweep (`side_by_side`: member name ->
        [train] settings, sharing `train`'s batch-defining keys), or one trial's run per seed (`seeds`: in
        `run_dir`/seedS, stacked where the folds stack; returns {seed: metrics}). The seeds' folders are the
        study's own, only ever asked for when unfinished: what a stopped second stage left in them is replaced."""
        sweep = [] if side_by_side is None else [
            {"name": n, **{k: v for k, v in t.items() if k not in SHARED_KEYS}} for n, t in side_by_side.items()]
        cfg, members = resolve(train, sweep, {"plots": False, "folds": self.n_folds}, None)
        return run_training(self.cache, self.data, run_dir, cfg, members, folds_csv=self.out / "folds.csv",
                            on_epoch=on_epoch, stops=(load_optuna().TrialPruned,), seeds=seeds,
                            overwrite=seeds is not None)


def trial_dir(out: Path, number: int) -> Path:
    return out / "trials" / f"{number:04d}"


def run_dir_of(st: Study, trial) -> Path:
    """A trial's run folder: its own, or its group's (trials trained side by side share one), in this study folder
    whatever path the group's was recorded by (another current directory, another mount of a shared folder)."""
    group = trial.user_attrs.get("run_dir")
    return trial_dir(st.out, trial.number) if group is None else st.out / "trials" / Path(group).name


def claim(st: Study, trial) -> None:
    """Take a slot of the study for `trial`, or raise Surplus when the study's trials are finished or running."""
    state = load_optuna().trial.TrialState
    trial.set_user_attr("worker", worker_id())
    fail_dead_trials(st.study)  # a process of this machine killed since the start does not hold a slot
    ahead = [t for t in st.study.get_trials(deepcopy=False, states=(state.RUNNING,)) if t.number < trial.number]
    if len(st.finished()) + len(ahead) >= st.settings.trials:
        trial.set_user_attr("surplus", True)
        raise Surplus(f"the study's {st.settings.trials} trials are finished or running elsewhere")


def report_fold(trial, fold_scores: dict[str, float], row: dict, step: int) -> bool:
    """Report a validated history row: the mean of the trial's folds' latest validation scores (finished folds:
    their last epoch; the running fold: this one) at `step`. Returns whether the pruner stops the trial."""
    fold_scores[row["fold"]] = row["val_competition_r2"]
    trial.report(float(np.mean(list(fold_scores.values()))), step=step)
    return trial.should_prune()


def objective(st: Study, trial) -> float:
    """One trial: sample its [train] settings, cross-validate on the study's folds, report every (fold, epoch)."""
    optuna = load_optuna()
    try:
        claim(st, trial)
    except Surplus:
        st.study.stop()
        raise
    st.stop.check()
    train = st.space.train_section(trial)
    trial.set_user_attr("train", train)
    run_dir, rows, fold_scores = trial_dir(st.out, trial.number), [], {}

    def report(epoch_rows: list[dict]) -> None:
        st.stop.check()
        if "val_competition_r2" not in epoch_rows[0]:  # an epoch between two validations (eval_every)
            return
        rows.extend(epoch_rows)
        if report_fold(trial, fold_scores, epoch_rows[0], step=len(rows) - 1):
            write_history(run_dir, rows)
            raise optuna.TrialPruned(f"{epoch_rows[0]['fold']} epoch {epoch_rows[0]['epoch']}")

    try:
        return st.run(train, run_dir, report)["competition_r2"]
    except FloatingPointError as e:  # diverged (e.g. too high an lr): this trial fails, the study goes on
        trial.set_user_attr("fail_reason", str(e))
        raise


def progress(st: Study, trial) -> None:
    """After each trial of this process: one line (and, with --keep top, drop the folders no longer needed)."""
    state = load_optuna().trial.TrialState
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
    state = load_optuna().trial.TrialState
    keep = {run_dir_of(st, t) for t in st.ranked()[:st.settings.top_k]}
    keep |= {run_dir_of(st, t) for t in st.study.get_trials(deepcopy=False, states=(state.RUNNING,))}
    for t in st.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.FAIL)):
        if run_dir_of(st, t) not in keep and run_dir_of(st, t).exists():
            shutil.rmtree(run_dir_of(st, t), ignore_errors=True)


def optimize_side_by_side(st: Study) -> None:
    """`--parallel K`: ask K trials at a time (Optuna's ask and tell) and train them as the members of one sweep, in
    one pass over the tokens: every member sees the same batches; its weights start from the seed of its place in the
    group. Each reports its own validation scores and is pruned alone (it stops; the others go on). A member that
    diverges fails its whole group. Whether trials train alone or side by side can change between resumptions."""
    state = load_optuna().trial.TrialState
    started = 0
    while len(st.finished()) < st.settings.trials and started < 2 * st.settings.trials:
        fail_dead_trials(st.study)
        running = len(st.study.get_trials(deepcopy=False, states=(state.RUNNING,)))
        group = []
        for _ in range(min(st.settings.parallel, st.settings.trials - len(st.finished()) - running)):
            trial = st.study.ask()
            started += 1
            try:
                claim(st, trial)
            except Surplus:
                st.study.tell(trial, state=state.FAIL)
                break
            group.append(trial)
        if not group:
            return
        run_group(st, group)


def run_group(st: Study, group: list) -> None:
    """Train the trials of `group` side by side in STUDY_DIR/trials/NNNN (the first one's number); tell each."""
    state = load_optuna().trial.TrialState
    run_dir = trial_dir(st.out, group[0].number)
    trains = {f"trial{t.number:04d}": st.space.train_section(t) for t in group}
    by_name = dict(zip(trains, group))
    for t, train in zip(group, trains.values()):
        t.set_user_attr("train", train)
        t.set_user_attr("run_dir", str(run_dir))
    fold_scores: dict[str, dict[str, float]] = {n: {} for n in trains}
    reports = dict.fromkeys(trains, 0)

    def report(rows: list[dict]) -> dict[str, str]:  # as `objective`'s, member by member
        st.stop.check()
        stop = {}
        for r in (r for r in rows if "val_competition_r2" in r):  # epochs between two validations: nothing
            if report_fold(by_name[r["head"]], fold_scores[r["head"]], r, step=reports[r["head"]]):
                stop[r["head"]] = f"pruned at epoch {r['epoch']}"
            reports[r["head"]] += 1
        return stop

    try:
        metrics = st.run(next(iter(trains.values())), run_dir, report, side_by_side=trains)
    except FloatingPointError as e:  # a member diverged: the group's trials fail, the study goes on
        for t in group:
            t.set_user_attr("fail_reason", str(e))
            st.study.tell(t, state=state.FAIL)
    except BaseException:
        for t in group:
            st.study.tell(t, state=state.FAIL)
        raise
    else:
        for name, t in by_name.items():
            if name in metrics["heads"]:
                st.study.tell(t, metrics["heads"][name]["competition_r2"])
            else:
                st.study.tell(t, state=state.PRUNED)
    for t in group:
        progress(st, st.study.get_trials(deepcopy=False)[t.number])


# ------------------------------------------------------------------------------------ second stage and results
def second_stage(st: Study) -> dict:
    """Re-run the top K trials with fresh seeds on the study's folds; the best mean wins. Finished runs are reused."""
    top = st.ranked()[:st.settings.top_k]
    if not top:
        raise DataError(f"study {st.study.study_name!r} has no completed trial (all pruned or failed): nothing to "
                        "re-check; widen the space or use --pruner none")
    base = int(st.space.fixed.get("seed", TrainConfig.seed))
    seeds = [(base + s) % (MAX_SEED + 1) for s in range(1, st.settings.seeds + 1)]  # past the largest: from 0
    rows = []
    for t in top:
        parent = st.out / "stage2" / f"{t.number:04d}"
        missing = [s for s in seeds if not (seed_dir(parent, s) / "metrics.json").is_file()]
        if missing:  # the seeds of a trial train together: stacked as one model where the folds stack (a GPU)
            st.run(t.user_attrs["train"], parent, seeds=missing)
        scores = [json.loads((seed_dir(parent, s) / "metrics.json").read_text())["competition_r2"] for s in seeds]
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


def claim_folder(out: Path, name: str, storage) -> None:
    """A study folder holds one study's trials and second stage (their folders are named by trial number):
    recorded in STUDY_DIR/study.json (created once, atomically), another study is refused. A folder from before
    study.json: its owner is the study its second stage names, else, when it holds trials, one of its storage's."""
    path = out / "study.json"
    if not path.is_file():
        owner = json.loads((out / "stage2.json").read_text()).get("study") if (out / "stage2.json").is_file() else None
        trials = out / "trials"
        if owner is None and trials.is_dir() and any(trials.iterdir()):
            names = load_optuna().get_all_study_names(storage)
            owner = name if name in names else (names[0] if len(names) == 1 else f"one of {names}")
        tmp = out / f".study.json.{os.getpid()}"
        tmp.write_text(json.dumps({"study": owner or name}))
        try:
            os.link(tmp, path)  # fails when another process recorded its study first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    owner = json.loads(path.read_text())["study"]
    if owner != name:
        raise DataError(f"{out} holds the trials of study {owner!r}: resume it with --study {owner}, or give "
                        f"study {name!r} another --out")


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
    optuna = load_optuna()
    state = optuna.trial.TrialState
    space = parse_space(space_path)
    store = open_store(cache)
    table = read_training_table(Path(data) / "train.csv", check_images=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    url = settings.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = settings.study or out.resolve().name
    storage = open_storage(url)
    claim_folder(out, name, storage)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                pruner=make_pruner(settings.pruner, settings.prune_after))
    check_recorded(study, "cache_fingerprint", store.fingerprint, f"token cache than {cache}")
    check_recorded(study, "space", space.doc, f"space than {space_path}")
    shared = sorted({p.name for p in space.params} & set(SHARED_KEYS))
    if settings.parallel > 1 and shared:
        raise DataError(f"--parallel {settings.parallel}: the space searches {shared}, which define the batches that "
                        "trials trained side by side share; fix them in [fixed], or use --parallel 1")
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
            if settings.parallel > 1:
                optimize_side_by_side(st)
            else:
                study.optimize(lambda trial: objective(st, trial), n_trials=2 * settings.trials,
                               catch=(Surplus, FloatingPointError),
                               callbacks=[enough, lambda _, trial: progress(st, trial)])
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
        summary.update(top_k=settings.top_k, seeds=settings.seeds)
        earlier = json.loads(done.read_text()) if done.is_file() else {}
        if all(earlier.get(k) == summary[k] for k in ("finished", "top_k", "seeds")):
            tqdm.write(f"the second stage of these {summary['finished']} trials (top {settings.top_k}, "
                       f"{settings.seeds} seeds) is done: {done}")
            return {**summary, **earlier}
        summary.update(second_stage(st))
        if settings.keep == "top":
            drop_folders(st)
        write_json(out / "stage2.json", summary)
    tqdm.write("\nsecond stage (top trials re-run with fresh seeds on the study's folds):\n" + _table(summary["rows"]))
    tqdm.write(f"winner: trial {summary['winner']} -> {summary['best_toml']}; plots in {out / 'plots'}")
    return summary
