"""Shared test settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models and synthetic data gain nothing from threads, and on a shared 2-core machine torch's
    spinning threads make such tests many times slower; tests that load SmolLM2 keep every thread."""
    before = torch.get_num_threads()
    if request.node.get_closest_marker("smollm2") is None:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
