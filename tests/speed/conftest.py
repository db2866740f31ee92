"""Fixtures of the speed tests."""

import pytest
import torch


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters emptied before and after, so a test counts its own graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
