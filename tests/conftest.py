import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Seed, validate and start every test with an empty param store."""
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
