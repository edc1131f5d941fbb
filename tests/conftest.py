"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small models train faster on one thread, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
