from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_thread: None) -> None:
    """The model tests use tiny tensors: intra-op threads only add overhead (10x on a loaded 2-core box)."""
