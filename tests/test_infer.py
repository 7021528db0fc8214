"""Flow autoguides: what they fit, how they plug into Pyro, and their gradients."""

from __future__ import annotations

import io
import math
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoGuideList,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)

from pyro_genext.infer import AutoNICE, AutoRealNVP, coupling_splits, fit_guide
from pyro_genext.testing import check_bijector
from pyro_genext.transforms import Affine, MaskedCoupling, Permute

GUIDES = {"realnvp": AutoRealNVP, "nice": AutoNICE}

MEAN = torch.tensor([1.0, -2.0, 0.5])
COV = torch.tensor([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 0.6]])


def gaussian():
    pyro.sample("z", dist.MultivariateNormal(MEAN, COV))


def banana():
    x1 = pyro.sample("x1", dist.Normal(0.0, 2.0))
    pyro.sample("x2", dist.Normal(0.5 * (x1**2 - 4.0), 1.0))


def fit(model, guide, steps, lr=0.03, loss=None, *args):
    """SVI with a learning rate decaying to lr / 20, so that the end point is not noisy."""
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.05 ** (1 / steps)})
    loss = loss or Trace_ELBO(num_particles=8, vectorize_particles=True)
    svi = SVI(model, guide, optim, loss)
    losses = [svi.step(*args) for _ in range(steps)]
    assert all(math.isfinite(v) for v in losses), losses[-10:]
    return losses


@torch.no_grad()
def draws(guide, n=4000, *args):
    return guide.get_posterior(*args).sample((n,))


# ------------------------------------------------------------------ the new bijectors
@pytest.mark.parametrize(
    "factory",
    [partial(Affine, 3), partial(Affine, 3, tril=True), partial(Permute, [2, 0, 3, 1])],
    ids=["affine-diag", "affine-tril", "permute"],
)
def test_bijector_contract(factory):
    check_bijector(factory)


def test_permute_sign_and_bad_input():
    assert Permute([1, 0, 2]).sign == -1 and Permute([1, 2, 0]).sign == 1
    with pytest.raises(ValueError, match="permutation of range"):
        Permute([0, 0, 1])
    with pytest.raises(ValueError, match="positive scale"):
        Affine(2, scale=0.0)


@pytest.mark.parametrize("d", range(2, 18))
def test_every_pair_is_split_in_both_directions(d):
    nbits = math.ceil(math.log2(d))
    seen = set()
    for order, size, parity in coupling_splits(d, 2 * nbits):
        first, second = order[:size].tolist(), order[size:].tolist()
        cond, trans = (first, second) if parity == 0 else (second, first)
        assert cond and trans
        seen |= {(i, j) for i in cond for j in trans}
    assert seen == {(i, j) for i in range(d) for j in range(d) if i != j}


def test_flow_couplings_see_the_split_they_are_given():
    """The permutations in the guide's chain put each coupling's conditioning set where
    coupling_splits says: perturb one coupling and only its transformed coordinates move."""
    guide = AutoRealNVP(lambda: pyro.sample("z", dist.Normal(torch.zeros(5), 1.0).to_event(1)),
                        num_layers=6, hidden_dims=(8,)).setup()
    couplings = [p for p in guide.flow if isinstance(p, MaskedCoupling)]
    for k, (order, size, parity) in enumerate(coupling_splits(5, 6)):
        trans = set((order[size:] if parity == 0 else order[:size]).tolist())
        u = torch.randn(100, 5)
        with torch.no_grad():
            before = guide.flow._forward_and_ladj(u)[0]
            couplings[k].conditioner.net[-1].bias.add_(0.3)
            after = guide.flow._forward_and_ladj(u)[0]
            couplings[k].conditioner.net[-1].bias.sub_(0.3)
        # the layers after k are still the identity, the affine stage is diagonal
        moved = {i for i in range(5) if (after[:, i] - before[:, i]).abs().max() > 1e-6}
        assert moved == trans, (k, moved, trans)


