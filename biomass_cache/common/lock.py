"""One writer per output (a token store, a run folder): an advisory lock file beside it (`.NAME.lock` for NAME;
inside a store, plain zarr readers would warn about a file that is no part of the hierarchy) naming its holder.

The lock is `flock`ed, so the kernel releases it when the holder exits, however it exits (kill -9 included): a lock
file left behind never blocks anyone, and its text (pid, host, start time) only names the last holder. The holder
removes the file when it is done, so none is left beside the output after a normal exit or an error. An output on
a read-only file system cannot be locked, and needs no lock: nobody can write it; the caller is told so
(`WriterLock.held` is False) and refuses to write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from biomass_cache.common.errors import LockedError


class WriterLock:
    """`with WriterLock(path) as lock:` holds the writer lock of the output at `path` (or `lock.held` is False on a
    read-only file system). Refuses, naming the holder and the `harm` two writers would do, while another process
    holds it."""

    def __init__(self, path: str | Path, harm: str = "two writers would corrupt the store"):
        self.target = Path(path)
        self.harm = harm
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> WriterLock:
        while True:
            try:
                self.target.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return self  # read-only: nobody writes here
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise LockedError(f"{self.target} is being written by {holder} (lock file {self.path}); wait for "
                                  f"that run to finish ({self.harm})") from None
            if self._still_linked(fd):
                break
            os.close(fd)  # the last holder removed this file between our open and our lock: take a fresh one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
        self.fd = fd
        return self

    def _still_linked(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()  # while still locked: a waiter that opened it sees it unlinked and retries
            except OSError:
                pass  # gone already, or a read-only parent: a stale file blocks nobody
            os.close(self.fd)  # releases the flock
            self.fd = None
