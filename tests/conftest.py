import pyro
import pytest
import torch

# The suite's models are tiny: one thread is fastest, and on a shared 2-core machine more
# threads oversubscribe the cores and run 10-20x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Seed, validate and start every test with an empty param store."""
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    pyro.clear_param_store()
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
