"""Shared fixtures for the per-concern tests under tests/ (test_astrolabe.py at the root is the file
read beside the paper; it keeps its own fixtures). The repository root holds the modules, so it goes on the
import path; so does tests/ itself, for the plain helpers in tests/helpers.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py

import model  # noqa: E402  (needs the path above)

torch.set_num_threads(1)  # tiny tensors: threads cost more than they give, and CI has 2 cores


@pytest.fixture(scope="module")
def wan():
    """The tiny seeded Wan (transformer, text encoder, VAE) that the CPU tests run on."""
    torch.manual_seed(0)
    return model.load_tiny(seed=0)
