"""The importance-weighted objective: the bound it reports and the gradient it gives,
through every door Pyro has (``SVI.step``, ``SVI.evaluate_loss``, ``ELBOModule``) and
through :func:`~pyro_genext.infer.fit_guide`, for the guides and the VAE alike."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoMultivariateNormal, AutoNormal, init_to_value

from pyro_genext.infer import AutoNICE, AutoRealNVP, ImportanceWeightedELBO

Y = torch.tensor([0.3, 1.2, 0.8, 1.9])  # with mu ~ N(0, 1), y ~ N(mu, 1): posterior N(sum y / 5, 1 / 5)


def iid(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def iid_with_a_prior_mean(y):
    """``iid`` whose prior mean is a parameter of the model."""
    a = pyro.param("a", torch.tensor(0.5))
    mu = pyro.sample("mu", dist.Normal(a, 1.0))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def two(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    nu = pyro.sample("nu", dist.Normal(0.0, 1.0))
    with pyro.plate("obs", len(y)):
        pyro.sample("y", dist.Normal(mu + nu, 1.0), obs=y)


def _gaussian_flow(cls, model, loc, scale, stl):
    """A flow guide of one latent: its affine stage alone, N(loc, softplus(raw_scale))."""
    return cls(model, init_loc_fn=init_to_value(values={"mu": torch.tensor(loc), "nu": torch.tensor(loc)}),
               init_scale=scale, stl=stl)


def _grads_of(loss_fn, params, n):
    """``n`` draws of the gradient estimator, one row each."""
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(), params)])
                        for _ in range(n)])


def _reference(log_w, params, K, dims=1, n=200_000):
    """The exact gradient of -L_K, to Monte Carlo error far below the tests': the plain
    reparametrised IWAE gradient, averaged over ``n`` bounds (float64); ``log_w`` takes
    standard normal draws of shape ``(n, K, dims)``."""
    eps = torch.randn(n, K, dims, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(-torch.logsumexp(log_w(eps, *params), -1).mean(), params)
    return torch.stack(grads).float()


def _agrees(grads, ref):
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    return bool(((mean - ref).abs() < 4 * se + 0.02).all()), (mean, se, ref)


# ------------------------------------------------------------------ one bound through every door
def test_svi_step_and_evaluate_loss_report_and_follow_the_bound():
    guide = AutoNormal(iid, init_scale=0.3)
    guide(Y)  # the parameters
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    elbo = ImportanceWeightedELBO(10, max_plate_nesting=1)  # none guessed: same draws at every call
    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(iid, guide, Y)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    # Pyro's own estimator of this bound (same draws): RenyiELBO(alpha=0)
    pyro.set_rng_seed(3)
    renyi = RenyiELBO(alpha=0, num_particles=10, vectorize_particles=True, max_plate_nesting=1)
    assert renyi.loss_and_grads(iid, guide, Y) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in params]), want, rtol=1e-4, atol=1e-6)
    for p in params:
        p.grad = None

    before = [p.detach().clone() for p in params]
    svi = SVI(iid, guide, pyro.optim.SGD({"lr": 1.0}), elbo)
    pyro.set_rng_seed(3)
    assert svi.step(Y) == pytest.approx(float(loss.detach()), rel=1e-6)
    moved = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params)])
    assert torch.allclose(moved, want, rtol=1e-5, atol=1e-6)  # the step followed the bound's gradient
    pyro.set_rng_seed(4)
    value = elbo.loss(iid, guide, Y)
    pyro.set_rng_seed(4)
    assert svi.evaluate_loss(Y) == pytest.approx(value, rel=1e-6)
    pyro.set_rng_seed(4)
    assert float(elbo(iid, guide)(Y).detach()) == pytest.approx(value, rel=1e-6)  # the ELBOModule


def test_one_particle_is_the_elbo_through_svi():
    guide = AutoNormal(iid, init_scale=0.3)
    guide(Y)
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    got = []
    for elbo in (ImportanceWeightedELBO(1, max_plate_nesting=1), Trace_ELBO()):
        pyro.set_rng_seed(7)
        value = elbo.loss_and_grads(iid, guide, Y)
        got.append((value, torch.cat([p.grad.reshape(-1) for p in params])))
        for p in params:
            p.grad = None
    assert got[0][0] == pytest.approx(got[1][0], rel=1e-6)
    assert torch.allclose(got[0][1], got[1][1], rtol=1e-5, atol=1e-7)


def test_svi_with_the_bound_fits_the_posterior():
    # exact posterior N(0.84, 0.2); the bound is flatter than the ELBO, so a slow decay
    guide = _gaussian_flow(AutoRealNVP, iid, 0.0, 0.3, stl=True)
    optim = pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.05 ** (1 / 800)})
    svi = SVI(iid, guide, optim, ImportanceWeightedELBO(8))
    for _ in range(800):
        svi.step(Y)
    with torch.no_grad():
        z = guide.get_posterior(Y).sample((8000,))
    assert abs(float(z.mean()) - 0.84) < 0.03 and abs(float(z.std()) - math.sqrt(0.2)) < 0.05


def test_the_vae_uses_the_same_objective():
    import pyro_genext.models

    assert pyro_genext.models.ImportanceWeightedELBO is ImportanceWeightedELBO


@pytest.mark.parametrize("kwargs, name", [
    ({"num_particles": 0}, "num_particles"), ({"num_particles": 2.5}, "num_particles"),
    ({"num_particles": True}, "num_particles"), ({"num_particles": "10"}, "num_particles"),
    ({"max_plate_nesting": -1}, "max_plate_nesting"), ({"max_plate_nesting": 1.5}, "max_plate_nesting"),
    ({"vectorize_particles": "no"}, "vectorize_particles"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=f"expected {name}.*got"):
        ImportanceWeightedELBO(**kwargs)


# ------------------------------------------------------------------ DReG only where it is unbiased
@pytest.mark.parametrize("stl", [True, False], ids=["dreg", "iwae"])
def test_guide_gradient_is_unbiased(stl):
    # with the normalised weights not squared (IWAE with the path derivative alone) the
    # mean would be -6.1, -2.0: biased
    K, y = 8, Y.double()

    def log_w(eps, m, r):
        s = torch.nn.functional.softplus(r)
        z = m + s * eps[..., 0]
        return (dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z[..., None], 1.0).log_prob(y).sum(-1)
                - dist.Normal(m, s).log_prob(z))

    m = torch.zeros((), dtype=torch.float64, requires_grad=True)
    r = torch.tensor(0.3, dtype=torch.float64).expm1().log().requires_grad_()  # softplus(r) = 0.3
    ref = _reference(log_w, [m, r], K)
    guide = _gaussian_flow(AutoRealNVP, iid, 0.0, 0.3, stl).setup(Y)
    aff = guide.flow[-1]
    elbo = ImportanceWeightedELBO(K)
    grads = _grads_of(lambda: elbo.differentiable_loss(iid, guide, Y), [aff.loc, aff.raw_scale], 400)
    ok, info = _agrees(grads, ref)
    assert ok, info


def test_a_model_parameter_gets_the_iwae_gradient_beside_a_dreg_guide():
    # DReG's squared weights are right for the guide's path-only gradient, not for the
    # model's own pyro.param, whose gradient is sum_k w_k d log p(x, z_k) / d a
    K, y = 8, Y.double()

    def log_w(eps, a, m, r):
        s = torch.nn.functional.softplus(r)
        z = m + s * eps[..., 0]
        return (dist.Normal(a, 1.0).log_prob(z) + dist.Normal(z[..., None], 1.0).log_prob(y).sum(-1)
                - dist.Normal(m, s).log_prob(z))

    a = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    m = torch.zeros((), dtype=torch.float64, requires_grad=True)
    r = torch.tensor(0.3, dtype=torch.float64).expm1().log().requires_grad_()
    ref = _reference(log_w, [a, m, r], K)
    guide = _gaussian_flow(AutoRealNVP, iid_with_a_prior_mean, 0.0, 0.3, stl=True).setup(Y)
    aff = guide.flow[-1]
    elbo = ImportanceWeightedELBO(K)
    elbo.loss(iid_with_a_prior_mean, guide, Y)  # creates the model's parameter
    params = [pyro.param("a").unconstrained(), aff.loc, aff.raw_scale]
    grads = _grads_of(lambda: elbo.differentiable_loss(iid_with_a_prior_mean, guide, Y), params, 400)
    ok, info = _agrees(grads, ref)
    assert ok, info


def test_each_part_of_a_guide_list_gets_its_own_gradient():
    # an STL part (DReG) and a part with its score term (IWAE) in one AutoGuideList
    K, y = 8, Y.double()

    def log_w(eps, m1, r1, m2, r2):
        s1, s2 = torch.nn.functional.softplus(r1), torch.nn.functional.softplus(r2)
        mu, nu = m1 + s1 * eps[..., 0], m2 + s2 * eps[..., 1]
        return (dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(0.0, 1.0).log_prob(nu)
                + dist.Normal((mu + nu)[..., None], 1.0).log_prob(y).sum(-1)
                - dist.Normal(m1, s1).log_prob(mu) - dist.Normal(m2, s2).log_prob(nu))

    r = torch.tensor(0.4, dtype=torch.float64).expm1().log()
    params = [torch.tensor(0.2, dtype=torch.float64, requires_grad=True), r.clone().requires_grad_(),
              torch.tensor(0.2, dtype=torch.float64, requires_grad=True), r.clone().requires_grad_()]
    ref = _reference(log_w, params, K, dims=2)
    guide = AutoGuideList(two)
    guide.append(_gaussian_flow(AutoRealNVP, pyro.poutine.block(two, expose=["mu"]), 0.2, 0.4, stl=True))
    guide.append(_gaussian_flow(AutoNICE, pyro.poutine.block(two, hide=["mu"]), 0.2, 0.4, stl=False))
    guide(Y)
    ours = [t for part in guide for t in (part.flow[-1].loc, part.flow[-1].raw_scale)]
    elbo = ImportanceWeightedELBO(K)
    ok, info = _agrees(_grads_of(lambda: elbo.differentiable_loss(two, guide, Y), ours, 400), ref)
    assert ok, info


# ------------------------------------------------------------------ fit_guide's loop
def test_fit_guide_refuses_a_non_finite_gradient_before_the_update():
    # a finite loss whose gradient is NaN: torch.where differentiates both branches, and
    # sqrt of a negative draw gives NaN times 0 for the branch not taken
    from pyro_genext.infer import fit_guide

    def nan_sqrt(mu):  # finite value, NaN derivative at mu < 0
        return torch.where(mu > 0, mu.sqrt(), torch.zeros_like(mu))

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("nu", dist.Normal(0.0, 1.0))
        pyro.factor("f", nan_sqrt(mu))

    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"mu": torch.tensor(-1.0),
                                                                "nu": torch.tensor(0.5)}))
    guide(Y)
    before = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    named = r"gradient is (nan|inf) at step 0.*AutoNormal\.(locs|scales)\.mu"
    with pytest.raises(RuntimeError, match=named) as e:
        fit_guide(model, guide, Y, num_particles=4, progress_bar=False)
    assert ".nu" not in str(e.value)  # only the parameters it reached
    for k, v in pyro.get_param_store().items():  # no update: every parameter as it was
        assert torch.equal(v.detach(), before[k]), k
    # also with clipping off (no norm computed for the clipping)
    with pytest.raises(RuntimeError, match="gradient is"):
        fit_guide(model, guide, Y, num_particles=4, clip_norm=None, progress_bar=False)
    for k, v in pyro.get_param_store().items():
        assert torch.equal(v.detach(), before[k]), k


def test_fit_guide_clips_finite_gradients_whose_norm_overflows_float32():
    # each gradient 1e20 is finite; their float32 norm (sqrt of 2e40) is inf. Found on
    # posteriordb's bball_drive_event_0 (AutoNICE at step 41, loss 2.5e19): the old check
    # refused the step naming no parameter; the norm in float64 is finite and clips
    from pyro_genext.infer import fit_guide

    def model():
        a = pyro.param("a", torch.tensor(0.0))
        b = pyro.param("b", torch.tensor(0.0))
        pyro.factor("f", 1e20 * (a + b))

    def guide():
        pass

    result = fit_guide(model, guide, num_steps=1, lr=0.1, progress_bar=False)
    assert result.num_steps == 1
    store = pyro.get_param_store()
    for name in "ab":  # Adam's first step: lr in the gradient's direction
        assert float(store[name].detach()) == pytest.approx(0.1, rel=1e-4), name


def test_fit_guide_learning_rate_never_falls_below_its_floor():
    from pyro_genext.infer import fit_guide

    # at the exact posterior from the start: plateaus, so cuts of the rate; after a cut the
    # exponential decay continued below lr * final_lr (to 0.69-0.83x of it)
    exact = AutoNormal(iid, init_loc_fn=init_to_value(values={"mu": Y.sum() / 5}), init_scale=math.sqrt(0.2))
    result = fit_guide(iid, exact, Y, num_steps=2000, lr=0.01, final_lr=0.1, patience=2, progress_bar=False)
    assert len(result.learning_rates) == result.num_steps
    assert result.learning_rates[0] == 0.01
    assert min(result.learning_rates) >= 0.001 * (1 - 1e-9), min(result.learning_rates)
    assert result.stopped_early and result.learning_rates[-1] == pytest.approx(0.001)
    # without cuts the schedule is the exponential decay itself
    pyro.clear_param_store()
    far = AutoNormal(iid)
    plain = fit_guide(iid, far, Y, num_steps=200, lr=0.01, final_lr=0.1, stop_on_plateau=False,
                      progress_bar=False)
    assert plain.learning_rates == pytest.approx([0.01 * 0.1 ** (i / 200) for i in range(200)], rel=1e-6)


def test_dreg_does_not_depend_on_the_guide_registering_its_parameters_each_call():
    # fit_guide registers a flow guide's parameters once (its first evaluation), not at
    # every step; the bound's choice of DReG for an stl guide must not read it from the
    # parameters the call registered (it did: IWAE's biased gradient, silently, in every
    # importance-weighted fit_guide step after the first)
    def model():
        pyro.sample("x", dist.Normal(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.0])).to_event(1))

    guide = AutoRealNVP(model, num_layers=2, init_coupling_scale=0.1)
    loss_fn = ImportanceWeightedELBO(8)(model, guide)
    loss_fn()  # builds the guide's parameters

    def gradient(register):
        guide._register_params = register
        pyro.set_rng_seed(1)
        for p in guide.parameters():
            p.grad = None
        loss_fn().backward()
        return torch.cat([p.grad.reshape(-1) for p in guide.parameters()])

    assert torch.allclose(gradient(False), gradient(True), rtol=1e-6, atol=1e-8)
    guide._register_params = True


def test_fit_result_repr_is_short():
    from pyro_genext.infer import fit_guide

    result = fit_guide(iid, AutoNormal(iid), Y, num_steps=1000, stop_on_plateau=False, progress_bar=False)
    text = repr(result)
    assert len(text) < 200, text[:300]
    for part in ("num_steps=1000", "stopped_early=False", "final_loss=", "seconds="):
        assert part in text, text[:300]
    final = sum(result.losses[-result.window:]) / result.window
    assert f"final_loss={final:.4g}" in text


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal])
def test_fit_guide_does_not_stop_while_the_loss_falls_by_more_than_its_noise(guide_class):
    # the loss falls steadily by ~0.6 per window of 30 steps (mu creeps from -20 at a
    # constant rate 2e-4) under noise of sd ~4.3 per step (the guide's draws and a factor
    # of pure noise), so ~0.8 per window mean; the rule that compared each window with
    # the best earlier one stopped it at step 150 (a window had to beat a minimum of noisy
    # means by 2 se of a difference); the trend over 8 windows shows the fall
    from pyro_genext.infer import fit_guide

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("obs", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        pyro.factor("noise", 2.0 * math.sqrt(8) * torch.randn(mu.shape))  # no gradient

    guide = guide_class(model, init_loc_fn=init_to_value(values={"mu": torch.tensor(-20.0)}), init_scale=0.1)
    result = fit_guide(model, guide, Y, num_steps=1500, lr=2e-4, final_lr=1.0, window=30, progress_bar=False)
    fall = (result.window_means[0] - result.window_means[-1]) / (len(result.window_means) - 1)
    assert 0.4 < fall < 0.8, fall  # what the test is about: a steady fall of ~0.6 per window
    assert not result.stopped_early and result.num_steps == 1500


def test_importance_weighted_training_survives_eight_schools():
    # From the guide's initial spread, K = 10 importance-weighted steps put draws in the
    # funnel's neck, where every weight vanishes and no gradient pulls them back: log tau's
    # lower tail ran to -22..-33 and Pyro raised "scale ... GreaterThan(0)" within 9-46
    # steps in all three seeds. A quarter of the steps by the ELBO first (the default
    # warmup) draws the guide onto the posterior, and the bound then refines it.
    from pyro_genext.infer import fit_guide
    from pyro_genext.infer.targets import eight_schools

    t = eight_schools()
    for seed in range(3):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = AutoRealNVP(t.model)
        result = fit_guide(t.model, guide, *t.args, num_steps=200, objective="iwae", num_particles=10,
                           stop_on_plateau=False, progress_bar=False)
        assert result.num_steps == 200 and all(math.isfinite(v) for v in result.losses)
    # without the warmup it fails, and says why, before any non-finite update
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = AutoRealNVP(t.model)
    refused = r"fit_guide: (the model or guide failed|the gradient is nan|the loss is nan) at step \d+.*" \
              r"warmup"
    with pytest.raises(RuntimeError, match=refused):
        fit_guide(t.model, guide, *t.args, num_steps=200, objective="iwae", num_particles=10, warmup=0,
                  stop_on_plateau=False, progress_bar=False)
    assert all(p.isfinite().all() for p in guide.parameters())


@pytest.mark.parametrize("kwargs", [dict(warmup=-1, objective="iwae"), dict(warmup=4001, objective="iwae"),
                                    dict(warmup=2.0, objective="iwae"), dict(warmup=10, objective="elbo")])
def test_fit_guide_bad_warmup(kwargs):
    from pyro_genext.infer import fit_guide

    guide = AutoNormal(iid)
    with pytest.raises(ValueError, match="expected warmup"):
        fit_guide(iid, guide, Y, num_steps=4000, progress_bar=False, **kwargs)
    assert guide.prototype_trace is None
