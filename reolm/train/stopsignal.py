"""Stop signals, caught from the first lines of a rank's entry point (this module imports nothing heavy).

Slurm's time-limit warning, preemption and the launchers' shutdown arrive as SIGTERM or SIGUSR1,
possibly while a rank is still importing torch or building the engine (minutes on a large job).
:func:`catch_stop_signals` replaces the default action (die at once) by remembering the first
such signal; the training loop's :class:`reolm.train.distributed.StopFlag` then acts on it at the
next step boundary, after the ranks agree, by checkpointing and exiting 0.
"""

from __future__ import annotations

import os
import signal

__all__ = ["STOP_SIGNALS", "catch_stop_signals", "received", "restore_default_action"]

STOP_SIGNALS: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []


def _remember(signum: int, frame: object) -> None:
    if not _received:
        _received.append(signum)


def catch_stop_signals() -> None:
    """Remember stop signals instead of dying (idempotent; main thread only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)


def received() -> str | None:
    """The name of the first stop signal received so far, or None."""
    return signal.Signals(_received[0]).name if _received else None


def restore_default_action() -> None:
    """Back to dying on a stop signal (``ckpt.save_on_signal=false``), including one already received."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    if _received:
        os.kill(os.getpid(), _received[0])
