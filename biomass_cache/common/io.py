"""Atomic file writes: every artefact appears whole or not at all; a write that fails names the file it was
writing (a full disk says which output), never a temporary name nor nothing."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from biomass_cache.common.errors import DataError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path, also=tmp):
            yield tmp
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_folder(path: str | Path, kind: str) -> Iterator[Path]:
    """Yield a temporary sibling `.NAME.KIND-PID` (not yet created) to build a folder in; it replaces `path` only if
    the block succeeds, and never outlives the block. Failures name `path`. A symbolic link is written through (the
    folder replaces its target, on the target's disk); what killed runs left beside `path` is removed first."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise DataError(f"{path}: is a file, not a folder; choose another output")
    tmp, old = (path.with_name(f".{path.name}.{k}-{os.getpid()}") for k in (kind, "old"))
    for leftover in (p for k in (kind, "old") for p in path.parent.glob(f".{path.name}.{k}-*")):
        if left_by_killed(leftover):
            remove_path(leftover)
    try:
        with writing(path, also=tmp):
            yield tmp
            if path.exists():  # renamed aside, not deleted in place: a kill meanwhile leaves no half-deleted `path`
                os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_path(path: Path) -> None:
    """Delete a folder, file or link, whatever is there (nothing if nothing is)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def left_by_killed(path: Path) -> bool:
    """Whether `path` (`.NAME.KIND-PID`) was left by a process of this machine that is gone (or by this process,
    which is not doing it now)."""
    pid = path.name.rpartition("-")[2]
    return pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def writing(path: str | Path, also: str | Path | None = None) -> Iterator[None]:
    """OSErrors raised inside that name no file (os.writev, zarr's stores, a full disk), or name the temporary
    file or folder `also` (or a file in it), are raised again naming `path`: the output the user chose."""
    try:
        yield
    except OSError as e:
        name, temporary = str(e.filename), str(also)
        if e.errno is not None and (e.filename is None or (also is not None and (
                name == temporary or name.startswith(temporary + os.sep)))):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def check_output_file(path: str | Path, option: str) -> None:
    """Refuse, before any work, an output file that could never be written: a folder's name, or one under a file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{option} {path}: is a folder; give a file name (e.g. {path / 'submission.csv'})")
    _check_not_under_a_file(path, option)


def check_output_folder(path: str | Path, option: str) -> None:
    """Refuse, before any work, an output folder that could never be made: a file's name, or one under a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"{option} {path}: is a file, not a folder; choose another {option}")
    _check_not_under_a_file(path, option)


def _check_not_under_a_file(path: Path, option: str) -> None:
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(f"{option} {path}: {parent} is a file, not a folder")


def _plain(value: Any) -> Any:
    """numpy scalars (an integer or float from code) as the Python numbers JSON holds."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_plain) + "\n")


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_csv(path: str | Path, df: pd.DataFrame, **kwargs: Any) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)