# ------------------------------------------------------------------ what they fit
@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_at_init_the_guide_is_the_gaussian_guide(kind):
    def model():
        pyro.sample("a", dist.Normal(1.0, 2.0))
        pyro.sample("b", dist.LogNormal(0.0, 1.0))

    init = init_to_value(values={"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    guide = GUIDES[kind](model, init_loc_fn=init, init_scale=0.3).setup()
    z = draws(guide, 20000)
    assert torch.allclose(z.mean(0), torch.tensor([1.0, 0.0]), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([0.3, 0.3]), atol=0.01)


def test_correlated_gaussian_recovered():
    guide = AutoRealNVP(gaussian, num_layers=2, hidden_dims=(16,), affine="full", init_scale=0.5)
    fit(gaussian, guide, 300, 0.05)
    z = draws(guide, 8000)
    assert (z.mean(0) - MEAN).abs().max() < 0.1
    assert (torch.cov(z.T) - COV).abs().max() < 0.15


def test_banana_curvature_captured_where_mean_field_misses_it():
    true_corr = 0.5 * math.sqrt(2) * 4 / 3  # corr(x1^2, x2) = b sqrt(2) s^2 / sd(x2) = 0.943

    def corr(guide):
        z = draws(guide, 8000)
        return torch.corrcoef(torch.stack([z[:, 0] ** 2, z[:, 1]]))[0, 1].item()

    # the family's reach at a small budget, by the ordinary estimator (with stl=True, the
    # default, 400 steps reached corr 0.59: the path derivative starts slower here and
    # ends better, docs/benchmarks_posteriors.rst)
    flow = AutoRealNVP(banana, num_layers=4, hidden_dims=(32,), init_scale=1.0, stl=False)
    fit(banana, flow, 400, 0.02)
    pyro.clear_param_store()
    mf = AutoDiagonalNormal(banana, init_scale=1.0)
    fit(banana, mf, 200, 0.05)
    assert abs(corr(mf)) < 0.1
    assert corr(flow) > 0.6, (corr(flow), true_corr)


def test_constrained_latents_respected():
    def model():
        pyro.sample("s", dist.Gamma(3.0, 2.0))
        pyro.sample("p", dist.Dirichlet(torch.tensor([2.0, 3.0, 5.0])))

    guide = AutoRealNVP(model, num_layers=2, hidden_dims=(16,), init_scale=0.5)
    fit(model, guide, 300)
    with torch.no_grad(), pyro.plate("draws", 2000, dim=-1):
        out = guide()
    assert (out["s"] > 0).all()
    assert (out["p"] > 0).all() and torch.allclose(out["p"].sum(-1), torch.ones(2000))
    assert abs(out["s"].mean().item() - 1.5) < 0.15
    assert (out["p"].mean(0) - torch.tensor([0.2, 0.3, 0.5])).abs().max() < 0.05


def test_median_and_quantiles_by_sampling_match_known_values():
    # at init with the exact loc and scale the guide is exactly the posterior
    def model():
        pyro.sample("x", dist.Normal(1.0, 0.5))
        pyro.sample("s", dist.LogNormal(0.3, 0.5))

    init = init_to_value(values={"x": torch.tensor(1.0), "s": torch.tensor(math.exp(0.3))})
    guide = AutoRealNVP(model, init_loc_fn=init, init_scale=0.5, num_quantile_samples=20000)
    med = guide.median()
    assert abs(med["x"] - 1.0) < 0.02 and abs(med["s"] - math.exp(0.3)) < 0.03
    q = torch.tensor([0.1, 0.5, 0.9])
    qs = guide.quantiles(q.tolist())
    exact_x = dist.Normal(1.0, 0.5).icdf(q)
    assert qs["x"].shape == (3,)
    assert (qs["x"] - exact_x).abs().max() < 0.03
    assert (qs["s"] - exact_x.sub(1.0).add(0.3).exp()).abs().max() < 0.05
    with pytest.raises(ValueError, match="quantiles in"):
        guide.quantiles([1.5])


def test_scalar_latent_gets_a_working_guide():
    # y ~ N(theta, 1), theta ~ N(0, 1): posterior N(sum y / (n + 1), 1 / (n + 1))
    y = torch.tensor([0.5, 1.5, 1.0, 2.0])

    def model(y):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)

    guide = AutoRealNVP(model, init_scale=0.5)
    fit(model, guide, 200, 0.05, None, y)
    assert len(guide.flow) == 1  # the affine stage alone
    z = draws(guide, 8000, y)
    assert abs(z.mean() - 1.0) < 0.05 and abs(z.std() - math.sqrt(0.2)) < 0.05


# ------------------------------------------------------------------ Pyro plumbing
def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("y", dist.Normal((w * x).sum(-1), sigma), obs=y)


X = torch.randn(20, 2)
Y = X @ torch.tensor([1.0, -1.0]) + 0.3 * torch.randn(20)


@pytest.mark.parametrize("kind", sorted(GUIDES))
@pytest.mark.parametrize(
    "loss",
    [
        Trace_ELBO(),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
        TraceMeanField_ELBO(),
        RenyiELBO(alpha=0.0, num_particles=4),
        RenyiELBO(alpha=0.0, num_particles=4, vectorize_particles=True),
    ],
    ids=["trace", "trace-vec", "meanfield", "renyi0", "renyi0-vec"],
)
@pytest.mark.parametrize("stl", [False, True], ids=["plain", "stl"])
def test_losses_finite_and_decreasing(kind, loss, stl):
    guide = GUIDES[kind](regression, num_layers=2, hidden_dims=(8,), stl=stl, init_scale=0.1).setup(X, Y)

    def objective():  # the loss being trained (an IW bound for Renyi), averaged
        with torch.no_grad():
            return sum(loss.loss(regression, guide, X, Y) for _ in range(25)) / 25

    before = objective()
    fit(regression, guide, 30, 0.05, loss, X, Y)  # every step's loss finite
    after = objective()
    assert after < before, (before, after)


def test_predictive_guide_list_and_handlers():
    guide = AutoGuideList(regression)
    guide.append(AutoRealNVP(poutine.block(regression, hide=["sigma"]), num_layers=2, hidden_dims=(8,)))
    guide.append(AutoDiagonalNormal(poutine.block(regression, expose=["sigma"])))
    fit(regression, guide, 30, 0.05, Trace_ELBO(), X, Y)
    # (Predictive(parallel=True) on this model fails for Pyro's own AutoDiagonalNormal
    # too once its guide was set up with y observed, so it is left out here)
    pred = Predictive(regression, guide=guide, num_samples=50)(X)
    assert pred["y"].shape == (50, 20) and pred["w"].shape == (50, 1, 2)
    # scaled and conditioned models still score
    scaled = poutine.scale(regression, scale=0.5)
    fit(scaled, guide, 3, 0.05, Trace_ELBO(), X, Y)
    tr = poutine.trace(guide).get_trace(X, Y)
    replayed = poutine.trace(poutine.replay(regression, trace=tr)).get_trace(X, Y)
    assert torch.isfinite(replayed.log_prob_sum())
    cond = poutine.condition(regression, data={"sigma": torch.tensor(0.3)})
    g2 = AutoRealNVP(cond, num_layers=2, hidden_dims=(8,))
    fit(cond, g2, 3, 0.05, Trace_ELBO(), X, Y)
    assert g2.latent_dim == 2


def test_inference_mode():
    guide = AutoRealNVP(regression, num_layers=2, hidden_dims=(8,)).setup(X, Y)
    with torch.inference_mode():
        out = guide(X, Y)
        pred = Predictive(regression, guide=guide, num_samples=5)(X)
    assert out["w"].shape == (2,) and pred["y"].shape == (5, 20)


def _trained(kind="realnvp"):
    guide = GUIDES[kind](regression, num_layers=2, hidden_dims=(8,), affine="full")
    fit(regression, guide, 80, 0.05, Trace_ELBO(), X, Y)
    return guide


def _same_posterior(a, b):
    u = torch.randn(7, a.latent_dim)
    with torch.no_grad():
        return torch.allclose(a.flow._forward_and_ladj(u)[0], b.flow._forward_and_ladj(u)[0])


def test_param_store_save_and_load_restore_the_trained_posterior():
    guide = _trained()
    buf = io.BytesIO()
    torch.save(pyro.get_param_store().get_state(), buf)
    pyro.clear_param_store()
    buf.seek(0)
    pyro.get_param_store().set_state(torch.load(buf, weights_only=False))
    fresh = AutoRealNVP(regression, num_layers=2, hidden_dims=(8,), affine="full")
    fresh(X, Y)  # first call: built at init, then the stored parameters are taken
    assert _same_posterior(guide, fresh)
    # and it keeps training the restored parameters
    fit(regression, fresh, 2, 0.05, Trace_ELBO(), X, Y)
    assert not _same_posterior(guide, fresh)


def test_state_dict_round_trip():
    guide = _trained("nice")
    state = guide.state_dict()
    pyro.clear_param_store()
    fresh = AutoNICE(regression, num_layers=2, hidden_dims=(8,), affine="full").setup(X, Y)
    assert not _same_posterior(guide, fresh)
    fresh.load_state_dict(state)
    assert _same_posterior(guide, fresh)
    fresh(X, Y)  # a call must not overwrite what was loaded
    assert _same_posterior(guide, fresh)


# ------------------------------------------------------------------ gradients and cost
def _exact_gaussian_guide(stl):
    guide = AutoRealNVP(gaussian, num_layers=2, hidden_dims=(8,), affine="full", stl=stl).setup()
    aff = guide.flow[-1]
    L = torch.linalg.cholesky(COV)
    d = L.diagonal()
    with torch.no_grad():
        aff.loc.copy_(MEAN)
        aff.raw_scale.copy_(d + torch.log(-torch.expm1(-d)))
        aff.raw_tril.copy_(L / d[:, None])
    return guide


@pytest.mark.parametrize("stl", [True, False])
def test_sticking_the_landing_gradient_vanishes_at_the_exact_posterior(stl):
    guide = _exact_gaussian_guide(stl)
    assert torch.allclose(guide.flow[-1].scale_tril(), torch.linalg.cholesky(COV), atol=1e-6)
    params = list(guide.parameters())
    norms = []
    for _ in range(5):
        loss = Trace_ELBO().differentiable_loss(gaussian, guide)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)))
    if stl:
        assert max(norms) < 1e-4, norms
    else:  # the score term makes the ordinary estimator noisy even there
        assert min(norms) > 1e-2, norms


