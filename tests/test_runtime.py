"""The glibc malloc thresholds every entry point sets: freed tensor memory is reused instead of faulted in again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from biomass_cache.common.runtime import keep_freed_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")

# 40 MB: above glibc's own ceiling for its moving mmap threshold (32 MB), so without the fixed thresholds every
# allocation is a fresh mmap whose ~10k pages fault in as they are written.
PROGRAM = """
import json, resource, sys, torch
from biomass_cache.common.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
for _ in range(10):  # warm-up: the heap grows to its working size (7 allocations or fewer, measured)
    torch.empty(10 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(10 << 20).fill_(1.0)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True,
                         env=clean)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    pages = (40 << 20) // 4096
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned["applied"]
    assert default["faults"] > 20 * pages * 0.9  # every loop faults the whole block in
    assert tuned["faults"] < pages  # the block is reused: no loop faults it in again


@pytest.mark.parametrize("name, value", [("MALLOC_MMAP_THRESHOLD_", "131072"),
                                         ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")])
def test_settings_from_the_environment_are_kept(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert not keep_freed_memory()


def test_atomic_folder_replaces_whole_writes_through_links_and_clears_what_killed_runs_left(tmp_path):
    """The old folder goes aside before the new one takes its name, then is deleted; a link's target is replaced
    in place on its own disk; a file is refused; leftovers of dead processes go, a live process's stay."""
    from biomass_cache.common.errors import DataError
    from biomass_cache.common.io import atomic_folder

    def build(path, text):
        with atomic_folder(path, "partial") as tmp:
            tmp.mkdir()
            (tmp / "f.txt").write_text(text)

    out = tmp_path / "out"
    build(out, "one")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".out.old-{dead.stdout.strip()}").mkdir()  # left by a killed replacement
    (tmp_path / f".out.partial-{dead.stdout.strip()}").mkdir()
    (tmp_path / ".out.old-1").mkdir()  # pid 1 is alive: not ours to delete
    build(out, "two")
    assert (out / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old-1", "out"]
    target, link = tmp_path / "disk" / "real", tmp_path / "link"
    target.parent.mkdir()
    build(target, "old")
    link.symlink_to(target)
    build(link, "new")
    assert link.is_symlink() and (target / "f.txt").read_text() == "new"
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(DataError, match="is a file, not a folder"):
        build(tmp_path / "afile", "x")
    assert (tmp_path / "afile").read_text() == "mine"
