"""Training robustness: affine flows on small data must not diverge.

The issue: affine coupling flows trained on scikit-learn digits (1438 training images,
8 couplings, width 256, Adam 1e-3) can reach test bits/dim above 8. A short version of
``benchmarks/quality.py``'s run: our vector RealNVP at that architecture, trained on
Pyro's ``Trace_ELBO`` with plain Adam (no gradient clipping), must keep its validation
bits/dim finite, below the uniform model's log2(17) and without blowing up after its best.

The loop is the fast training path (docs/benchmarks_posteriors.rst): Pyro's ELBO as a
module and one ``torch.optim.Adam`` over all parameters, the same update as ``SVI`` with
``pyro.optim.Adam`` (which runs one torch Adam per tensor) at about 0.8 of its cost.
"""

import math

import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_genext import realnvp
from pyro_genext.data import load_dataset
from pyro_genext.models import FlowDensity
from pyro_genext.training import evaluate

STEPS = 400
EVAL_EVERY = 50


def test_vector_realnvp_on_digits_does_not_diverge():
    pytest.importorskip("sklearn", reason="scikit-learn digits need scikit-learn")
    train = load_dataset("digits", "train").x.flatten(1)
    val = load_dataset("digits", "val").x.flatten(1)
    flow = realnvp(64, num_layers=8, hidden_dims=(256, 256))
    density = FlowDensity(flow, levels=17)
    loss_fn = Trace_ELBO()(density.model, density.guide)
    gen = torch.Generator().manual_seed(0)
    optim = torch.optim.Adam(density.parameters(), lr=1e-3)
    history = []
    for step in range(1, STEPS + 1):
        optim.zero_grad()
        loss = loss_fn(train[torch.randint(len(train), (64,), generator=gen)])
        loss.backward()
        optim.step()
        assert math.isfinite(loss.item()), f"training loss {loss.item()} at step {step}"
        if step % EVAL_EVERY == 0:
            history.append(evaluate(density, val))

    uniform = math.log2(17)
    assert all(math.isfinite(v) for v in history), history
    assert max(history) < uniform, history
    assert history[-1] <= min(history) + 0.5, history
    # and it has learnt something: well below the uniform model
    assert min(history) < uniform - 1.0, history
