"""The CPU counting kernel of full ranking: per row, how many scores are ``>`` and ``>=`` a threshold.

Why a compiled loop: at the hidden sizes of recommendation models (H = 64) the matrix product
costs about 2H = 128 flops per score, so any extra pass over the score block is a large share of
the work. Counting with torch operations takes three passes that each write or read a full block
(two comparisons into float flags, then a matrix-vector sum), which on CPU costs about as much as
the product itself. This loop reads each score once, keeps both counts in registers and writes
nothing but two integers per row; numba compiles it once and caches the machine code on disk
(``cache=True``), so a later process only loads it.

NaN scores compare false, as in torch: a NaN item is never counted above the target, and a NaN
threshold counts nothing. If numba is missing or cannot compile, :meth:`CompiledCounter.bind` returns
``None`` and the caller keeps its torch path (the results are identical, only slower).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["CompiledCounter", "kernel_available"]

#: blocks smaller than this are counted with torch: waking the kernel's threads costs more there
MIN_KERNEL_BLOCK = 1 << 14
#: block widths from this one up are counted with torch: the kernel's float32 counts are exact below it
MAX_KERNEL_WIDTH = 1 << 24

_KERNEL: Callable[..., None] | None = None
_TRIED = False


def _compile() -> Callable[..., None] | None:
    if os.environ.get("REOLM_RANK_KERNEL", "1") in ("0", "", "off"):
        return None
    try:
        import numba
    except ImportError:
        log.warning("numba is not installed: full ranking counts with torch operations (correct, ~2x slower)")
        return None

    # The counts are summed as float32 0/1 values with reassociation allowed ("reassoc"): that lets
    # LLVM vectorise the loop (16 lanes per compare instead of widening to int64), about twice as
    # fast. The sums are exact in any order: integers below 2**24 (CompiledCounter.count refuses
    # wider blocks). No other fast-math flag is set, so comparisons with NaN stay false.
    @numba.njit(nogil=True, cache=True, parallel=True, fastmath={"reassoc", "nsz"})
    def count_rows(scores, thresholds, above, at_or_above, targets, start, own):  # pragma: no cover - compiled
        rows, cols = scores.shape
        for i in numba.prange(rows):
            column = targets[i] - start
            if 0 <= column < cols:
                own[i] = scores[i, column]
            threshold = thresholds[i]
            strictly = np.float32(0)
            inclusive = np.float32(0)
            for j in range(cols):
                value = scores[i, j]
                strictly += np.float32(value > threshold)
                inclusive += np.float32(value >= threshold)
            above[i] += np.int64(strictly)
            at_or_above[i] += np.int64(inclusive)

    return count_rows


def _kernel() -> Callable[..., None] | None:
    global _KERNEL, _TRIED
    if not _TRIED:
        _TRIED = True
        _KERNEL = _compile()
    return _KERNEL


def _match_torch_threads() -> int:
    """Give numba torch's thread count; returns torch's count, to restore after the kernel.

    numba starts one thread per core; a rank told to use fewer (OMP_NUM_THREADS, torch's
    set_num_threads) must not oversubscribe the cores its neighbours use.
    """
    import numba
    torch_threads = torch.get_num_threads()
    wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    return torch_threads


def _restore_torch_threads(torch_threads: int) -> None:
    # Starting numba's OpenMP thread pool resets the calling thread's OpenMP thread count to
    # every core, which torch reads as its own: a pre-training rank limited to 1 thread would run
    # its next steps on 2 threads per rank, oversubscribed and several times slower (seen
    # after the first validation).
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


def kernel_available() -> bool:
    """Whether the compiled counter can be used in this process."""
    return _kernel() is not None


class CompiledCounter:
    """The compiled counter bound to one user block's state; :meth:`count` counts one score block.

    Binding converts the per-user arrays once, so a block costs one kernel call and a few
    checks (a ranking of 1M items calls it a thousand times per user block). The arrays are
    updated in place: ``above[i]`` / ``at_or_above[i]`` gain the number of a block's
    ``scores[i, :]`` that are ``>`` / ``>=`` ``thresholds[i]``, and ``own[i]`` becomes the score
    at the column of item ``targets[i]`` when that item lies in the block.
    """

    def __init__(self, kernel: Callable[..., None], thresholds: torch.Tensor, above: torch.Tensor,
                 at_or_above: torch.Tensor, targets: torch.Tensor, own: torch.Tensor) -> None:
        self._kernel = kernel
        self._dtype = thresholds.dtype
        self._arrays = (thresholds.numpy(), above.numpy(), at_or_above.numpy(), targets.numpy())
        self._own = own.numpy()
        self._matched_threads = 0  # torch's thread count numba was last given (0: not yet)

    @classmethod
    def bind(cls, thresholds: torch.Tensor, above: torch.Tensor, at_or_above: torch.Tensor, targets: torch.Tensor,
             own: torch.Tensor) -> "CompiledCounter | None":
        """A counter over these arrays, or None where the kernel does not apply: it needs CPU,
        contiguous float32/float64 ``thresholds`` and ``own`` [B] and int64 ``above``,
        ``at_or_above`` and ``targets`` [B], and numba."""
        floats = (thresholds, own)
        ints = (above, at_or_above, targets)
        if (any(t.device.type != "cpu" or not t.is_contiguous() for t in floats + ints)
                or thresholds.dtype not in (torch.float32, torch.float64) or own.dtype != thresholds.dtype
                or any(t.dtype != torch.int64 for t in ints)):
            return None
        kernel = _kernel()
        return None if kernel is None else cls(kernel, thresholds, above, at_or_above, targets, own)

    def count(self, scores: torch.Tensor, start: int) -> bool:
        """Count the block ``scores`` [B, n] of items [start, start + n); ``False`` (nothing
        changed) where the kernel does not apply: fewer than :data:`MIN_KERNEL_BLOCK` scores, a
        width of :data:`MAX_KERNEL_WIDTH` or more, another dtype, or a non-contiguous block."""
        if (scores.numel() < MIN_KERNEL_BLOCK or scores.shape[1] >= MAX_KERNEL_WIDTH
                or scores.dtype != self._dtype or not scores.is_contiguous() or scores.device.type != "cpu"):
            return False
        torch_threads = torch.get_num_threads()
        if torch_threads != self._matched_threads:  # numba's count follows torch's (once per change)
            self._matched_threads = _match_torch_threads()
        try:
            self._kernel(scores.numpy(), *self._arrays, start, self._own)
        except Exception as err:  # a numba/LLVM failure must not stop an evaluation: fall back
            global _KERNEL
            log.warning("compiled rank counter failed (%s); counting with torch operations", err)
            _KERNEL = None
            return False
        finally:
            _restore_torch_threads(torch_threads)
        return True
