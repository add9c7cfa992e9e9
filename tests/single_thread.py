"""A module-scoped autouse fixture: run a test module's tiny torch work on one intra-op thread.

Import it into a test module (``from single_thread import one_thread  # noqa: F401``).
On the shared 2-core CI machine, 2 intra-op threads spin against other processes and made
the baseline tests ~10x slower (measured: 165 s vs 27 s); restored after the module.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
