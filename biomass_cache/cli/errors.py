"""How every command reports a mistake: one `error: ...` line on stderr and exit status 2, never a traceback.

User errors are `DataError` and its subclasses (common/errors.py: every error type a user can cause), click's
usage errors (a bad option value, an unknown option) and the OSErrors a user's environment causes about a named
path (disk full, read-only, no permission, no such file). Anything else is a bug and keeps its traceback; so do
user errors under `biomass --debug` or with BIOMASS_DEBUG=1 in the environment (the scripts have no --debug).
Running out of memory (host or GPU) or of file descriptors is a limit of the machine, not a bug: one line too.
A command stopped by Ctrl-C or SIGTERM cleans up (SIGTERM raises like Ctrl-C while a command runs) and says so in
one line, with exit status 130 or 143.
The mapping sits in the click command classes, so it covers parsing, option validation and the command body alike.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import typer
from tqdm import tqdm
from typer.core import TyperCommand, TyperGroup

try:  # recent typer versions carry its own copy of click, whose exceptions its commands raise
    from typer._click.exceptions import ClickException, UsageError
except ImportError:
    from click import ClickException, UsageError

from biomass_cache.common.runtime import record_command
from biomass_cache.common.errors import DataError
from biomass_cache.common.signals import Terminated, sigterm_raises

EXIT_USER_ERROR = 2
DEBUG_KEY = "biomass.debug"  # click context meta: set by `biomass --debug`
DEBUG_ENV = "BIOMASS_DEBUG"
# errno -> what to do about it
PATH_ERRORS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exceeded: free space or write elsewhere",
    errno.EROFS: "read-only file system: write elsewhere",
    errno.EACCES: "permission denied: fix the permissions or use another path",
    errno.EPERM: "operation not permitted: fix the permissions or use another path",
    errno.ENOENT: "no such file or directory: check the path",
    errno.ENOTDIR: "a part of the path is not a directory: check the path",
    errno.EISDIR: "is a directory, a file was expected: check the path",
    errno.EFBIG: "the file is larger than this process may write (ulimit -f): raise the limit or write elsewhere",
}
RESOURCE_ERRORS = {  # errno -> what to do, with or without a file name
    errno.EMFILE: "too many open files for this process (ulimit -n): raise the limit or use fewer --workers",
    errno.ENFILE: "too many open files on this machine: close some, or use fewer --workers",
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # worth one line even when the error names no file
OUT_OF_MEMORY = ("out of memory: use a smaller --batch-size or fewer --workers (train: --preload false keeps the "
                 "tokens on disk), or a machine with more memory")


class UserError(ClickException):
    """A user error on its way out: click prints it with `show` and exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:  # noqa: ARG002 (click's signature)
        for bar in list(getattr(tqdm, "_instances", ())):  # progress bars cut short end their line first, so the
            bar.close()  # error is a line of its own, and the last one
        typer.echo(f"error: {self.format_message()}", err=True)


def debug_wanted(ctx: typer.Context | None) -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or bool(ctx is not None and ctx.meta.get(DEBUG_KEY))


def path_error_text(e: OSError) -> str | None:
    """`PATH: what happened: what to do` for an OSError about a named path the user controls (a full disk even
    unnamed: zarr's and the OS's writes do not always carry the file), else None."""
    if e.errno in RESOURCE_ERRORS:
        return RESOURCE_ERRORS[e.errno]
    hint = PATH_ERRORS.get(e.errno)
    if hint is None or not (e.filename or e.errno in DISK_FULL):
        return None
    return f"{e.filename}: {hint}" if e.filename else f"while writing: {hint} ({e.strerror or e})"


def runtime_error_text(e: RuntimeError) -> str | None:
    """The RuntimeErrors torch raises for a limit of the machine: GPU memory, and the shared memory DataLoader
    workers pass batches through (/dev/shm, `</torch_...>` files: full in small containers, or over `ulimit -f`)."""
    message = str(e)
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return f"GPU {OUT_OF_MEMORY} ({message.splitlines()[0]})"
    if "</torch_" in message and any(f"({code})" in message for code in (errno.EFBIG, errno.ENOSPC)):
        return ("the DataLoader workers could not pass a batch through shared memory (/dev/shm is full, or over "
                "ulimit -f): use fewer workers (--workers 0 where the command has it, else [extract] num_workers = "
                "0), or give the machine or container more shared memory (docker --shm-size)")
    if "Too many open files" in message:  # the DataLoader's words for EMFILE
        return RESOURCE_ERRORS[errno.EMFILE]
    return None


@contextmanager
def user_errors(ctx: typer.Context | None) -> Iterator[None]:
    """Turn the user errors raised inside into a `UserError` (unless debugging); let bugs through."""
    try:
        yield
    except UserError:
        raise
    except UsageError as e:
        where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        raise UserError(e.format_message() + where) from None
    except DataError as e:
        if debug_wanted(ctx):
            raise
        raise UserError(str(e)) from None
    except OSError as e:
        text = path_error_text(e)
        if text is None or debug_wanted(ctx):
            raise
        raise UserError(text) from None
    except MemoryError:
        if debug_wanted(ctx):
            raise
        raise UserError(OUT_OF_MEMORY) from None
    except RuntimeError as e:
        text = runtime_error_text(e)
        if text is None or debug_wanted(ctx):
            raise
        raise UserError(text) from None
    except KeyboardInterrupt as e:
        if debug_wanted(ctx):
            raise
        if isinstance(e, Terminated):
            raise UserError("terminated (SIGTERM)", 128 + signal.SIGTERM) from None
        raise UserError("interrupted (Ctrl-C)", 128 + signal.SIGINT) from None


class OneLineErrorsMixin:
    """For a click command or group: user errors become one `error:` line (see the module docstring)."""

    def make_context(self, *args, **kwargs) -> typer.Context:
        with user_errors(None):
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: typer.Context):
        with user_errors(ctx), sigterm_raises():
            return super().invoke(ctx)


class BiomassGroup(OneLineErrorsMixin, TyperGroup):
    """The `biomass` app's group class."""


class BiomassCommand(OneLineErrorsMixin, TyperCommand):
    """One command: run as a script (extract_features.py, train_heads.py, submit.py, python -m ...) or as a
    sub-command of the `biomass` group (cli/__init__.py)."""


def run_app(app: typer.Typer) -> None:
    """Run a command line app as the process's main program. A command stopped by Ctrl-C or SIGTERM has cleaned up
    and said so by the time its exit status comes back: the process leaves at once, without the exit-time noise of
    work it abandoned (zarr's I/O loop thread reporting the read it never finished). A command that ended on its
    own keeps its exit status: stops during the interpreter's shutdown are ignored."""
    record_command(["biomass", *sys.argv[1:]])
    try:
        app()
    except SystemExit as e:
        if e.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code)
        for s in (signal.SIGINT, signal.SIGTERM):  # the command has ended: a stop while Python shuts down would
            signal.signal(s, signal.SIG_IGN)  # turn a finished command's exit status into 130/143
        raise


def script_app(command: Callable[..., None], name: str | None = None, help: str | None = None) -> typer.Typer:
    """A one-command app with the same error reporting and plain (non-rich) help as the `biomass` app."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.command(name, help=help, cls=BiomassCommand)(command)
    return app
