"""The root conftest.py isolates every test, doctests included (issue 23): a test that
changes global state, then a doctest in the same process, in that order."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

LEAKY_TEST = '''
import numpy as np, pyro, torch

def test_leaks():
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(2)
    torch.set_grad_enabled(False)
    pyro.enable_validation(False)
    pyro.param("left_behind", torch.zeros(1))
    torch.rand(3), np.random.rand(3)
'''

DOCTEST_MODULE = '''
def f():
    """
    >>> import numpy as np, pyro, torch
    >>> torch.get_default_dtype(), torch.get_num_threads(), torch.is_grad_enabled()
    (torch.float32, 1, True)
    >>> pyro.distributions.is_validation_enabled(), list(pyro.get_param_store().keys())
    (True, [])
    >>> first = torch.rand(1)
    >>> pyro.set_rng_seed(0)
    >>> bool(torch.equal(first, torch.rand(1)))  # every test starts from seed 0
    True
    """
'''


@pytest.mark.parametrize("isolated", [True, False])
def test_a_doctest_after_a_leaky_test_sees_a_fresh_state(pytester, isolated):
    conftest = ROOT_CONFTEST.read_text()
    if not isolated:  # the mutant: no fixture at all
        conftest = conftest.split("@pytest.fixture")[0]
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_a_leaky=LEAKY_TEST, b_module=DOCTEST_MODULE)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider",
                                           "--doctest-modules", "test_a_leaky.py", "b_module.py")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == (2 if isolated else 1), result.stdout.str()
