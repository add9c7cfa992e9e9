"""The mark every CUDA test carries: ``-m gpu`` selects it (bench/gpu_acceptance.sh), and it skips
cleanly on a machine without CUDA."""

from __future__ import annotations

from typing import Callable, TypeVar

import pytest
import torch

T = TypeVar("T", bound=Callable)


def cuda(test: T) -> T:
    """A CUDA test: marked ``gpu``, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))
