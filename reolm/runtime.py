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

__all__ = ["keep_freed_memory", "setup_process"]

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Ask glibc to reuse freed blocks instead of unmapping them; True when it took effect.

    A no-op (False) off Linux/glibc or with ``REOLM_KEEP_FREED_MEMORY=0``.
    """
    if os.environ.get("REOLM_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    log.debug("allocator keeps freed memory: %s", ok)
    return ok


def setup_process() -> None:
    """What every entry point (the ``reolm`` CLI, ``launch/*.py``) calls before any work."""
    keep_freed_memory()
