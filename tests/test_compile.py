"""torch.compile: the flows compile with fullgraph=True (no graph breaks from the cache or
actnorm's start-up), and a compiled training step matches the eager one.

Distribution validation (on in the suite) branches on tensor values, which no compiler
traces: compiled code runs inside ``data_checks(False)``, as the training engine does."""

from __future__ import annotations

import copy
import weakref
from functools import partial

import pyro.distributions as dist
import pytest
import torch

import pyro_genext as pg
from pyro_genext.checks import data_checks
from pyro_genext.transforms import initialize

RECIPES = [
    ("realnvp", partial(pg.realnvp, 6, num_layers=4, hidden_dims=(8,)), (6,)),
    ("nice", partial(pg.nice, 6, hidden_dims=(8,)), (6,)),
    ("multiscale", partial(pg.realnvp, (1, 8, 8), hidden_channels=4, num_blocks=1), (1, 8, 8)),
    ("batchnorm_eval", partial(pg.realnvp, 4, num_layers=2, norm="batchnorm", hidden_dims=(8,)),
     (4,)),
]


@pytest.mark.parametrize("name,make,shape", RECIPES, ids=[r[0] for r in RECIPES])
def test_flows_compile_with_fullgraph(name, make, shape):
    """backend="eager" runs dynamo's tracing (where graph breaks would raise under
    fullgraph=True) without generating code, so the check stays cheap."""
    torch._dynamo.reset()
    flow = make()
    x = torch.randn((5,) + shape)
    initialize(flow, x)
    if name == "batchnorm_eval":
        flow.eval()
    base = dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape))

    def loss(v):
        return -dist.TransformedDistribution(base, [flow]).log_prob(v).mean()

    compile_ = partial(torch.compile, fullgraph=True, backend="eager")
    with data_checks(False):
        y = compile_(flow)(x)
        back = compile_(flow.inv)(y)
        assert torch.allclose(back, x, atol=1e-5)
        assert torch.allclose(y, flow.with_cache(0)(x))
        assert torch.allclose(compile_(loss)(x), loss(x.clone()))


def test_conditioned_flow_compiles_with_fullgraph():
    torch._dynamo.reset()
    cflow = pg.conditional_realnvp(4, 3, num_layers=2, hidden_dims=(8,))
    x, ctx = torch.randn(5, 4), torch.randn(5, 3)

    def roundtrip(v, c):
        t = cflow.condition(c)
        return t.inv(t(v))

    with data_checks(False):
        out = torch.compile(roundtrip, fullgraph=True, backend="eager")(x, ctx)
    assert torch.allclose(out, x, atol=1e-5)


def test_actnorm_initialize_before_compiling_a_training_step():
    """initialize() runs eagerly once; the compiled step then never sees start-up code."""
    torch._dynamo.reset()
    flow = pg.realnvp(4, num_layers=2, hidden_dims=(8,))
    data = 3 + 2 * torch.randn(64, 4)
    initialize(flow, data)
    base = dist.Normal(torch.zeros(4), 1.0).to_event(1)
    step = torch.compile(lambda v: -dist.TransformedDistribution(base, [flow]).log_prob(v).mean(),
                         fullgraph=True, backend="eager")
    with data_checks(False):
        assert float(step(data)) < 10


