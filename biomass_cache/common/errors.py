"""The user's mistakes, as types: every error a user can cause and fix is a `DataError`, so each command reports it
as one `error: ...` line with exit status 2 (cli/errors.py) and any other exception is a bug with its traceback.

Each message names the file, row, key or value at fault and what to do about it. The types say which part of the
pipeline refused; catching `DataError` catches them all.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data, worded so they can find and fix it."""


class ConfigError(DataError):
    """A config, ensemble or space file that cannot be used as written: the message names the file and key."""


class WeightsError(DataError):
    """A weights file that cannot be read or does not fit the chosen backbone."""


class NonFiniteError(DataError):
    """The backbone produced inf or NaN tokens (fp16 overflow, or broken weights)."""


class StoreError(DataError):
    """A path that is not a readable token store, or a request the store cannot honour."""


class LockedError(DataError):
    """Another process is writing the output (a token store, a run folder)."""


class FingerprintError(DataError):
    """A fingerprint that cannot be read as the record (unknown keys or kind) or lacks what a caller needs."""


class EnsembleError(DataError):
    """An ensemble that cannot be built as described, with the member and file named."""


class CollapsedMemberError(EnsembleError):
    """A member with a fold model that predicts a constant: it would drag the ensemble towards 0 g."""


class SubmissionError(DataError):
    """A submission (or labels file) that must not be written or scored, with every reason found."""


class BundleError(DataError):
    """A bundle that cannot be made as asked, with the reason."""
