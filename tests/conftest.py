"""Shared fixtures: fresh random attention inputs with a stated score range."""

import pytest
import torch

from lrcompile.reference import random_attention_inputs


attention_inputs = random_attention_inputs


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after: each compile in the test starts from nothing."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
