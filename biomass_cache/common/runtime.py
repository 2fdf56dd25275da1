"""Process set-up shared by every entry point (the `biomass` CLI, the top-level scripts, `python -m biomass_cache`,
torchrun).

glibc's malloc hands freed blocks above a moving threshold back to the kernel (munmap, heap trimming), so the next
batch faults the same memory in again, page by page. A ViT forward on the CPU frees and reallocates blocks of a few
to tens of MB in every block of every batch. Fixed thresholds remove those page faults for a little more peak
memory (measured by benchmarks/bench_malloc.py; docs: Benchmarks, "The allocator"). Users who set their own glibc
malloc options in the environment keep them.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 64 << 20  # blocks below this come from the heap and are reused, never munmapped
TRIM_THRESHOLD = 256 << 20  # free memory at the heap top kept for the next batch
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (DataLoader workers inherit them). Returns whether they
    were set: not under another C library, nor when the environment already sets glibc malloc options."""
    if platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in _USER_SETTINGS) \
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mmap_set = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    trim_set = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


_COMMAND: list[str] = []


def record_command(argv: list[str]) -> None:
    """The command line of this process (set by the entry points), for the artefacts that say what made them."""
    _COMMAND[:] = argv


def command_line() -> str | None:
    """The recorded command line as a shell would take it, or None (the library used from Python)."""
    import shlex

    return shlex.join(_COMMAND) if _COMMAND else None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def available_ram() -> int:
    """Bytes of RAM available to new allocations (Linux MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
