"""Shared pytest fixtures, and the hypothesis profile of the suite."""

import os

import pytest
import torch
from hypothesis import settings

# NOTE: [Deterministic property tests] The suite must give the same verdict on every run (a fuzz
# test that explores new examples each run fails CI at random when it finds something). By default
# hypothesis draws the same examples every run (derandomize); TORCHGRAPH_HYPOTHESIS=explore draws new
# ones, with the example database, to hunt for bugs by hand: a failure found that way becomes a test.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile("explore" if os.environ.get("TORCHGRAPH_HYPOTHESIS") == "explore" else "deterministic")


@pytest.fixture
def one_thread():
    """Small models train faster on one thread, and far faster when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