def _count_conditioner_calls(stl):
    guide = AutoRealNVP(regression, num_layers=4, hidden_dims=(8,), stl=stl).setup(X, Y)
    calls = []
    for p in guide.flow:
        if isinstance(p, MaskedCoupling):
            p.conditioner.register_forward_hook(lambda m, i, o: calls.append(m))
    svi = SVI(regression, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(X, Y)
    return len(calls)


def test_sample_then_score_runs_each_conditioner_once():
    assert _count_conditioner_calls(stl=False) == 4


def test_sticking_the_landing_rescores_once():
    assert _count_conditioner_calls(stl=True) == 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="affine='diagonal' or 'full'"):
        AutoRealNVP(gaussian, affine="tril")
    with pytest.raises(ValueError, match="num_layers"):
        AutoNICE(gaussian, num_layers=-1)
    with pytest.raises(ValueError, match="init_scale"):
        AutoRealNVP(gaussian, init_scale=0.0)


# ------------------------------------------------------------------ summaries (issue 15)
def _plated():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", 3):
        pyro.sample("theta", dist.Normal(mu, 1.0))


def test_median_and_quantiles_of_a_site_in_a_plate():
    values = {"mu": torch.tensor(0.5), "theta": torch.tensor([-1.0, 0.0, 2.0])}
    guide = AutoRealNVP(_plated, init_loc_fn=init_to_value(values=values), init_scale=0.2,
                        num_layers=2, hidden_dims=(8,), num_quantile_samples=20000)
    med = guide.median()
    amvn = AutoMultivariateNormal(_plated, init_loc_fn=init_to_value(values=values))
    amvn()  # Pyro's guide needs a first call
    ref = amvn.median()
    assert {k: v.shape for k, v in med.items()} == {k: v.shape for k, v in ref.items()}
    for k in values:  # at init the guide is N(values, 0.2^2): median error ~ 0.002
        assert (med[k] - values[k]).abs().max() < 0.01, (k, med[k])
    qs = guide.quantiles([0.1, 0.9])
    assert qs["theta"].shape == (2, 3)
    z = 0.2 * dist.Normal(0.0, 1.0).icdf(torch.tensor(0.9))
    assert (qs["theta"][1] - values["theta"] - z).abs().max() < 0.02


