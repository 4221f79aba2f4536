"""Fixtures of the GPU kernel tests. Requesting one needs CUDA (the tests that do are
skipped without it)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def L():
    """kernels/launchers/ (imported here: it needs CuPy)."""
    from slora.kernels import launchers
    return launchers


@pytest.fixture
def gen():
    """A seeded CUDA generator (torch's global seed set too): fresh random inputs that
    repeat from run to run."""
    g = torch.Generator(device="cuda")
    g.manual_seed(1234)
    torch.manual_seed(1234)
    return g
