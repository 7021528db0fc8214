"""Diagnostics against exact answers: the evidence of a conjugate model, k-hat of guides
known to be good or bad, importance resampling, and the ArviZ export."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_value

from pyro_genext.diagnostics import (
    diagnose,
    importance_resample,
    importance_samples,
    log_evidence,
    pareto_khat,
    pareto_khat_sd,
    to_inference_data,
)
from pyro_genext.infer import AutoRealNVP

Y = torch.tensor([0.3, 1.2, 0.8, 1.9, 0.4])
N = len(Y)
POST_VAR = 1.0 / (N + 1)  # mu ~ N(0, 1), y_i ~ N(mu, 1)
POST_MEAN = float(Y.sum()) * POST_VAR


def conjugate(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def exact_log_evidence():
    cov = torch.eye(N, dtype=torch.float64) + 1.0
    return float(dist.MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov).log_prob(Y.double()))


def gaussian_guide(shift=0.0, stretch=1.0):
    pyro.clear_param_store()  # each guide its own parameters (they share a name)
    init = init_to_value(values={"mu": torch.tensor(POST_MEAN + shift)})
    return AutoDiagonalNormal(conjugate, init_loc_fn=init, init_scale=stretch * math.sqrt(POST_VAR))


@pytest.mark.parametrize("shift,stretch", [(0.2, 1.3), (0.0, 0.8), (-0.3, 1.0)])
def test_log_evidence_within_three_standard_errors_of_exact(shift, stretch):
    est = log_evidence(conjugate, gaussian_guide(shift, stretch), Y, num_samples=4000)
    exact = exact_log_evidence()
    assert 0 < est.stderr < 0.05
    assert abs(est.value - exact) < 3 * est.stderr, (est, exact)


def test_log_evidence_is_exact_for_the_exact_posterior():
    est = log_evidence(conjugate, gaussian_guide(), Y, num_samples=50)
    assert abs(est.value - exact_log_evidence()) < 1e-4 and est.stderr < 1e-4


def test_log_weights_are_log_p_minus_log_q():
    guide = gaussian_guide(0.2, 1.3)
    s = importance_samples(conjugate, guide, Y, num_samples=7, max_simultaneous=3)
    assert s.log_p.shape == s.log_q.shape == (7,) and s.draws["mu"].shape == (7,)
    mu = s.draws["mu"]
    log_p = dist.Normal(0.0, 1.0).log_prob(mu) + dist.Normal(mu[:, None], 1.0).log_prob(Y).sum(-1)
    q = dist.Normal(POST_MEAN + 0.2, 1.3 * math.sqrt(POST_VAR))
    assert torch.allclose(s.log_p, log_p, atol=1e-4)
    assert torch.allclose(s.log_q, q.log_prob(mu), atol=1e-4)


def test_khat_separates_good_and_bad_guides():
    def khat(shift, stretch):
        guide = gaussian_guide(shift, stretch)
        return pareto_khat(importance_samples(conjugate, guide, Y, num_samples=2000).log_weights)

    good, bad = khat(0.05, 1.2), khat(0.3, 0.4)
    assert good < 0.5 < 0.7 < bad, (good, bad)


def test_importance_resample_moves_the_mean_to_the_posterior():
    guide = gaussian_guide(0.25, 1.5)
    r = importance_resample(conjugate, guide, Y, num_samples=4000, num_draws=3000)
    assert r.draws["mu"].shape == (3000,) and math.isclose(float(r.weights.sum()), 1.0, rel_tol=1e-6)
    assert 100 < r.ess < 4000 and r.khat < 0.7
    sd = math.sqrt(POST_VAR)
    assert abs(float(r.weighted["mu"].mean()) - POST_MEAN) > 0.2  # the guide's own mean is off
    assert abs(float(r.mean()["mu"]) - POST_MEAN) < 0.05
    assert abs(float(r.draws["mu"].mean()) - POST_MEAN) < 0.06
    assert abs(float(r.draws["mu"].std()) - sd) < 0.05


def schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("school", len(sigma)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.deterministic("shifted", theta + w.sum(-1))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def test_to_inference_data_names_dims_and_groups():
    az = pytest.importorskip("arviz")
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0])
    y = torch.tensor([28.0, 8.0, -3.0, 7.0])
    guide = AutoRealNVP(schools, num_layers=2, hidden_dims=(8,))
    idata = to_inference_data(schools, guide, sigma, y, num_samples=200, posterior_predictive=True)
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "tau", "w", "theta", "shifted"}
    assert post["theta"].dims == ("chain", "draw", "school") and post["theta"].shape == (4, 50, 4)
    assert post["shifted"].dims == ("chain", "draw", "school")
    assert post["w"].dims == ("chain", "draw", "w_dim_0") and post["mu"].shape == (4, 50)
    assert (post["tau"] > 0).all()  # constrained values
    assert idata.observed_data["obs"].dims == ("school",)
    assert (idata.observed_data["obs"].values == y.numpy()).all()
    assert idata.posterior_predictive["obs"].shape == (4, 50, 4)
    # replicates vary around theta, not copies of the data
    assert idata.posterior_predictive["obs"].std() > 5
    stats = idata.sample_stats
    lw = stats["log_p"] - stats["log_q"]
    assert abs(lw - stats["log_weight"]).max() < 1e-4
    summary = az.summary(idata, var_names=["mu", "tau"])
    assert list(summary.index) == ["mu", "tau"]


def test_diagnose_prints_and_judges(capsys):
    good = diagnose(conjugate, gaussian_guide(0.05, 1.2), Y, num_samples=2000)
    out = capsys.readouterr().out
    assert "k-hat" in out and "verdict" in out and good.verdict.startswith("good")
    assert good.elbo < good.log_evidence
    assert abs(good.log_evidence - exact_log_evidence()) < 3 * good.log_evidence_stderr + 1e-3
    assert 1000 < good.ess <= 2000
    bad = diagnose(conjugate, gaussian_guide(0.3, 0.4), Y, num_samples=2000, verbose=False)
    assert bad.verdict.startswith("not reliable") and bad.ess < good.ess


def test_a_guide_equal_to_the_posterior_is_judged_good():
    # every weight equal: the Pareto fit of their tail gives k-hat = inf, which read alone
    # said "not reliable: the guide misses posterior mass" of an exact guide
    def prior_only():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    exact = AutoNormal(prior_only, init_loc_fn=init_to_value(values={"x": torch.zeros(3)}), init_scale=1.0)
    d = diagnose(prior_only, exact, num_samples=1000, verbose=False)
    assert not d.khat < 0.7  # what k-hat says of equal weights
    assert d.verdict.startswith("good: every importance weight is within a factor 1 ")
    assert d.ess == pytest.approx(1000)
    # and weights that vary by more than a factor 2 are judged by k-hat as before
    wide = diagnose(conjugate, gaussian_guide(0.3, 0.4), Y, num_samples=2000, verbose=False)
    assert wide.verdict.startswith("not reliable")


def test_bad_input():
    with pytest.raises(ValueError, match="num_samples to be an integer >= 2"):
        log_evidence(conjugate, AutoNormal(conjugate), Y, num_samples=1)


def test_to_inference_data_in_chunks_with_posterior_predictive():
    # max_simultaneous is for the importance sampler, not for the model (issue 15)
    guide = gaussian_guide()
    idata = to_inference_data(conjugate, guide, Y, num_samples=60, max_simultaneous=25,
                              posterior_predictive=True)
    assert idata.posterior["mu"].shape == (4, 15)
    assert idata.posterior_predictive["y"].shape == (4, 15, N)


def not_vectorised(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        # right for one draw; under an outer plate of draws, mu has shape (N, 1) and the
        # unsqueeze puts the draws where no plate is (Pyro: "Invalid tensor shape")
        pyro.sample("y", dist.Normal(mu.unsqueeze(-1), 1.0), obs=y)


def test_non_vectorised_model_gets_a_message_stating_the_requirement():
    guide = AutoNormal(not_vectorised)
    with pytest.raises(ValueError, match="vectoris"):
        diagnose(not_vectorised, guide, Y, num_samples=100, verbose=False)


def test_an_error_of_the_model_itself_is_not_blamed_on_vectorisation():
    # NaN data fail on one draw as on many: the model's own error, whole, and not the
    # message for non-vectorised models (which cut it to "Error while computing log_prob")
    bad = Y.clone()
    bad[1] = math.nan
    with pytest.raises(ValueError, match="nan") as info:
        diagnose(conjugate, gaussian_guide(), bad, num_samples=100, verbose=False)
    assert "vectoris" not in str(info.value)


# ------------------------------------------------ on an accelerator (issue 22)
def refuse_implicit_host_copies(monkeypatch):
    """Make every tensor behave, as far as numpy goes, like one on an accelerator:
    ``Tensor.numpy`` (and so ``np.asarray(tensor)``) refuses a tensor that did not come
    straight out of ``.cpu()`` or ``.to("cpu", ...)``, as torch refuses a cuda tensor
    ("can't convert cuda:0 device type tensor to numpy"). A CPU-only build cannot make
    cuda tensors that Pyro runs on (``FakeTensorMode`` has no values, and Pyro's validation
    and ArviZ need them), so this is how a CPU test sees a missing host copy."""
    numpy, cpu, to = torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.to

    def host_copy(t):
        t = t.view_as(t)  # a new tensor object: the one copied from stays "on the device"
        t._host_copy = True
        return t

    def checked_numpy(self, *args, **kwargs):
        if not getattr(self, "_host_copy", False):
            raise TypeError("can't convert cuda:0 device type tensor to numpy "
                            "(simulated: no .cpu() before .numpy())")
        return numpy(self, *args, **kwargs)

    def checked_to(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        target = args[0] if args and isinstance(args[0], (str, torch.device)) else kwargs.get("device")
        return host_copy(out) if target is not None and torch.device(target).type == "cpu" else out

    monkeypatch.setattr(torch.Tensor, "numpy", checked_numpy)
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: host_copy(cpu(self, *a, **k)))
    monkeypatch.setattr(torch.Tensor, "to", checked_to)
    with pytest.raises(TypeError, match="cuda"):  # the check itself works
        torch.zeros(2).double().numpy()
    assert torch.zeros(2).cpu().numpy().shape == (2,)


def _every_public_function(seed):
    """Each public function of diagnostics on the conjugate model, each from ``seed``."""
    guide = gaussian_guide(0.2, 1.3)
    out = {}
    pyro.set_rng_seed(seed)
    s = importance_samples(conjugate, guide, Y, num_samples=300)
    out["log_weights"] = s.log_weights
    out["khat"] = pareto_khat(s.log_weights)
    pyro.set_rng_seed(seed)
    out["log_evidence"] = log_evidence(conjugate, guide, Y, num_samples=300)
    pyro.set_rng_seed(seed)
    r = importance_resample(conjugate, guide, Y, num_samples=300, num_draws=100)
    assert r.weights.device == r.draws["mu"].device == r.weighted["mu"].device == Y.device
    out["resample"] = (r.weights, r.draws["mu"], r.mean()["mu"], r.ess, r.khat)
    pyro.set_rng_seed(seed)
    d = diagnose(conjugate, guide, Y, num_samples=300, verbose=False)
    out["diagnose"] = (d.elbo, d.log_evidence, d.khat, d.ess)
    pyro.set_rng_seed(seed)
    idata = to_inference_data(conjugate, guide, Y, num_samples=300, max_simultaneous=200,
                              posterior_predictive=True)
    out["idata"] = (idata.posterior["mu"].values, idata.posterior_predictive["y"].values,
                    idata.sample_stats["log_weight"].values)
    return out


def test_every_public_function_works_without_implicit_host_copies(monkeypatch):
    """Issue 22: ``diagnose`` on cuda data failed in the PSIS step (``lw.double().numpy()``);
    so would ``importance_resample`` and ``pareto_khat`` of device weights. Each must make
    its host copies explicitly, and give the same figures as without the check (so the
    check ran the real computation)."""
    plain = _every_public_function(seed=3)
    refuse_implicit_host_copies(monkeypatch)
    checked = _every_public_function(seed=3)
    assert plain["khat"] == plain["diagnose"][2] == plain["resample"][4] < 0.7
    for key, a in plain.items():
        b = checked[key]
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            same = torch.equal(x, y) if isinstance(x, torch.Tensor) else np.array_equal(x, y)
            assert same, key


# ------------------------------------------------ R-hat, weighted moments (issue 23)
def test_rhat_of_the_exported_draws_is_defined_and_one():
    """One chain made ``az.summary`` report R-hat NaN with a shape warning; the draws are now
    split into chains, and for independent draws R-hat is 1 up to noise."""
    az = pytest.importorskip("arviz")
    idata = to_inference_data(conjugate, gaussian_guide(0.3, 0.8), Y, num_samples=1000)
    assert idata.posterior["mu"].shape == (4, 250)
    assert idata.sample_stats["log_weight"].shape == (4, 250)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = az.summary(idata, var_names=["mu"])
    rhat, ess = float(summary.loc["mu", "r_hat"]), float(summary.loc["mu", "ess_bulk"])
    # one chain of 1000 (the old layout): r_hat NaN. 100 seeds of this: 0.997 to 1.008
    assert abs(rhat - 1) < 0.01 and 700 < ess < 1300, summary
    # the draws in order: chain c holds draws c * 250 .. (c + 1) * 250 - 1 of one sample
    pyro.set_rng_seed(5)
    idata = to_inference_data(conjugate, gaussian_guide(), Y, num_samples=12, num_chains=3)
    pyro.set_rng_seed(5)
    s = importance_samples(conjugate, gaussian_guide(), Y, num_samples=12)
    assert np.array_equal(idata.posterior["mu"].values, s.draws["mu"].numpy().reshape(3, 4))
    with pytest.raises(ValueError, match="multiple of num_chains=4.*got 10"):
        to_inference_data(conjugate, gaussian_guide(), Y, num_samples=10)
    with pytest.raises(ValueError, match="num_chains to be an integer >= 1"):
        to_inference_data(conjugate, gaussian_guide(), Y, num_samples=10, num_chains=0)


def test_weighted_sd_and_quantiles_match_an_independent_computation():
    """``sd`` and ``quantiles`` of :class:`ResampledPosterior` against NumPy's weighted
    covariance and weighted inverse-CDF quantiles, on a scalar and a vector site."""
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0])
    y = torch.tensor([28.0, 8.0, -3.0, 7.0])
    r = importance_resample(schools, AutoNormal(schools, init_scale=0.5), sigma, y, num_samples=500)
    w = r.weights.numpy()
    probs = [0.0, 0.05, 0.5, 0.95, 1.0]
    sd, q = r.sd(), r.quantiles(probs)
    for name in ["mu", "tau", "theta", "w"]:
        x = r.weighted[name].double().numpy().reshape(500, -1)
        for j in range(x.shape[1]):
            var = np.cov(x[:, j], aweights=w, bias=True)
            assert math.isclose(sd[name].reshape(-1)[j], math.sqrt(var), rel_tol=1e-4), name
            expected = np.quantile(x[:, j], probs, weights=w, method="inverted_cdf")
            assert np.allclose(q[name].reshape(len(probs), -1)[:, j].double().numpy(), expected,
                               rtol=1e-6), (name, j)
        assert q[name].shape == (len(probs),) + r.weighted[name].shape[1:]
    # a draw of weight 0 is not a quantile: the smallest draws of mu weighted 0 (PSIS
    # weights of a fitted guide are never exactly 0, so set them); the 0-quantile is the
    # smallest draw of positive weight, as NumPy's
    x = r.weighted["mu"].double().numpy()
    w0 = w.copy()
    w0[np.argsort(x)[:3]] = 0.0
    r.weights = torch.tensor(w0 / w0.sum(), dtype=r.weights.dtype)
    expected = np.quantile(x, probs, weights=w0 / w0.sum(), method="inverted_cdf")
    assert np.allclose(r.quantiles(probs)["mu"].double().numpy(), expected, rtol=1e-6)
    assert r.quantiles([0.0])["mu"] > np.sort(x)[2]
    for bad in [[], [1.5], "0.5", 0.5, [True]]:
        with pytest.raises(ValueError, match="probs"):
            r.quantiles(bad)


def test_weighted_sd_and_quantiles_move_to_the_exact_posterior():
    guide = gaussian_guide(0.25, 1.5)
    r = importance_resample(conjugate, guide, Y, num_samples=4000)
    sd = math.sqrt(POST_VAR)
    assert abs(float(r.weighted["mu"].std()) - sd) > 0.15  # the guide's own sd is off
    assert abs(float(r.sd()["mu"]) - sd) < 0.03
    exact = torch.distributions.Normal(POST_MEAN, sd).icdf(torch.tensor([0.05, 0.5, 0.95]))
    assert torch.allclose(r.quantiles([0.05, 0.5, 0.95])["mu"], exact, atol=0.06)


def test_khat_sd_estimates_how_far_khat_moves_between_seeds():
    """k-hat's own noise: the bootstrap standard deviation of one set of draws against the
    standard deviation of k-hat over 40 independent sets (a guide with k-hat near 0.6)."""
    guide = gaussian_guide(0.3 * math.sqrt(POST_VAR), 0.6)
    ks, sds = [], []
    for seed in range(40):
        pyro.set_rng_seed(seed)
        lw = importance_samples(conjugate, guide, Y, num_samples=1000).log_weights
        ks.append(pareto_khat(lw))
        if seed < 5:
            sds.append(pareto_khat_sd(lw))
    spread = float(np.std(ks, ddof=1))
    assert 0.4 < float(np.mean(ks)) < 0.8 and 0.05 < spread < 0.3, (np.mean(ks), spread)
    assert 0.6 < float(np.mean(sds)) / spread < 1.6, (sds, spread)
    assert pareto_khat_sd(lw) == pareto_khat_sd(lw.numpy())  # a function of the weights
    d = diagnose(conjugate, guide, Y, num_samples=1000, verbose=False)
    assert 0.05 < d.khat_sd < 0.3 and f"+- {d.khat_sd:.2f}" in str(d)
    r = importance_resample(conjugate, guide, Y, num_samples=1000)
    assert 0.05 < r.khat_sd < 0.3
    with pytest.raises(ValueError, match="num_resamples"):
        pareto_khat_sd(lw, num_resamples=1)