def _constrained():
    pyro.sample("p", dist.Dirichlet(torch.tensor([2.0, 3.0, 5.0])))
    pyro.sample("L", dist.LKJCholesky(3, 1.0))


def test_median_and_quantiles_stay_in_the_support():
    guide = AutoRealNVP(_constrained, init_scale=1.0, num_layers=2, hidden_dims=(8,))
    med = guide.median()
    assert torch.allclose(med["p"].sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(med["L"].norm(dim=-1), torch.ones(3), atol=1e-5)
    poutine.trace(poutine.condition(_constrained, data=med)).get_trace().log_prob_sum()
    qs = guide.quantiles([0.25, 0.75])
    assert torch.allclose(qs["p"].sum(-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(qs["L"].norm(dim=-1), torch.ones(2, 3), atol=1e-5)


def test_init_coupling_scale_starts_near_but_not_at_the_gaussian_guide():
    def build(scale):
        pyro.clear_param_store()
        return AutoRealNVP(gaussian, init_coupling_scale=scale, init_loc_fn=init_to_value(
            values={"z": torch.zeros(3)}), init_scale=1.0).setup()

    u = torch.randn(2000, 3)
    with torch.no_grad():
        exact = build(0.0).flow._forward_and_ladj(u)[0]
        near = build(0.01).flow._forward_and_ladj(u)[0]
    assert torch.equal(exact, u)  # zero last layers: the identity, then N(0, I)
    moved = (near - u).abs()
    assert 1e-4 < moved.mean() < 0.1, moved.mean()


@pytest.mark.parametrize(
    "kwargs, name",
    [({"hidden_dims": ()}, "hidden_dims"), ({"scale_bound": 0}, "scale_bound"),
     ({"scale_bound": -1.0}, "scale_bound"), ({"init_coupling_scale": -0.1}, "init_coupling_scale")],
    ids=["no-hidden-layer", "bound-0", "bound-negative", "init-negative"],
)
def test_bad_arguments_refused_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AutoRealNVP(gaussian, **kwargs)


# ------------------------------------------------------------------ fit_guide
def _conjugate(y):
    # z ~ N(0, I_2), y_i ~ N(A z, 0.5^2 I): a correlated Gaussian posterior, in closed form
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(z @ _A.T, 0.5).to_event(1), obs=y)


_A = torch.tensor([[1.0, 0.8], [0.0, 0.6]])
_Y = torch.tensor([[1.0, -0.5], [1.2, -0.3]])
_PREC = torch.eye(2) + len(_Y) * _A.T @ _A / 0.25
_POST_COV = torch.linalg.inv(_PREC)
_POST_MEAN = _POST_COV @ (_A.T @ _Y.sum(0)) / 0.25


GUIDE_FACTORIES = {
    "AutoNormal": partial(AutoNormal, init_scale=0.3),
    "AutoMultivariateNormal": partial(AutoMultivariateNormal, init_scale=0.3),
    "AutoIAFNormal": partial(AutoIAFNormal, hidden_dim=[8]),
    "AutoRealNVP": partial(AutoRealNVP, num_layers=2, hidden_dims=(8,), stl=True),
}


@pytest.mark.parametrize("name", sorted(GUIDE_FACTORIES))
def test_fit_guide_recovers_a_conjugate_posterior(name):
    pyro.set_rng_seed(1)
    guide = GUIDE_FACTORIES[name](_conjugate)  # Pyro's guides build their parameters lazily
    result = fit_guide(_conjugate, guide, _Y, num_steps=600, lr=0.03, progress_bar=False)
    assert len(result.losses) == result.num_steps <= 600
    assert all(math.isfinite(v) for v in result.losses)
    with torch.no_grad(), pyro.plate("draws", 8000, dim=-2):
        z = guide(_Y)["z"].reshape(-1, 2)
    assert (z.mean(0) - _POST_MEAN).abs().max() < 0.05, (z.mean(0), _POST_MEAN)
    if name != "AutoNormal":  # mean-field misses the correlation, and shrinks the sds
        assert (torch.cov(z.T) - _POST_COV).abs().max() < 0.02, torch.cov(z.T)


def _iid(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


_IID_Y = torch.tensor([0.3, 1.2, 0.8, 1.9])  # posterior N(sum y / 5, 1 / 5)


def test_fit_guide_stops_on_a_plateau_and_not_while_improving():
    exact = AutoNormal(_iid, init_loc_fn=init_to_value(values={"mu": _IID_Y.sum() / 5}),
                       init_scale=math.sqrt(0.2))
    done = fit_guide(_iid, exact, _IID_Y, num_steps=2000, progress_bar=False)
    # flat from the start: three plateaus (two cuts of the rate, then the final rate), each
    # of patience 4 windows of 40 steps after the first window: 13 windows at the least
    assert done.stopped_early and 13 * 40 <= done.num_steps < 1000, done.num_steps
    pyro.clear_param_store()
    far = AutoNormal(_iid, init_loc_fn=init_to_value(values={"mu": torch.tensor(-20.0)}))
    slow = fit_guide(_iid, far, _IID_Y, num_steps=800, lr=0.005, final_lr=1.0, progress_bar=False)
    # 0.005 per step moves mu by at most 4: the loss falls until the end
    assert not slow.stopped_early and slow.num_steps == 800
    assert slow.window_means[-1] < slow.window_means[-5] - 1.0


def test_importance_weighted_objective_and_its_dreg_gradient():
    from pyro_genext.infer import ImportanceWeightedELBO

    guide = AutoNormal(_iid, init_loc_fn=init_to_value(values={"mu": torch.tensor(0.0)}), init_scale=0.3)
    elbo = -sum(Trace_ELBO(num_particles=100, vectorize_particles=True).loss(_iid, guide, _IID_Y)
                for _ in range(10)) / 10
    iw = -sum(ImportanceWeightedELBO(10).loss(_iid, guide, _IID_Y) for _ in range(100)) / 100
    exact = float(dist.MultivariateNormal(torch.zeros(4), torch.eye(4) + 1.0).log_prob(_IID_Y))
    assert elbo < iw < exact, (elbo, iw, exact)
    # at the exact posterior with a path-derivative guide, DReG's gradient is zero
    pyro.clear_param_store()
    exact_guide = _exact_gaussian_guide(True)
    loss = ImportanceWeightedELBO(8).differentiable_loss(gaussian, exact_guide)
    grads = torch.autograd.grad(loss, list(exact_guide.parameters()), allow_unused=True)
    assert max(float(g.abs().max()) for g in grads if g is not None) < 1e-4
    # and training by it reaches the posterior
    pyro.clear_param_store()
    g2 = AutoRealNVP(_iid, init_scale=0.3, stl=True)  # the affine stage alone: a Gaussian
    # (the bound is flat near the posterior: the plateau rule would stop at 350 steps
    # with the mean 0.70; see fit_guide)
    fit_guide(_iid, g2, _IID_Y, num_steps=800, lr=0.03, objective="iwae", stop_on_plateau=False,
              progress_bar=False)
    z = draws(g2, 8000, _IID_Y)
    assert abs(float(z.mean()) - 0.84) < 0.03 and abs(float(z.std()) - math.sqrt(0.2)) < 0.05


def test_fit_guide_bad_arguments():
    guide = AutoNormal(_iid)
    for kwargs, name in [({"num_steps": 0}, "num_steps"), ({"lr": -1.0}, "lr"),
                         ({"final_lr": 0.0}, "final_lr"), ({"objective": "kl"}, "objective"),
                         ({"num_particles": 0}, "num_particles"), ({"clip_norm": 0.0}, "clip_norm"),
                         # not a number, or not a finite one: a ValueError, not a TypeError
                         # from a comparison nor a NaN after the first step
                         ({"num_steps": True}, "num_steps"), ({"lr": math.inf}, "lr"),
                         ({"clip_norm": "10"}, "clip_norm"), ({"plateau_factor": None}, "plateau_factor"),
                         ({"plateau_factor": 1.0}, "plateau_factor"), ({"patience": 0}, "patience"),
                         ({"window": 1}, "window"), ({"window": 50.0}, "window"),
                         ({"min_improvement": "0"}, "min_improvement"),
                         ({"min_improvement": -1.0}, "min_improvement")]:
        with pytest.raises(ValueError, match=name):
            fit_guide(_iid, guide, _IID_Y, progress_bar=False, **kwargs)
    for model, g, name in [(_iid, None, "guide"), (None, guide, "model")]:
        with pytest.raises(ValueError, match=name):
            fit_guide(model, g, _IID_Y, progress_bar=False)
    assert guide.prototype_trace is None  # each refused before the guide ran


# ------------------------------------------------------------------ held-out targets
def test_hierarchy_reference_by_quadrature_matches_importance_sampling():
    """The eight-schools target's exact moments (quadrature over log tau), through the
    public target, against importance sampling from the prior."""
    from pyro_genext.infer.targets import TARGETS

    target = TARGETS["eight_schools"]()
    sigma, y = (a.double() for a in target.args)
    # independent answer: 2 x 10^6 prior draws weighted by the likelihood
    g = torch.Generator().manual_seed(0)
    n = 2_000_000
    mu = 5.0 * torch.randn(n, generator=g, dtype=torch.float64)
    tau = 5.0 * torch.tan(torch.rand(n, generator=g, dtype=torch.float64) * math.pi / 2)  # HalfCauchy(5)
    theta = mu[:, None] + tau[:, None] * torch.randn(n, 8, generator=g, dtype=torch.float64)
    w = torch.softmax(dist.Normal(theta, sigma).log_prob(y).sum(-1), 0)
    ess = float(1 / (w**2).sum())
    assert ess > 20_000, ess
    for name, x in {"mu": mu[:, None], "tau": tau.log()[:, None], "theta": theta}.items():
        m = (w[:, None] * x).sum(0)
        s = ((w[:, None] * (x - m) ** 2).sum(0)).sqrt()
        ref_m, ref_s = target.ref_mean[name].reshape(-1), target.ref_sd[name].reshape(-1)
        # Monte Carlo error of the weighted moments: about sd / sqrt(ESS)
        tol = 5 * s.float() / math.sqrt(ess)
        assert ((m.float() - ref_m).abs() < tol).all(), (name, m, ref_m, tol)
        assert ((s.float() - ref_s).abs() < tol).all(), (name, s, ref_s, tol)


@pytest.mark.parametrize("name", ["unequal_groups", "gp", "horseshoe"])
def test_held_out_targets_are_vectorised_models(name):
    from pyro_genext.infer.targets import HELD_OUT

    t = HELD_OUT[name]()
    guide = AutoNormal(t.model)
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True).loss(t.model, guide, *t.args)
    assert math.isfinite(loss)
    if t.ref_mean:
        trace = poutine.trace(t.model).get_trace(*t.args)
        latent = {k for k, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]
                  and not k.startswith(("data", "groups"))}  # plates are sample sites too
        assert set(t.ref_mean) == latent


def test_fit_guide_without_vectorised_particles():
    def scalar_only(y):  # .item(): cannot run under an outer plate of particles
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu.item() + 0.0 * mu, 1.0), obs=y)

    guide = AutoNormal(scalar_only)
    result = fit_guide(scalar_only, guide, torch.tensor(1.0), num_steps=60, num_particles=2,
                       vectorize_particles=False, progress_bar=False)
    assert result.num_steps == 60 and all(math.isfinite(v) for v in result.losses)
    with pytest.raises(ValueError, match="vectorize_particles"):
        fit_guide(scalar_only, guide, torch.tensor(1.0), objective="iwae", vectorize_particles=False,
                  progress_bar=False)


