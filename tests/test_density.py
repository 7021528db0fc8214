"""Pre-processing bijectors and FlowDensity: hand-built densities, Jacobians against
autograd, normalisation on a grid, sampling, bad input and SVI training."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator

import pyro
import pyro.distributions.transforms as T
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam  # type: ignore[attr-defined]
from torch.autograd.functional import jacobian

from pyro_genext import nice, realnvp
from pyro_genext.models import FlowDensity
from pyro_genext.testing import check_bijector
from pyro_genext.transforms import AlphaSigmoid, Bijector, LevelScaling, LogitPreprocess


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # (conftest seeds, validates and clears the param store.) These networks are tiny, and
    # on a shared 2-core machine two threads oversubscribe and run 10-20x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter away from the identity initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _normal_logpdf(z: float) -> float:
    return -0.5 * z * z - 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------
# pre-processing bijectors: one registry, one checker
# ----------------------------------------------------------------------------------------

PRE: list[tuple[str, Callable[[tuple[int, ...]], Bijector]]] = [
    ("scale17", lambda s: LevelScaling(s, levels=17)),
    ("sigmoid", lambda s: AlphaSigmoid(s, alpha=0.05)),
    ("sigmoid_wide", lambda s: AlphaSigmoid(s, alpha=0.3)),
    ("logit256", lambda s: LogitPreprocess(s, levels=256)),
    ("logit17", lambda s: LogitPreprocess(s, levels=17, alpha=0.1)),
]
SHAPES = [(3,), (1, 2, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,make", PRE, ids=[n for n, _ in PRE])
def test_pre_bijector_contract(name: str, make: Callable, shape: tuple) -> None:
    # round trips cached and uncached, log-det against autograd + slogdet in float64,
    # inverse log-det, batch shapes, TransformedDistribution, serialisation, bad shapes
    check_bijector(lambda: make(shape))
    t = make(shape)
    z = 3 * torch.randn((3, 4) + shape)
    assert bool(t.codomain.check(t(z)).all())
    assert t.sign == 1 and dict(t.state_dict()) == {}


def test_pre_constraints_and_maths() -> None:
    a, levels = 0.05, 256
    t = LogitPreprocess((2,), levels, a)
    assert t.domain.check(torch.full((2,), 1e6)).all()
    lo, hi = -levels * a / (1 - 2 * a), levels * (1 - a) / (1 - 2 * a)
    check = t.codomain.check
    assert bool(check(torch.tensor([0.0, levels - 1e-3])))
    assert bool(check(torch.tensor([lo + 1e-3, hi - 1e-3])))
    assert not bool(check(torch.tensor([lo, 0.0])))
    assert not bool(check(torch.tensor([0.0, hi])))
    # the paper's formula, by hand, for one data point
    x = torch.tensor([3.25, 200.5], dtype=torch.float64)
    s = [a + (1 - 2 * a) * v / levels for v in x.tolist()]
    z = torch.tensor([math.log(v / (1 - v)) for v in s], dtype=torch.float64)
    torch.testing.assert_close(t.inv(x), z)
    ladj = sum(math.log(v * (1 - v)) for v in s) + 2 * math.log(levels / (1 - 2 * a))
    assert float(t.log_abs_det_jacobian(z, x)) == pytest.approx(ladj, abs=1e-9)
    # softplus form: finite far out where sigmoid saturates
    big = torch.tensor([-60.0, 60.0])
    sig = AlphaSigmoid(2, alpha=a)
    expected = -2 * 60.0 - 2 * math.log1p(-2 * a)
    assert float(sig.log_abs_det_jacobian(big, sig(big))) == pytest.approx(expected, rel=1e-6)
    assert LevelScaling((1, 8, 8), 17).log_abs_det_jacobian(
        torch.zeros(5, 1, 8, 8), torch.zeros(5, 1, 8, 8)
    ).tolist() == pytest.approx([64 * math.log(17)] * 5)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: AlphaSigmoid(3, alpha=0.0), "alpha"),
        (lambda: AlphaSigmoid(3, alpha=0.5), "alpha"),
        (lambda: LogitPreprocess(3, levels=1), "levels"),
        (lambda: LevelScaling(3, levels=2.5), "levels"),  # type: ignore[arg-type]
        (lambda: LevelScaling((0, 3), levels=4), "event shape"),
        (lambda: LogitPreprocess(3, 17)(torch.zeros(4, 2)), r"event shape \(3,\)"),
    ],
)
def test_pre_bad_arguments(make: Callable, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()


# ----------------------------------------------------------------------------------------
# FlowDensity: the density by hand
# ----------------------------------------------------------------------------------------


def test_identity_flow_discrete_normal_by_hand() -> None:
    # nice() starts as the identity, so log p(x) = sum_i [log N(z_i) + log|dz_i/dx_i|] with
    # z = logit(s), s = a + (1 - 2a) x / L, dz/dx = (1 - 2a) / (L s (1 - s))
    levels, a = 17, 0.05
    m = FlowDensity(nice(4, hidden_dims=(8,)), levels=levels, alpha=a).double()
    x = torch.tensor([[0.0, 3.0, 16.0, 8.5], [16.99, 0.25, 1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(m.flow(x), x)  # identity at initialisation
    expected = []
    for row in x.tolist():
        total = 0.0
        for v in row:
            s = a + (1 - 2 * a) * v / levels
            z = math.log(s / (1 - s))
            total += _normal_logpdf(z) + math.log((1 - 2 * a) / (levels * s * (1 - s)))
        expected.append(total)
    torch.testing.assert_close(m.log_prob(x), torch.tensor(expected, dtype=torch.float64))


def test_identity_flow_discrete_logistic_is_uniform() -> None:
    # a standard logistic pushed through a sigmoid is uniform on (0, 1), so the density on
    # the data scale is the constant ((1 - 2a) / L)^D: bpd = log2 L - log2(1 - 2a)
    levels, a, d = 256, 0.05, 4
    m = FlowDensity(nice(d, hidden_dims=(8,)), levels=levels, alpha=a, base="logistic")
    x = torch.randint(0, levels, (10, d)).float()
    expected = d * (math.log1p(-2 * a) - math.log(levels))
    torch.testing.assert_close(m.log_prob(x), torch.full((10,), expected))
    torch.testing.assert_close(
        m.bits_per_dim(x, dequantize=True),
        torch.full((10,), math.log2(levels) - math.log2(1 - 2 * a)),
    )


def test_identity_flow_plain_scaling_and_continuous() -> None:
    levels = 17
    x = torch.tensor([[0.5, 3.0, 16.5]], dtype=torch.float64)
    m = FlowDensity(nice(3, hidden_dims=(8,)), levels=levels, alpha=None).double()
    expected = sum(_normal_logpdf(v / levels) - math.log(levels) for v in x[0].tolist())
    assert float(m.log_prob(x).detach()) == pytest.approx(expected, abs=1e-10)
    c = FlowDensity(nice(3, hidden_dims=(8,))).double()
    assert float(c.log_prob(x).detach()) == pytest.approx(sum(_normal_logpdf(v) for v in x[0].tolist()))


@pytest.mark.parametrize(
    "levels,alpha,base",
    [(None, 0.05, "normal"), (17, 0.05, "normal"), (17, None, "normal"), (5, 0.2, "logistic")],
)
def test_log_prob_matches_autograd_jacobian(levels: int | None, alpha: float | None,
                                            base: str) -> None:
    # a non-trivial flow: log p(decode(z)) = log p_Z(z) - log|det d decode / dz|
    flow = realnvp(4, num_layers=3, hidden_dims=(16,))
    _perturb(flow)
    m = FlowDensity(flow, levels=levels, alpha=alpha, base=base).double()  # type: ignore[arg-type]
    z = 0.5 * torch.randn(6, 4, dtype=torch.float64)
    x = m.decode(z)
    base_lp = m.distribution.base_dist.log_prob(z)
    for i in range(z.shape[0]):
        jac = jacobian(m.decode, z[i])
        expected = base_lp[i] - torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(m.log_prob(x[i].clone()), expected)
    torch.testing.assert_close(m.encode(x.clone()), z)


def _grid_mass(m: FlowDensity, lo: float, hi: float, n: int) -> float:
    """Midpoint rule for the mass of a 2-D density on [lo, hi)^2."""
    g = lo + (torch.arange(n, dtype=torch.float64) + 0.5) * (hi - lo) / n
    with torch.no_grad():
        return float(m.log_prob(torch.cartesian_prod(g, g)).exp().sum() * ((hi - lo) / n) ** 2)


def test_continuous_density_integrates_to_one_and_matches_samples() -> None:
    # couplings only: perturbed actnorm scales would widen the tails past a finite grid
    flow = realnvp(2, num_layers=4, hidden_dims=(16,), norm=None)
    _perturb(flow, 0.1)  # far from N(0, I), light enough tails for a finite grid
    m = FlowDensity(flow).double()
    assert _grid_mass(m, -12.0, 12.0, 600) == pytest.approx(1.0, abs=1e-3)
    # the mass of a box by quadrature and by sampling agree (MC std ~0.003)
    x = m.sample(20000)
    inside = float((x.abs() < 2).all(-1).double().mean())
    assert _grid_mass(m, -2.0, 2.0, 400) == pytest.approx(inside, abs=0.015)
    assert inside < 0.88  # a standard normal has 0.911 there: the flow is not the identity


@pytest.mark.parametrize("base", ["normal", "logistic"])
def test_discrete_mass_on_data_range_by_hand(base: str) -> None:
    # identity flow, D = 2: the mass on [0, L)^2 is P(logit a <= z < logit(1 - a))^2, a
    # little below 1 since the logit pre-processing widens the support (documented)
    levels, a = 4, 0.1
    m = FlowDensity(nice(2, hidden_dims=(8,)), levels=levels, alpha=a, base=base).double()  # type: ignore[arg-type]
    mass = _grid_mass(m, 0.0, levels, 400)
    c = math.log((1 - a) / a)
    per_dim = math.erf(c / math.sqrt(2)) if base == "normal" else 1 - 2 * a
    assert mass == pytest.approx(per_dim**2, abs=2e-4)


# ----------------------------------------------------------------------------------------
# sampling, encode/decode
# ----------------------------------------------------------------------------------------


def test_sample_encode_decode_discrete() -> None:
    levels = 17
    flow = nice(6, hidden_dims=(16,))
    _perturb(flow)
    m = FlowDensity(flow, levels=levels)
    x = m.sample(500)
    assert x.shape == (500, 6)
    assert float(x.min()) >= 0 and float(x.max()) < levels
    assert torch.isfinite(m.log_prob(x)).all()
    q = m.sample((2, 3), quantize=True)
    assert q.shape == (2, 3, 6)
    assert bool((q == q.round()).all()) and 0 <= float(q.min()) and float(q.max()) <= levels - 1
    z = torch.randn(20, 6)
    torch.testing.assert_close(m.encode(m.decode(z)), z, atol=1e-4, rtol=1e-4)
    xs = m.sample(20)
    torch.testing.assert_close(m.decode(m.encode(xs)), xs, atol=1e-3, rtol=1e-4)


def test_sample_entropy_identity_flow() -> None:
    # identity flow, continuous: E[-log p(x)] over samples is the entropy D/2 log(2 pi e)
    m = FlowDensity(nice(4, hidden_dims=(8,)))
    x = m.sample(20000)
    entropy = 2 * math.log(2 * math.pi * math.e)
    assert float(-m.log_prob(x).detach().mean()) == pytest.approx(entropy, abs=0.05)


def test_logistic_samples_clamped_into_range() -> None:
    # identity flow and logistic base: u is uniform on (-a/(1-2a), (1-a)/(1-2a)), so a
    # fraction a of the values falls below 0 and is clamped there
    m = FlowDensity(nice(2, hidden_dims=(8,)), levels=8, alpha=0.1, base="logistic")
    x = m.sample(20000)
    assert float((x == 0).double().mean()) == pytest.approx(0.1, abs=0.01)
    assert float(x.max()) < 8


def test_cached_flow_sample_then_score() -> None:
    flow = realnvp(3, num_layers=2, hidden_dims=(8,)).with_cache(1)
    m = FlowDensity(flow)
    z = torch.randn(5, 3)
    x = m.decode(z)
    assert m.encode(x) is z  # the cache serves the pair
    assert torch.isfinite(m.log_prob(x)).all()


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------


def _discrete() -> FlowDensity:
    return FlowDensity(nice(4, hidden_dims=(8,)), levels=17)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m.log_prob(torch.zeros(3, 5)), r"event shape \(4,\), got .*\(3, 5\)"),
        (lambda m: m.model(torch.zeros(4)), r"expected data of shape \(N, \*\(4,\)\), got \(4,\)"),
        (lambda m: m.model(torch.zeros(2, 3, 4)), r"shape \(N, \*\(4,\)\), got \(2, 3, 4\)"),
        (lambda m: m.model(torch.tensor([[0.0, 1.0, float("nan"), 2.0]])), "finite"),
        (lambda m: m.log_prob(torch.tensor([[0.0, 1.0, float("inf"), 2.0]])), "finite"),
        (lambda m: m.model(torch.tensor([[0.0, 17.0, 2.0, 2.0]])), r"\[0, 16\].*\[0, 17\]"),
        (lambda m: m.model(torch.tensor([[-1.0, 1.0, 2.0, 2.0]])), r"\[0, 16\].*\[-1, 2\]"),
        (lambda m: m.model(torch.tensor([[0.5, 1.0, 2.0, 2.0]])), "not all integers"),
        (lambda m: m.log_prob(torch.tensor([[0.5, 1.0, 18.0, 2.0]])), r"support.*\[0\.5, 18\]"),
        (lambda m: m.model(torch.tensor([[0.5, 1.0, 17.0, 2.0]])), r"\[0, 16\].*\[0\.5, 17\]"),
        (lambda m: m.log_prob(torch.tensor([[0.5, 1, 2, 2]]), dequantize=True), "integer"),
        (lambda m: m.decode(torch.zeros(2, 3)), r"latent with event shape \(4,\)"),
    ],
)
def test_bad_data_fails_early(call: Callable, match: str) -> None:
    m = _discrete()
    with pytest.raises(ValueError, match=match):
        call(m)
    assert len(list(pyro.get_param_store().keys())) == 0  # nothing ran


def test_bad_construction() -> None:
    with pytest.raises(TypeError, match="Transform"):
        FlowDensity(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base"):
        FlowDensity(nice(2), base="gumbel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected event_shape \(2,\)"):
        FlowDensity(nice(2), event_shape=(3,))
    with pytest.raises(ValueError, match="levels"):
        FlowDensity(nice(2), levels=1)
    with pytest.raises(ValueError, match="alpha"):
        FlowDensity(nice(2), levels=4, alpha=0.7)
    with pytest.raises(ValueError, match="levels=L"):
        FlowDensity(nice(2)).log_prob(torch.zeros(2), dequantize=True)
    with pytest.raises(TypeError, match="Tensor"):
        FlowDensity(nice(2)).log_prob([0.0, 1.0])  # type: ignore[arg-type]


def test_integer_tensors_accepted() -> None:
    m = _discrete()
    x = torch.randint(0, 17, (5, 4))
    torch.testing.assert_close(m.log_prob(x), m.log_prob(x.float()))


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------


def _moons(n: int) -> torch.Tensor:
    t = torch.rand(n) * math.pi
    upper = torch.stack([torch.cos(t), torch.sin(t)], -1)
    lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)
    side = (torch.rand(n) < 0.5).unsqueeze(-1)
    return torch.where(side, upper, lower) + 0.05 * torch.randn(n, 2)


@pytest.mark.parametrize("cache_size", [0, 1])
def test_full_batch_svi_same_tensor_every_step(cache_size: int) -> None:
    x = _moons(256)
    flow = realnvp(2, num_layers=4, hidden_dims=(32, 32)).with_cache(cache_size)
    m = FlowDensity(flow)
    before = {k: v.detach().clone() for k, v in flow.named_parameters()}
    svi = SVI(m.model, m.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(50)]  # the very same tensor every step
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5 * x.shape[0]
    # every flow parameter reached the param store and was trained
    names = set(pyro.get_param_store().keys())
    assert {f"flow$$${k}" for k, _ in flow.named_parameters()} == names
    assert all(not torch.equal(before[k], v) for k, v in flow.named_parameters()
               if k.endswith("weight") and "net.2" in k)
    with torch.no_grad():
        assert float(-m.log_prob(x).mean()) == pytest.approx(losses[-1] / x.shape[0], abs=0.3)


def test_full_batch_svi_with_a_pyro_transform() -> None:
    # Pyro's own transforms cache by tensor identity; the model hands them a fresh view
    x = _moons(128)
    m = FlowDensity(T.spline(2), event_shape=(2,))
    svi = SVI(m.model, m.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(20)]
    assert losses[-1] < losses[0]


def test_svi_discrete_data_improves_bits_per_dim() -> None:
    # 17 levels, 4 strongly correlated dimensions
    levels, n = 17, 512
    h = torch.randn(n, 1)
    x = (8 + 3 * h + 0.7 * torch.randn(n, 4)).round().clamp(0, levels - 1)
    m = FlowDensity(realnvp(4, num_layers=4, hidden_dims=(32, 32)), levels=levels)

    def bpd() -> float:
        torch.manual_seed(1)  # the same noise for both evaluations
        with torch.no_grad():
            return float(m.bits_per_dim(x, dequantize=True).mean())

    start = bpd()
    svi = SVI(m.model, m.guide, Adam({"lr": 5e-3}), Trace_ELBO())
    for _ in range(150):
        svi.step(x)
    end = bpd()
    print(f"bits/dim {start:.3f} -> {end:.3f} (raw levels: {math.log2(levels):.3f})")
    assert end < start - 0.5
    assert end < math.log2(levels)  # better than storing the levels raw


def test_image_flow_density_trains_and_round_trips() -> None:
    x = torch.randint(0, 5, (16, 1, 4, 4)).float()
    m = FlowDensity(realnvp((1, 4, 4), hidden_channels=4, num_blocks=1), levels=5)
    svi = SVI(m.model, m.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    m.eval()
    assert m.log_prob(x).shape == (16,)
    torch.testing.assert_close(m.decode(m.encode(x)), x, atol=1e-3, rtol=1e-4)
    assert m.sample(2, quantize=True).shape == (2, 1, 4, 4)


def _observed(m: FlowDensity, x: torch.Tensor) -> torch.Tensor:
    value = pyro.poutine.trace(m.model).get_trace(x).nodes["x"]["value"]
    assert isinstance(value, torch.Tensor)
    return value


def test_model_dequantizes_in_training_only() -> None:
    m = _discrete()
    x = torch.randint(0, 17, (8, 4)).float()
    m.eval()
    assert torch.equal(_observed(m, x), x)
    m.train()
    noise = _observed(m, x) - x
    assert bool(((noise >= 0) & (noise < 1)).all()) and bool((noise > 0).any())


def test_two_models_need_their_own_names() -> None:
    x = _moons(32)
    a, b = FlowDensity(nice(2, hidden_dims=(8,))), FlowDensity(nice(2, hidden_dims=(8,)))
    pyro.poutine.trace(a.model).get_trace(x)
    with pytest.raises(RuntimeError, match="clear_param_store"):
        pyro.poutine.trace(b.model).get_trace(x)
    c = FlowDensity(nice(2, hidden_dims=(8,)), name="c")
    pyro.poutine.trace(c.model).get_trace(x)
    assert any(k.startswith("c.flow$$$") for k in pyro.get_param_store().keys())


def test_state_dict_and_pickle_round_trip() -> None:
    flow = realnvp(3, num_layers=2, hidden_dims=(8,))
    _perturb(flow)
    m = FlowDensity(flow, levels=9)
    x = torch.randint(0, 9, (4, 3)).float()
    other = FlowDensity(realnvp(3, num_layers=2, hidden_dims=(8,)), levels=9)
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(other.log_prob(x), m.log_prob(x))
    copy = pickle.loads(pickle.dumps(m))
    torch.testing.assert_close(copy.log_prob(x), m.log_prob(x))


def test_check_data_runs_even_when_value_checks_are_off() -> None:
    from pyro_genext.checks import data_checks

    m = FlowDensity(realnvp(4, num_layers=2, hidden_dims=(8,)), levels=17)
    good = torch.randint(0, 17, (8, 4)).float()
    m.check_data(good)
    with data_checks(False):
        with pytest.raises(ValueError, match=r"integer levels in \[0, 16\]"):
            m.check_data(good + 0.5)
        m.log_prob(good + 0.5)  # not checked: the caller validated its data once
    with pytest.raises(ValueError, match="expected data of shape"):
        m.check_data(good[0])
