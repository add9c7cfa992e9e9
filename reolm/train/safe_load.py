"""Checkpoints are data, not code: every ``torch.load`` of a training checkpoint is weights-only.

A ``.pt`` file is a pickle, and unpickling runs whatever callable the file names.  Our own
per-rank state is JSON + ``.npz`` arrays (no pickle at all); DeepSpeed's files are pickles of
tensors, dicts and a handful of DeepSpeed classes.  Two layers keep them data:

* :func:`check_files` statically lists the globals each pickle references (torch's
  ``get_unsafe_globals_in_checkpoint``, which reads ``data.pkl`` only, not the tensors) and
  refuses a file that needs anything outside torch's weights-only defaults and
  :data:`DEEPSPEED_GLOBALS`, naming the file and the global.  This runs before DeepSpeed opens
  anything, so the error is clear.
* :func:`weights_only_loads` forces every ``torch.load`` inside it to be weights-only
  (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which overrides DeepSpeed's own ``weights_only=False``
  in its engine, its universal-checkpoint loader and ``zero_to_fp32``) with the same
  allow-list, so even a file swapped after the check cannot run code.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

__all__ = ["UnsafeCheckpointError", "DEEPSPEED_GLOBALS", "allowed_globals", "check_files", "check_folder",
           "weights_only_loads", "unsafe_globals"]

# What DeepSpeed 0.19 puts in its checkpoint pickles besides tensors, dicts, lists and numbers:
# the ZeRO stage enum, the loss-scaler objects (plain attribute holders), and the fragment
# addresses of ZeRO-2 flat partitions (a dataclass of two ints).
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would need an arbitrary object to be unpickled; it is refused."""


def allowed_globals() -> list[Any]:
    """The DeepSpeed classes of :data:`DEEPSPEED_GLOBALS` (imported lazily: DeepSpeed is heavy)."""
    found = []
    for name in DEEPSPEED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: the check then refuses it
            continue
    return found


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """Globals the pickle in ``path`` references beyond torch's defaults and our allow-list."""
    with torch.serialization.safe_globals(allowed_globals()):
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))


def check_files(paths: Iterable[str | os.PathLike]) -> None:
    """Refuse the first file that is not a torch zip archive or needs a global outside the allow-list."""
    for path in paths:
        try:
            bad = unsafe_globals(path)
        except (ValueError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
            raise UnsafeCheckpointError(f"{path}: refused, not a readable torch.save archive ({err})") from None
        if bad:
            raise UnsafeCheckpointError(
                f"{path}: refused, its pickle needs {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + ", which is not a tensor, container or allow-listed DeepSpeed class; loading it could run "
                  "arbitrary code. Only use checkpoints you wrote yourself.")


def check_folder(folder: str | os.PathLike) -> None:
    """:func:`check_files` on every ``.pt`` file under ``folder``."""
    check_files(sorted(Path(folder).rglob("*.pt")))


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside is weights-only with the DeepSpeed allow-list, whatever its caller asks."""
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    except pickle.UnpicklingError as err:  # a file swapped after check_files, or a new DeepSpeed global
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it needs {found.group(1)}" if found else str(err).splitlines()[0][:300]
        raise UnsafeCheckpointError(f"checkpoint refused by the weights-only loader: {what}, which is not "
                                    f"allow-listed; loading it could run arbitrary code") from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous
