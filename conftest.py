"""Every test and every doctest starts from the same global state, and leaves none behind.

This file sits at the repository root so that it covers the doctests of ``pyro_genext/``
as well as ``tests/``: pytest-xdist may run a doctest in the worker that just ran a test
which changed the default dtype, and with the reset only in ``tests/conftest.py`` the
doctests of ``pyro_genext/data/dataset.py`` and ``pyro_genext/models/density.py`` failed
("expected x of dtype float32, got torch.float64") in one order of two (issue 23).

The state reset before and restored after each test: torch's default dtype and default
device, its thread count (1), grad mode, anomaly detection and deterministic algorithms;
the random number generators (``pyro.set_rng_seed(0)``: torch, numpy, Python); Pyro's
param store and validation flag; pyro_genext's data checks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyro
import pytest
import torch

from pyro_genext.checks import data_checks

# The suite's models are tiny: one thread is fastest, and on a shared 2-core machine more
# threads oversubscribe the cores and run 10-20x slower.
THREADS = 1
torch.set_num_threads(THREADS)


def _baseline() -> None:
    torch.set_default_dtype(torch.float32)
    if torch.get_default_device() != torch.device("cpu"):
        torch.set_default_device(None)
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
    torch.set_grad_enabled(True)
    torch.autograd.set_detect_anomaly(False)
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
    pyro.enable_validation(True)
    pyro.clear_param_store()


@pytest.fixture(autouse=True)
def _isolated_global_state() -> Iterator[None]:
    """Seed, validate and start every test (doctests included) with an empty param store
    and torch's defaults; put them back afterwards, whatever the test changed."""
    _baseline()
    pyro.set_rng_seed(0)
    with data_checks(True):  # restores the flag a test may leave off
        yield
    _baseline()