@pytest.mark.slow
def test_compiled_training_step_matches_eager():
    """Inductor-generated forward and backward of a training step: the same loss and
    gradients as eager, step after step."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    flow = pg.realnvp(4, num_layers=2, hidden_dims=(16,))
    data = torch.randn(128, 4) @ torch.tensor([[1.0, 0.5, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0],
                                               [0, 0, 0.3, 1]]) + 1
    initialize(flow, data)
    twin = copy.deepcopy(flow)
    base = dist.Normal(torch.zeros(4), 1.0).to_event(1)

    def loss_of(f):
        return lambda v: -dist.TransformedDistribution(base, [f]).log_prob(v).mean()

    compiled = torch.compile(loss_of(flow), fullgraph=True)
    eager = loss_of(twin)
    # SGD, not Adam: Adam's normalisation turns rounding noise in near-zero gradients into
    # full-size steps, so the two runs would part for reasons that are not the compiler's
    opt_c = torch.optim.SGD(flow.parameters(), lr=0.05)
    opt_e = torch.optim.SGD(twin.parameters(), lr=0.05)
    for _ in range(5):
        with data_checks(False):
            lc, le = compiled(data), eager(data)
        opt_c.zero_grad(), opt_e.zero_grad()
        lc.backward(), le.backward()
        for pc, pe in zip(flow.parameters(), twin.parameters()):
            assert torch.allclose(pc.grad, pe.grad, rtol=1e-4, atol=1e-5)
        assert torch.allclose(lc, le, rtol=1e-5)
        opt_c.step(), opt_e.step()


def test_bf16_autocast_keeps_log_dets_in_float32():
    torch.manual_seed(0)
    flow = pg.realnvp(8, num_layers=4, hidden_dims=(32,))
    from pyro_genext.testing import perturb_parameters

    perturb_parameters(flow, 0.1)
    x = torch.randn(64, 8)
    base = dist.Normal(torch.zeros(8), 1.0).to_event(1)
    ref = dist.TransformedDistribution(base, [flow]).log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = flow.inv(x.clone())
        ladj = flow.log_abs_det_jacobian(z, x)
        lp = dist.TransformedDistribution(base, [flow]).log_prob(x.clone())
    assert z.dtype == ladj.dtype == lp.dtype == torch.float32
    # bf16 matmuls (8 significant bits) perturb the conditioners' outputs only
    assert torch.allclose(lp, ref, rtol=0.02, atol=0.1), (lp - ref).abs().max()


def test_compiled_log_prob_runs_each_network_once():
    """FlowDistribution scores with the fused pass: the traced graph holds one pass of
    every conditioner, not two (Pyro's TransformedDistribution, which asks for the
    log-det in a second call that compiled code cannot serve from a cache, holds two)."""
    from pyro_genext.distributions import FlowDistribution
    from pyro_genext.testing import perturb_parameters

    torch._dynamo.reset()
    flow = pg.realnvp(6, num_layers=3, hidden_dims=(8,), norm=None)
    base = dist.Normal(torch.zeros(6), 1.0).to_event(1)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(sum(1 for n in gm.graph.nodes if n.target is torch._C._nn.linear))
        return gm.forward

    perturb_parameters(flow, 0.2)
    v = torch.randn(4, 6)
    with data_checks(False):
        for cls in (FlowDistribution, dist.TransformedDistribution):
            lp = torch.compile(lambda v, cls=cls: cls(base, [flow]).log_prob(v),
                               fullgraph=True, backend=count)(v)
            assert torch.allclose(lp, cls(base, [flow.with_cache(0)]).log_prob(v), atol=1e-5)
    assert graphs == [3 * 2, 2 * 3 * 2]  # 3 couplings x 2 linear layers: one pass, two


def test_compiled_calls_leave_nothing_behind():
    """A compiled call keeps no state on the flow: a sample drawn by a compiled call does
    not keep its input or log-det alive, and a later compiled log-det of that pair, after
    the parameters changed, is computed with the new parameters."""
    torch._dynamo.reset()
    flow = pg.realnvp(4, num_layers=2, hidden_dims=(8,))
    from pyro_genext.testing import perturb_parameters

    perturb_parameters(flow, 0.2)
    compile_ = partial(torch.compile, fullgraph=True, backend="eager")
    sample, ladj = compile_(lambda u: flow(u)), compile_(flow.log_abs_det_jacobian)
    u = torch.randn(5, 4, requires_grad=True)
    y = sample(u)
    with torch.no_grad():
        next(flow.parameters()).add_(0.5)
    assert torch.allclose(ladj(u, y), flow.with_cache(0).log_abs_det_jacobian(u, y))
    probe_u, probe_y = weakref.ref(u), weakref.ref(y)
    del u, y
    assert probe_u() is None and probe_y() is None


@pytest.mark.parametrize("name", ["realnvp-vectors", "realnvp-images", "vae-realnvp-flows"])
def test_the_engines_compiled_step_matches_its_eager_step(name):
    """``--compile``: the engine's whole step (the kind's train_loss, backward, clipping,
    Adam) compiled by inductor gives the eager step's losses, step after step, also where
    the step draws (the images' dequantization noise: inductor keeps torch's random draws
    through ``fallback_random``), and the first step's compilation time is reported."""
    import pyro
    from test_device import trainer

    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        t = trainer(name, compile=compiled)
        with data_checks(False):
            runs[compiled] = torch.stack([t.train_step() for _ in range(3)])
        assert (t.compile_seconds is not None) == compiled
        assert t.result()["compile_seconds"] == t.compile_seconds
    assert torch.allclose(runs[True], runs[False], rtol=1e-5), runs
    torch._dynamo.reset()
