"""Process-wide CPU runtime settings that every Reo-LM entry point applies once, first thing.

**The allocator keeps freed memory.**  glibc's malloc serves every block over its mmap threshold
(at most 32 MiB) with a fresh ``mmap`` and returns it to the kernel on ``free``.  A forward pass
on CPU allocates activations of 50-100 MB per op (``[tokens, 1536]`` for a few tens of thousands
of tokens), so every op paid the kernel's page faults on memory it had just released: a
``[35k, 384] x [384, 1536]`` bf16 matmul took 1.6x as long as with the memory kept (measured on
this project's 2-core AMX machine, ``bench/cpu_speed.py``).  With ``mmap`` off for the main arena
and no trimming, freed blocks are reused in place, as jemalloc/tcmalloc (the allocators Intel
recommends for PyTorch on CPU) would do, without preloading a library.  The cost is that the
process keeps its peak heap; other threads' arenas still fall back to ``mmap`` when they must.

Set ``REOLM_KEEP_FREED_MEMORY=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

__all__ = ["keep_freed_memory", "setup_process", "resident_bytes", "trim_freed_memory", "FreedMemoryBound"]

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks instead of unmapping them; True when it took effect.

    A no-op (False) off Linux/glibc or with ``REOLM_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get("REOLM_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)  # musl and other libcs have no mallopt
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    log.debug("allocator keeps freed memory: %s", ok)
    return ok


def resident_bytes() -> int:
    """The process's resident set size now (Linux ``/proc/self/statm``); 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def trim_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the kernel; True when glibc did so."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


class FreedMemoryBound:
    """Bounds the memory that :func:`keep_freed_memory` keeps (see the module's docstring).

    :meth:`check` costs one read of ``/proc/self/statm`` (microseconds); it trims when the resident
    set exceeds ``growth`` x its size after the previous trim (or at construction) + ``slack_bytes``.
    Inactive (always False) where the allocator setting was not applied (:func:`setup_process`) or
    did not take effect; constructing one never changes the allocator itself.
    """

    def __init__(self, growth: float = 2.0, slack_bytes: int = 1 << 30) -> None:
        self.active = keep_freed_memory.cache_info().currsize > 0 and keep_freed_memory()
        self.growth, self.slack = growth, slack_bytes
        self.baseline = resident_bytes() if self.active else 0
        self.trims = 0

    def limit(self) -> float:
        return self.growth * self.baseline + self.slack

    def check(self) -> bool:
        """Trim when the resident set is over :meth:`limit`; True when it trimmed."""
        if not self.active or resident_bytes() <= self.limit():
            return False
        trim_freed_memory()
        self.baseline = resident_bytes()
        self.trims += 1
        log.debug("returned freed memory to the kernel (trim %d): resident now %.2f GiB",
                  self.trims, self.baseline / 2**30)
        return True


def setup_process() -> None:
    """What every entry point (the ``reolm`` CLI, ``launch/*.py``) calls before any work."""
    keep_freed_memory()
