"""Content hashes of photos: every cache built from photos (token stores, test caches, member predictions) is keyed
by what the photos hold, not by their names, so a changed photo under an old name is never answered from a cache."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping


def content_hash(path: str | Path) -> str | None:
    """sha256 (hex) of a file's bytes, streamed; None when the file cannot be read (a missing photo is a change
    like any other: its hash differs once it is back)."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def content_hashes(paths: Mapping[str, str | Path]) -> dict[str, str | None]:
    """{image_id: content_hash(path)} for {image_id: path}."""
    return {image_id: content_hash(path) for image_id, path in paths.items()}
