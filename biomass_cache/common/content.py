"""File content hashes: the one sha256 of a file's bytes (weights files, checkpoints, photos).

Every cache built from photos (token stores, test caches, member predictions) is keyed by what the photos hold, not
by their names, so a changed photo under an old name is never answered from a cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

_BLOCK = 8 << 20
PROGRESS_FROM = 256 * _BLOCK  # files from 2 GB up (multi-GB checkpoints) show a progress bar when asked


def sha256_file(path: str | Path, progress: bool = False) -> str:
    """sha256 (hex) of a file's bytes, streamed in 8 MB blocks; with `progress`, a bar for files of 2 GB or more."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}",
                                     disable=not progress or size < PROGRESS_FROM, leave=False) as bar:
        while block := f.read(_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def content_hash(path: str | Path) -> str | None:
    """sha256 (hex) of a file's bytes; None when the file cannot be read (a missing photo is a change like any
    other: its hash differs once it is back)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def content_hashes(paths: Mapping[str, str | Path]) -> dict[str, str | None]:
    """{image_id: content_hash(path)} for {image_id: path}."""
    return {image_id: content_hash(path) for image_id, path in paths.items()}
