"""The sampling fast paths give the very bits of the general ones (issue 22)."""

import pyro.distributions as dist
import pytest
import torch

import pyro_genext as pg
from pyro_genext.distributions import FlowDistribution
from pyro_genext.transforms.base import sum_rightmost
from pyro_genext.transforms.elementwise import affine, affine_no_grad


@pytest.mark.parametrize("bound", [2.0, 3.0, 0.7, (-1.5, 2.5)], ids=str)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_affine_no_grad_is_affine_bit_for_bit(bound, inverse, dtype):
    x = torch.randn(64, 37, dtype=dtype)
    out = 3 * torch.randn(64, 74, dtype=dtype)
    params = out.chunk(2, dim=-1)  # views of one output, as a conditioner's
    before = (x.clone(), out.clone())
    with torch.no_grad():
        y_ref, ld = affine(x, params, inverse, bound)
        y, total = affine_no_grad(x, params, inverse, bound, 1)
    assert torch.equal(y, y_ref)
    assert torch.equal(total, sum_rightmost(ld, 1))
    assert torch.equal(x, before[0]) and torch.equal(out, before[1])  # inputs untouched


@pytest.mark.parametrize("make", [
    lambda: pg.realnvp(6, num_layers=3, hidden_dims=(16,)),
    lambda: pg.realnvp(6, num_layers=2, hidden_dims=(16,), scale_bound=(-1.0, 3.0)),
    lambda: pg.nice(6, num_layers=2, hidden_dims=(16,)),
], ids=["realnvp", "realnvp-pair-bound", "nice"])
@pytest.mark.parametrize("shape", [(), (5,), (3, 4)], ids=str)
def test_flow_sample_matches_pyro_sample_and_scores_from_cache(make, shape):
    flow = make()
    for p in flow.parameters():  # away from the identity start
        torch.nn.init.normal_(p, std=0.3)
    loc, scale = torch.randn(6), torch.rand(6) + 0.5
    base = dist.Normal(loc, scale).to_event(1)
    fast = FlowDistribution(base, [flow])
    slow = dist.TransformedDistribution(base, [flow.with_cache(0)])
    torch.manual_seed(3)
    y = fast.sample(shape)
    torch.manual_seed(3)
    y_ref = slow.sample(shape)
    assert y.shape == shape + (6,)
    assert torch.equal(y, y_ref)
    # the cached log-det served to log_prob is the one computed afresh
    torch.testing.assert_close(fast.log_prob(y), slow.log_prob(y.clone()))


def test_flow_sample_other_bases_fall_back():
    flow = pg.realnvp(4, num_layers=2, hidden_dims=(8,))
    base = dist.Uniform(-torch.ones(4), torch.ones(4)).to_event(1)
    torch.manual_seed(0)
    y = FlowDistribution(base, [flow]).sample((7,))
    torch.manual_seed(0)
    assert torch.equal(y, dist.TransformedDistribution(base, [flow.with_cache(0)]).sample((7,)))
