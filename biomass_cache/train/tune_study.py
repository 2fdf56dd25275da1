"""`biomass tune`'s study: Optuna imported on demand, the storage, the pruner, the study's folds and recorded
settings, and the worker processes that share its trials (train/tune.py runs the study)."""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biomass_cache.common.errors import DataError
from biomass_cache.common.folds import grouped_folds, read_folds, write_folds
from biomass_cache.store.fingerprint import diff as fingerprint_diff

PRUNERS = ("median", "halving", "none")


def load_optuna():
    try:
        import optuna
    except ImportError as e:
        raise DataError('biomass tune needs Optuna: pip install -e ".[tune]"') from e
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str):
    """`journal:PATH` -> a journal file (shared filesystems); anything else -> an SQLAlchemy database URL."""
    optuna = load_optuna()
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
    optuna = load_optuna()
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
                        + "; resume with the same one, or start a new --study in another --out")


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
    state = load_optuna().trial.TrialState
    dead = [t.number for t in study.get_trials(deepcopy=False, states=(state.RUNNING,))
            if not _alive(t.user_attrs.get("worker", ""))]
    for number in dead:
        study.tell(number, state=state.FAIL, skip_if_finished=True)
    return dead
