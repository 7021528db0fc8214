"""One registry of every bijector and recipe, one checker (pyro_genext.testing)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import pyro_genext as pg
from pyro_genext.testing import check_bijector
from pyro_genext.transforms import (
    ActNorm,
    AdditiveCoupling,
    BatchNormFlow,
    ConditionalAdditiveCoupling,
    ConditionalRealNVPCoupling,
    DiagonalScaling,
    MaskedCoupling,
    RealNVPCoupling,
    Squeeze,
    alternating_mask,
    channel_mask,
    checkerboard_mask,
    half_mask,
)

SMALL = dict(hidden_dims=(16,))
CONV = dict(hidden_channels=6, num_blocks=1)

# (name, factory): every bijector and recipe, at sizes where the autograd Jacobian is cheap
REGISTRY = [
    ("additive_half", partial(AdditiveCoupling, half_mask(6), **SMALL)),
    ("additive_half_flipped_odd", partial(AdditiveCoupling, half_mask(7, 1), **SMALL)),
    ("additive_alternating", partial(AdditiveCoupling, alternating_mask(7), **SMALL)),
    ("additive_checkerboard", partial(AdditiveCoupling, checkerboard_mask((1, 8, 8)), **CONV)),
    ("realnvp_half", partial(RealNVPCoupling, half_mask(5), **SMALL)),
    ("realnvp_half_flipped", partial(RealNVPCoupling, half_mask(12, 1), **SMALL)),
    ("realnvp_alternating", partial(RealNVPCoupling, alternating_mask(6, 1), **SMALL)),
    ("realnvp_unbounded", partial(RealNVPCoupling, half_mask(4), scale_bound=None, **SMALL)),
    ("realnvp_checkerboard_input_bound",
     partial(RealNVPCoupling, checkerboard_mask((1, 8, 8)), input_bound=1.5, **CONV)),
    ("realnvp_asymmetric_bound",
     partial(RealNVPCoupling, half_mask(4), scale_bound=(-1.0, 2.0), **SMALL)),
    ("realnvp_checkerboard_1x8x8", partial(RealNVPCoupling, checkerboard_mask((1, 8, 8)), **CONV)),
    ("realnvp_checkerboard_2x8x8", partial(RealNVPCoupling, checkerboard_mask((2, 8, 8), 1), **CONV)),
    ("realnvp_channel_2x8x8", partial(RealNVPCoupling, channel_mask((2, 8, 8)), **CONV)),
    ("realnvp_channel_3x4x4_flipped", partial(RealNVPCoupling, channel_mask((3, 4, 4), 1), **CONV)),
    ("realnvp_channel_interleaved",
     partial(RealNVPCoupling, torch.tensor([1.0, 0.0, 1.0, 0.0])[:, None, None].expand(4, 2, 2),
             **CONV)),
    ("diagonal_scaling_vector", partial(DiagonalScaling, 5)),
    ("diagonal_scaling_image", partial(DiagonalScaling, (2, 4, 4))),
    ("squeeze_2x8x8", partial(Squeeze, (2, 8, 8))),
    ("squeeze_1x2x4", partial(Squeeze, (1, 2, 4))),
    ("actnorm_vector", partial(ActNorm, 6)),
    ("actnorm_image", partial(ActNorm, (2, 8, 8))),
    ("batchnorm_vector", partial(BatchNormFlow, 6)),
    ("batchnorm_image", partial(BatchNormFlow, (2, 4, 4))),
    ("nice", partial(pg.nice, 8, **SMALL)),
    ("nice_paper_masks", partial(pg.nice, 7, num_layers=4, mask="alternating", **SMALL)),
    ("realnvp_vector", partial(pg.realnvp, 6, num_layers=4, **SMALL)),
    ("realnvp_vector_actnorm", partial(pg.realnvp, (12,), num_layers=3, norm="actnorm", **SMALL)),
    ("realnvp_vector_batchnorm",
     partial(pg.realnvp, 5, num_layers=2, norm="batchnorm", mask="alternating", **SMALL)),
    ("realnvp_multiscale_1x8x8", partial(pg.realnvp, (1, 8, 8), **CONV)),
    ("realnvp_multiscale_2x8x8", partial(pg.realnvp, (2, 8, 8), **CONV)),
    ("realnvp_multiscale_batchnorm", partial(pg.realnvp, (1, 8, 8), norm="batchnorm", **CONV)),
    ("realnvp_one_scale", partial(pg.realnvp, (1, 4, 4), num_scales=1, norm=None, **CONV)),
]

CONDITIONAL_REGISTRY = [
    ("cond_additive_coupling", partial(ConditionalAdditiveCoupling, half_mask(6), 3, **SMALL), 3),
    ("cond_realnvp_coupling", partial(ConditionalRealNVPCoupling, alternating_mask(5), 2, **SMALL),
     2),
    ("cond_realnvp_checkerboard",
     partial(ConditionalRealNVPCoupling, checkerboard_mask((1, 4, 4)), 2, **CONV), 2),
    ("conditional_nice", partial(pg.conditional_nice, 6, 3, **SMALL), 3),
    ("conditional_realnvp", partial(pg.conditional_realnvp, 6, 4, num_layers=3, **SMALL), 4),
    ("conditional_realnvp_actnorm",
     partial(pg.conditional_realnvp, 4, 2, num_layers=2, norm="actnorm", **SMALL), 2),
]


@pytest.mark.parametrize("name,factory", REGISTRY, ids=[r[0] for r in REGISTRY])
def test_bijector(name, factory):
    check_bijector(factory)


@pytest.mark.parametrize(
    "name,factory,context_dim", CONDITIONAL_REGISTRY, ids=[r[0] for r in CONDITIONAL_REGISTRY]
)
def test_conditional_bijector(name, factory, context_dim):
    check_bijector(factory, context_dim=context_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float32_and_float64(dtype):
    flow = pg.realnvp((1, 8, 8), **CONV).to(dtype)
    x = torch.rand(3, 1, 8, 8, dtype=dtype)
    z = flow.inv(x)
    assert z.dtype == dtype
    assert flow.log_abs_det_jacobian(z, x).dtype == dtype
    assert torch.allclose(flow(z), x, atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_checker_catches_a_wrong_log_det():
    class Wrong(DiagonalScaling):
        def _forward_and_ladj(self, x):
            y, ladj = super()._forward_and_ladj(x)
            return y, 2 * ladj

    with pytest.raises(AssertionError, match="log\\|det J\\|"):
        check_bijector(partial(Wrong, 3))


def test_checker_catches_a_broken_inverse():
    class Broken(DiagonalScaling):
        def _inverse_and_ladj(self, y):
            x, ladj = super()._inverse_and_ladj(y)
            return x + 1e-3, ladj

    with pytest.raises(AssertionError, match="round trip"):
        check_bijector(partial(Broken, 3))


# ---------------------------------------------------------------- bad input
def test_wrong_event_shape_names_expected_and_given():
    flow = pg.realnvp((1, 8, 8), **CONV)
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*\(4, 8, 8\)"):
        flow.inv(torch.zeros(4, 8, 8))


def test_squeeze_needs_even_sizes():
    with pytest.raises(ValueError, match=r"H and W even, got \(1, 7, 8\)"):
        Squeeze((1, 7, 8))


def test_mask_of_wrong_shape_or_values():
    with pytest.raises(ValueError, match=r"\(D,\) or \(C, H, W\), got shape \(8, 8\)"):
        RealNVPCoupling(torch.ones(8, 8))
    with pytest.raises(ValueError, match="binary"):
        RealNVPCoupling(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="both"):
        RealNVPCoupling(torch.ones(4))


def test_conditioner_of_wrong_size_is_named():
    t = MaskedCoupling(half_mask(4), conditioner=torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match="conditioner returned shape"):
        t(torch.zeros(4))


def test_recipe_argument_errors():
    with pytest.raises(ValueError, match="input_dim >= 2"):
        pg.realnvp(1)
    with pytest.raises(ValueError, match="cannot be squeezed"):
        pg.realnvp((1, 6, 6), num_scales=3)
    with pytest.raises(ValueError, match="norm"):
        pg.realnvp(4, norm="layernorm")
    with pytest.raises(ValueError, match="mask"):
        pg.nice(4, mask="random")


# ---------------------------------------------------------------- structure
def test_couplings_start_as_identity():
    for flow, x in [(pg.realnvp(6), torch.randn(5, 6)), (pg.nice(6), torch.randn(5, 6)),
                    (pg.realnvp((1, 8, 8), norm=None, **CONV), torch.randn(5, 1, 8, 8))]:
        assert torch.allclose(flow(x), x, atol=1e-6)
        assert torch.allclose(flow.log_abs_det_jacobian(x, flow(x)), torch.zeros(5))


def test_stacks_alternate_the_transformed_half():
    flow = pg.realnvp(6, num_layers=2, norm=None)
    masks = [p.mask for p in flow.parts]
    assert torch.equal(masks[0], 1 - masks[1])


def test_vector_realnvp_default_actnorm_after_each_coupling():
    from pyro_genext.transforms import ActNorm

    parts = pg.realnvp(6, num_layers=3, hidden_dims=(8,)).parts
    kinds = [getattr(p, "elementwise", type(p)) for p in parts]
    assert kinds == ["affine", ActNorm] * 3
    # started explicitly on a batch (a density model): the data-side actnorm standardises it
    flow = pg.realnvp(6, num_layers=2, hidden_dims=(8,))
    y = 5.0 + 3.0 * torch.randn(500, 6)
    assert pg.transforms.initialize(flow, y) == 2
    z = flow.inv(y).detach()
    assert torch.allclose(z.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(z.std(0), torch.ones(6), atol=1e-4)
    # never started (a guide), whatever is called first: every actnorm stays the identity
    guide_flow = pg.realnvp(6, num_layers=2, hidden_dims=(8,))
    x = torch.randn(4, 6)
    assert torch.allclose(guide_flow(x), x, atol=1e-6)
    assert torch.allclose(guide_flow.inv(y), y, atol=1e-6)
    assert not any(bool(p.initialized) for p in guide_flow.parts if isinstance(p, ActNorm))


def test_vector_halves_take_the_slicing_path():
    assert RealNVPCoupling(half_mask(784)).mode == "slice"
    assert RealNVPCoupling(half_mask(784, 1)).mode == "slice"
    assert RealNVPCoupling(channel_mask((4, 2, 2))).mode == "slice"
    assert RealNVPCoupling(alternating_mask(6)).mode == "index"
    assert RealNVPCoupling(checkerboard_mask((1, 4, 4))).mode == "mask"


@pytest.mark.parametrize("shape,scales", [((1, 8, 8), 3), ((1, 28, 28), 3), ((3, 6, 6), 2)])
def test_multiscale_default_scales(shape, scales):
    flow = pg.realnvp(shape, hidden_channels=4, num_blocks=1)
    depth, t = 1, flow
    while isinstance(t, pg.transforms.MultiScale):
        t = t.inner
        depth += 1
    assert depth == scales
    x = torch.rand((2,) + shape)
    assert flow.inv(x).shape == x.shape


def test_multiscale_factors_out_half_the_channels():
    """Factored-out latents do not depend on what happens at the inner scales."""
    flow = pg.realnvp((1, 8, 8), **CONV).eval()
    from pyro_genext.testing import perturb_parameters
    from pyro_genext.transforms.squeeze import squeeze

    perturb_parameters(flow, 0.1)
    x = torch.rand(2, 1, 8, 8)
    z = flow.inv(x)
    with torch.no_grad():
        for p in flow.inner.parameters():
            p.add_(0.3)
    z2 = flow.inv(x)
    kept = slice(0, 2)  # first 2C channels of the squeezed latent are factored out
    assert torch.allclose(squeeze(z)[:, kept], squeeze(z2)[:, kept])
    assert not torch.allclose(squeeze(z)[:, 2:], squeeze(z2)[:, 2:])


def test_scale_bound_limits_each_layer():
    t = RealNVPCoupling(half_mask(2), scale_bound=2.0, **SMALL)
    with torch.no_grad():
        t.conditioner.net[-1].bias.fill_(100.0)
    x = torch.randn(4, 2)
    ladj = t.log_abs_det_jacobian(x, t(x))
    assert (ladj <= 2.0).all() and (ladj > 1.99).all()


@pytest.mark.parametrize("raw,expected", [(100.0, 2.0), (-100.0, -1.0)])
def test_asymmetric_scale_bound_limits_each_side(raw, expected):
    """With ``(low, high)`` the log-scale saturates at ``high`` above and at ``low`` below:
    scoring (data -> base) multiplies a coordinate by at most ``e^{-low}``."""
    t = RealNVPCoupling(half_mask(8), scale_bound=(-1.0, 2.0), **SMALL).to(torch.float64)
    with torch.no_grad():
        t.conditioner.net[-1].bias.fill_(raw)
    y = torch.randn(4, 8, dtype=torch.float64)
    x = t.inv(y)
    per_element = (x[:, 4:] - t.inv(torch.zeros_like(y))[:, 4:]) / y[:, 4:]  # exp(-s)
    assert torch.allclose(per_element.log(), torch.full_like(per_element, -expected), atol=1e-9)
    ladj = t.log_abs_det_jacobian(x, y)
    assert torch.allclose(ladj, torch.full_like(ladj, 4 * expected), atol=1e-9)


@pytest.mark.parametrize("mask", [half_mask(6), checkerboard_mask((2, 4, 4)), channel_mask((2, 4, 4))],
                         ids=["slice", "mask", "channels"])
def test_input_bound_is_what_the_conditioner_sees(mask):
    """The conditioner gets ``x_A`` softly clipped to ``c``: a far-out input cannot make
    it extrapolate, however large it is; without the bound it sees ``x_A`` itself."""
    from pyro_genext.transforms.elementwise import soft_clip

    kw = SMALL if mask.dim() == 1 else CONV
    seen = []
    for bound in (3.0, None):
        t = RealNVPCoupling(mask, input_bound=bound, **kw).to(torch.float64)
        t.conditioner.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
        x = 50 * torch.randn((4,) + tuple(mask.shape), dtype=torch.float64)
        y = t(x)
        assert torch.allclose(t.inv(y), x, atol=1e-8)
        xa = x * t.mask if t.mode == "mask" else t._split(x)[0]
        got = seen[0]  # the forward call (the inverse one follows)
        seen.clear()
        expected = soft_clip(xa, bound) if bound is not None else xa
        assert torch.allclose(got, expected)
        if bound is not None:
            assert got.abs().max() <= bound
        else:
            assert got.abs().max() > 10


def test_soft_clip_is_the_identity_inside_its_knee_and_bounded_outside():
    from pyro_genext.transforms.elementwise import KNEE, soft_clip

    x = torch.linspace(-50, 50, 20001, dtype=torch.float64, requires_grad=True)
    y = soft_clip(x, 4.0)
    inside = x.abs() <= KNEE * 4.0
    assert torch.equal(y[inside], x[inside])  # typical values pass unchanged
    assert y.abs().max() <= 4.0 and (y.abs()[x.abs() > 10] > 3.99).all()
    (slope,) = torch.autograd.grad(y.sum(), x)
    assert (slope >= 0).all() and (slope <= 1).all()  # monotone, never steeper than x
    assert (slope[1:] - slope[:-1]).abs().max() < 1e-2  # no kink at the knee


def test_image_recipe_bounds_conditioner_inputs_by_default():
    from pyro_genext.flows import IMAGE_INPUT_BOUND

    image = {m.input_bound for m in pg.realnvp((1, 8, 8), **CONV).modules()
             if hasattr(m, "input_bound")}
    vector = {m.input_bound for m in pg.realnvp(6, **SMALL).modules() if hasattr(m, "input_bound")}
    off = {m.input_bound for m in pg.realnvp((1, 8, 8), input_bound=None, **CONV).modules()
           if hasattr(m, "input_bound")}
    assert image == {IMAGE_INPUT_BOUND} and vector == {None} and off == {None}
    with pytest.raises(ValueError, match="expected input_bound"):
        pg.realnvp((1, 8, 8), input_bound=-1.0, **CONV)


def test_soft_clamp_asymmetric_is_each_sides_tanh():
    from pyro_genext.transforms.elementwise import soft_clamp

    s = torch.linspace(-8, 8, 401, dtype=torch.float64, requires_grad=True)
    out = soft_clamp(s, (-1.0, 2.0))
    ref = torch.where(s >= 0, 2.0 * torch.tanh(s / 2.0), 1.0 * torch.tanh(s / 1.0))
    assert torch.allclose(out, ref, atol=1e-12)
    assert out.min() > -1.0 and out.max() < 2.0
    (slope,) = torch.autograd.grad(out.sum(), s)
    at_zero = slope[200]
    assert torch.isclose(at_zero, torch.tensor(1.0, dtype=torch.float64))  # identity near 0
    assert torch.allclose(soft_clamp(s, 2.0), soft_clamp(s, (-2.0, 2.0)), atol=1e-12)


@pytest.mark.parametrize("bound", [0.5, 2.0, 3.0])
@pytest.mark.parametrize("negate", [False, True])
def test_soft_clamp_is_bound_tanh_with_its_gradient(bound, negate):
    """b tanh(s / b) (negated on request) and its derivative, at the default bound 2,
    where no scale kernel is spent, and at others."""
    from pyro_genext.transforms.elementwise import soft_clamp

    s = torch.linspace(-9, 9, 301, dtype=torch.float64, requires_grad=True)
    out = soft_clamp(s, bound, negate=negate)
    ref = (-1.0 if negate else 1.0) * bound * torch.tanh(s / bound)
    assert torch.allclose(out, ref, atol=1e-12)
    (got,) = torch.autograd.grad(out.sum(), s)
    (want,) = torch.autograd.grad(ref.sum(), s)
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), (1.0, 2.0), (-1.0, 0.0), (-1.0,),
                                 "2", True])
def test_scale_bound_refused_before_building(bad):
    with pytest.raises(ValueError, match="expected scale_bound"):
        RealNVPCoupling(half_mask(4), scale_bound=bad, **SMALL)


# ---------------------------------------------------------------- training
def _correlated_data(shape, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = int(torch.tensor(shape).prod())
    mix = 0.8 * torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix.T * 2.0 + 1.0
    return x.reshape((n,) + tuple(shape))


TRAINABLE = [r for r in REGISTRY if not r[0].startswith("squeeze")]


@pytest.mark.parametrize("name,factory", TRAINABLE, ids=[r[0] for r in TRAINABLE])
def test_svi_maximum_likelihood_improves_the_fit(name, factory):
    """SVI steps of maximum likelihood on a small, correlated, shifted and scaled data set
    lower the negative log-likelihood of every bijector by 5 %. Measured (checking every
    5 steps): every bijector gets there within 10 steps but the additive checkerboard
    coupling, which needs 50; the budgets below leave a margin of 4 to 6."""
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO

    flow = factory()
    shape = flow.event_shape
    data = _correlated_data(shape)
    base = dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape))

    def model(x):
        pyro.module("flow", flow)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.TransformedDistribution(base, [flow]), obs=x)

    def nll():
        flow.eval()
        with torch.no_grad():
            value = -dist.TransformedDistribution(base, [flow]).log_prob(data).mean().item()
        flow.train()
        return value

    before = nll()
    optim = pyro.optim.ClippedAdam({"lr": 5e-3, "clip_norm": 10.0})
    svi = SVI(model, lambda x: None, optim, Trace_ELBO())
    for _ in range(200 if name == "additive_checkerboard" else 30 if "multiscale" in name else 60):
        svi.step(data)
    after = nll()
    assert after < before - 0.05 * abs(before), (before, after)


@pytest.mark.parametrize(
    "factory",
    [partial(pg.realnvp, 7, num_layers=4, norm=None, **SMALL), partial(pg.nice, 6, **SMALL),
     partial(pg.realnvp, (3, 8, 8), norm=None, **CONV),
     partial(pg.realnvp, 8, num_layers=4, **SMALL), partial(pg.realnvp, (3, 8, 8), **CONV)],
    ids=["realnvp_odd", "nice", "multiscale", "realnvp_actnorm", "multiscale_actnorm"],
)
def test_chain_runs_of_couplings_equal_part_by_part(factory):
    """A Chain runs consecutive couplings on the split halves; the result must equal
    applying its parts one by one."""
    from pyro_genext.testing import perturb_parameters
    from pyro_genext.transforms import Chain

    flow = factory().double()
    perturb_parameters(flow, 0.1)
    chains = [m for m in flow.modules() if isinstance(m, Chain)]
    assert any(isinstance(step, list) for c in chains for step in c._plan)
    x = torch.randn((3,) + flow.event_shape, dtype=torch.float64)
    for c in chains:
        h = torch.randn((3,) + c.event_shape, dtype=torch.float64)
        y, ladj = c._forward_and_ladj(h)
        ref, ref_ladj = h, 0
        for p in c._parts:
            ref, l = p._forward_and_ladj(ref)
            ref_ladj = ref_ladj + l
        assert torch.allclose(y, ref) and torch.allclose(ladj, ref_ladj)
        back, inv_ladj = c._inverse_and_ladj(y)
        assert torch.allclose(back, h) and torch.allclose(inv_ladj, ladj)
    assert torch.allclose(flow.inv(flow(x)), x)


@pytest.mark.parametrize("shape", [(8,), (3, 8, 8)], ids=["vector", "multiscale"])
def test_actnorm_in_a_chain_run_initialises_as_on_its_own(shape):
    """An actnorm run on the two halves of a split (inside a Chain run) takes the same
    data-dependent initialisation and gives the same map as the layer on the whole input."""
    import copy

    from pyro_genext.transforms import ActNorm, Chain

    kw = SMALL if len(shape) == 1 else CONV
    flow = pg.realnvp(shape[0] if len(shape) == 1 else shape, **kw).double()
    twin = copy.deepcopy(flow)
    runs = [s for c in flow.modules() if isinstance(c, Chain) for s in c._plan if isinstance(s, list)]
    assert any(isinstance(p, ActNorm) for r in runs for p in r)
    y = 2.0 + 3.0 * torch.rand((64,) + shape, dtype=torch.float64)
    for c in twin.modules():  # the twin applies every part on its own
        if isinstance(c, Chain):
            c._plan = list(c._parts)
    # scored before initialize(): no start-up either way (the layers stay as built)
    assert torch.allclose(flow._inverse_and_ladj(y)[0], twin._inverse_and_ladj(y)[0])
    assert not any(bool(a.initialized) for a in flow.modules() if isinstance(a, ActNorm))
    from pyro_genext.transforms import initialize

    n = initialize(flow, y)
    assert n == initialize(twin, y) > 0
    z, ladj = flow._inverse_and_ladj(y)
    ref, ref_ladj = twin._inverse_and_ladj(y)
    assert torch.allclose(z, ref) and torch.allclose(ladj, ref_ladj)
    for a, b in zip(flow.modules(), twin.modules()):
        if isinstance(a, ActNorm):
            assert bool(a.initialized) and bool(b.initialized)
            assert torch.allclose(a.log_scale, b.log_scale) and torch.allclose(a.bias, b.bias)
