"""One writer per token store: an advisory lock file beside the store (`.NAME.lock` for store NAME; inside it, plain
zarr readers would warn about a file that is no part of the hierarchy) naming its holder.

The lock is `flock`ed, so the kernel releases it when the holder exits, however it exits (kill -9 included): a lock
file left behind never blocks anyone, and its text (pid, host, start time) only names the last holder. A store on a
read-only file system cannot be locked, and needs no lock: nobody can write it; the caller is told so
(`WriterLock.held` is False) and refuses to write.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from biomass_cache.common.errors import StoreLockedError


class WriterLock:
    """`with WriterLock(store_path) as lock:` holds the store's writer lock (or `lock.held` is False on a
    read-only store). Refuses, naming the holder, while another process holds it."""

    def __init__(self, store_path: str | Path):
        store_path = Path(store_path)
        self.store = store_path
        self.path = store_path.with_name(f".{store_path.name}.lock")
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def __enter__(self) -> WriterLock:
        try:
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
            raise StoreLockedError(f"{self.store} is being written by {holder} (lock file {self.path}); "
                                   "wait for that run to finish (two writers would corrupt the store)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None