def test_importance_weighted_bound_with_one_particle_is_the_elbo():
    # with one particle Pyro adds no particle plate; the bound is then the ELBO
    from pyro_genext.infer import ImportanceWeightedELBO

    def prior_only():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    exact = AutoNormal(prior_only, init_scale=1.0)  # q = p: log p/q = 0 for every draw
    assert abs(ImportanceWeightedELBO(1).loss(prior_only, exact)) < 1e-5
    result = fit_guide(_iid, AutoRealNVP(_iid, init_scale=0.3), _IID_Y, num_steps=30, objective="iwae",
                       num_particles=1, progress_bar=False)
    assert result.num_steps == 30 and all(math.isfinite(v) for v in result.losses)


def test_fit_guide_stops_on_a_non_finite_loss_before_updating_the_parameters():
    def broken(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("inf", -float("inf") * mu**2)  # a non-finite loss at every step

    guide = AutoNormal(broken, init_loc_fn=init_to_value(values={"mu": torch.tensor(0.5)}))
    with pytest.raises(RuntimeError, match=r"loss is (nan|inf) at step 0"):
        fit_guide(broken, guide, _IID_Y, progress_bar=False)
    # the guide is left as the last finite step left it, to be inspected or fitted again
    assert float(guide.locs.mu.detach()) == 0.5 and math.isfinite(float(guide.scales.mu.detach()))


def test_fit_guide_refuses_a_model_that_is_not_vectorised():
    # right for one draw; under the plate of particles the unsqueeze puts the particles on a
    # dim of their own, and Pyro's vectorised Trace_ELBO sums the likelihood over all 8x8
    # pairs without a word: the fit was N(0.97, 0.15^2), the posterior is N(0.83, 0.41^2)
    def not_vectorised(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(mu.unsqueeze(-1), 1.0), obs=y)

    guide = AutoNormal(not_vectorised)
    with pytest.raises(ValueError, match="site 'y'.*vectorize_particles=False"):
        fit_guide(not_vectorised, guide, torch.ones(5), num_steps=5, progress_bar=False)
    assert float(guide.locs.mu.detach()) == 0.0  # before any step
    result = fit_guide(not_vectorised, guide, torch.ones(5), num_steps=5, vectorize_particles=False,
                       progress_bar=False)
    assert result.num_steps == 5


def test_fit_guide_registers_a_flow_guides_parameters_once_and_svi_still_sees_them(monkeypatch):
    # pyro.module walks the flow's modules and calls pyro.param for each of its tensors: a
    # quarter of a step's time; fit_guide captures the parameters at its first evaluation
    calls = []
    module = pyro.module
    monkeypatch.setattr(pyro, "module", lambda *a, **k: calls.append(a[0]) or module(*a, **k))
    guide = AutoRealNVP(_iid, num_layers=2, hidden_dims=(4,))
    fit_guide(_iid, guide, _IID_Y, num_steps=20, init=None, progress_bar=False)
    assert 1 <= len(calls) <= 3  # the first evaluation and the check of vectorisation, not 20
    # afterwards a call registers them again: SVI's capture and the param store see them
    with pyro.poutine.trace(param_only=True) as capture:
        guide(_IID_Y)
    flow_params = {n for n in capture.trace.nodes if ".flow$$$" in n}
    assert len(flow_params) == len(list(guide.flow.parameters())) > 0
    assert guide._register_params
    # also after a fit that fails in its loop
    runs = []

    def broken(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        runs.append(1)
        pyro.factor("nan", mu * (float("nan") if len(runs) > 10 else 0.0))

    pyro.clear_param_store()
    other = AutoRealNVP(broken, num_layers=2, hidden_dims=(4,))
    with pytest.raises(RuntimeError, match=r"failed at step [1-9]"):
        fit_guide(broken, other, _IID_Y, init=None, progress_bar=False)
    assert other._register_params
