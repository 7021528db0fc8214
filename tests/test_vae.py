"""The VAE: shapes, the ELBO against hand formulas and exact answers, IWAE, flow posteriors,
the linear VAE against PCA, Pyro interop and input checks.

Independent answers used here: for a *linear* Gaussian VAE, x = W z + c + s * eps, the
marginal log p(x) = log N(x; c, W W^T + s^2 I) and the ELBO of a diagonal Gaussian guide
are both in closed form; a flow posterior's density is checked against the change of
variables with an autograd Jacobian; the PCA subspace comes from numpy's SVD.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_genext.data import load_dataset
from pyro_genext.models import VAE, ImportanceWeightedELBO


def perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every parameter off its (often zero) initial value."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def linear_gaussian(d: int = 6, z: int = 2, sigma: float | None = 0.7) -> VAE:
    vae = VAE(d, z, hidden_dims=(), likelihood="gaussian", sigma=sigma)
    perturb(vae)
    return vae


def exact_log_px(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """log N(x; c, W W^T + s^2 I) of the linear Gaussian VAE."""
    lin = vae.decoder.head[0]
    w, c = lin.weight.detach(), lin.bias.detach()
    s2 = float(vae.sigma) ** 2
    cov = w @ w.T + s2 * torch.eye(w.shape[0])
    return torch.distributions.MultivariateNormal(c, cov).log_prob(x)


def exact_elbo(vae: VAE, x: torch.Tensor) -> torch.Tensor:
    """The linear Gaussian VAE's ELBO in closed form: E_q||x - W z - c||^2 is
    ||x - W mu - c||^2 + sum_j |W_j|^2 sigma_j^2, and the KL is the textbook formula."""
    lin = vae.decoder.head[0]
    w, c = lin.weight.detach(), lin.bias.detach()
    s2 = float(vae.sigma) ** 2
    with torch.no_grad():
        mu, sd, _ = vae.encoder(x)
    d = x.shape[-1]
    sq = ((x - mu @ w.T - c) ** 2).sum(-1) + (sd**2 @ (w**2).sum(0))
    recon = -sq / (2 * s2) - 0.5 * d * math.log(2 * math.pi * s2)
    kl = 0.5 * (sd**2 + mu**2 - torch.log(sd**2) - 1).sum(-1)
    return recon - kl


# ----------------------------------------------------------------------------- shapes
CASES = [
    pytest.param(7, "mlp", None, id="vector-mlp"),
    pytest.param((7,), "mlp", "nice", id="vector-mlp-nice"),
    pytest.param((1, 8, 8), "mlp", "realnvp", id="image-mlp-realnvp"),
    pytest.param((1, 8, 8), "conv", None, id="image-conv"),
    pytest.param((3, 5, 7), "conv", "realnvp", id="odd-image-conv-realnvp"),
]


@pytest.mark.parametrize("shape, encoder, flow", CASES)
def test_shapes(shape, encoder, flow):
    vae = VAE(shape, 3, hidden_dims=(16,), encoder=encoder, posterior_flow=flow, num_flows=2,
              flow_hidden_dims=(8,))
    event = (shape,) if isinstance(shape, int) else shape
    x = torch.rand((5, *event)).bernoulli()
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    assert guide.nodes["z"]["value"].shape == (5, 3)
    assert model.nodes["x"]["fn"].batch_shape == (5,)
    assert model.nodes["x"]["fn"].event_shape == event
    assert vae.reconstruct(x).shape == x.shape
    assert vae.encode(x).shape == (5, 3)
    assert vae.sample(4).shape == (4, *event)
    assert vae.sample(4, mean=True).shape == (4, *event)
    assert vae.interpolate(x[0], x[1], steps=6).shape == (6, *event)
    assert vae.interpolate(x[:2], x[2:4], steps=3).shape == (3, 2, *event)
    assert vae.elbo(x).shape == (5,)
    assert vae.iwae_log_likelihood(x, num_samples=4).shape == (5,)
    assert vae.posterior(x).log_prob(guide.nodes["z"]["value"]).shape == (5,)
    # the decoder broadcasts over leading particle dimensions (vectorised IWAE)
    assert vae.likelihood_dist(torch.randn(2, 5, 3)).batch_shape == (2, 5)


def test_linear_and_sample_values():
    vae = VAE(6, 2, hidden_dims=())
    assert [type(m).__name__ for m in vae.decoder.head] == ["Linear"]
    assert [type(m).__name__ for m in vae.encoder.body] == []
    s = vae.sample(50)
    assert set(s.unique().tolist()) <= {0.0, 1.0}  # Bernoulli draws
    m = vae.sample(50, mean=True)
    assert bool(((m > 0) & (m < 1)).all())  # probabilities


# ----------------------------------------------------------------------------- training
def binarised_digits(split: str, n: int | None = None) -> torch.Tensor:
    data = load_dataset("digits", split)
    x = data.x.reshape(len(data), -1) / (data.levels - 1)
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(x, generator=g)
    return x if n is None else x[:n]


@pytest.mark.parametrize("flow", [None, "realnvp"])
def test_training_improves_heldout_elbo_and_trains_every_parameter(flow):
    x_train, x_val = binarised_digits("train"), binarised_digits("val")
    vae = VAE(64, 4, hidden_dims=(64,), posterior_flow=flow, num_flows=2, flow_hidden_dims=(16,))
    before = {k: p.detach().clone() for k, p in vae.named_parameters()}
    torch.manual_seed(0)
    start = float(vae.elbo(x_val, num_particles=4).mean())
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), TraceMeanField_ELBO())
    for _ in range(150):
        idx = torch.randint(0, len(x_train), (64,))
        svi.step(x_train[idx], size=len(x_train))
    torch.manual_seed(0)
    end = float(vae.elbo(x_val, num_particles=4).mean())
    assert end > start + 5, (start, end)
    unchanged = [k for k, p in vae.named_parameters() if torch.equal(p, before[k])]
    assert not unchanged, f"SVI never moved {unchanged}"
    if flow is not None:
        assert any(k.startswith("flow.") for k in before)


def test_size_scales_minibatch_unbiasedly():
    vae = VAE(6, 2, hidden_dims=(8,))
    x = torch.rand(4, 6).bernoulli()
    loss = TraceMeanField_ELBO().differentiable_loss
    pyro.set_rng_seed(3)
    batch = loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    scaled = loss(vae.model, vae.guide, x, size=40)
    assert torch.allclose(scaled, 10 * batch)
    with pytest.raises(ValueError, match="size"):
        vae.model(x, size=3)


# ----------------------------------------------------------------------------- the ELBO
def test_meanfield_loss_is_the_hand_formula_with_the_same_draw():
    sigma = 0.5
    vae = VAE(6, 3, hidden_dims=(8,), likelihood="gaussian", sigma=sigma)
    perturb(vae)
    x = torch.randn(5, 6)
    pyro.set_rng_seed(11)
    loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(11)  # the guide is the only random step: the same z again
    z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"].detach()
    with torch.no_grad():
        mu, sd, _ = vae.encoder(x)
        f = vae.decoder(z)
    d = x.shape[-1]
    recon = -((x - f) ** 2).sum(-1) / (2 * sigma**2) - 0.5 * d * math.log(2 * math.pi * sigma**2)
    kl = 0.5 * (sd**2 + mu**2 - torch.log(sd**2) - 1).sum(-1)
    hand = float((recon - kl).sum())
    assert loss == pytest.approx(-hand, rel=1e-5)
    # the formula really depends on z: another draw gives another number
    pyro.set_rng_seed(12)
    assert TraceMeanField_ELBO().loss(vae.model, vae.guide, x) != pytest.approx(loss, rel=1e-3)


def test_trace_elbo_and_elbo_method_agree_with_the_closed_form_in_expectation():
    vae = linear_gaussian()
    x = torch.randn(8, 6)
    exact = float(exact_elbo(vae, x).sum())
    m = 300
    losses = torch.tensor([Trace_ELBO().loss(vae.model, vae.guide, x) for _ in range(m)])
    se = float(losses.std()) / math.sqrt(m)
    assert abs(-float(losses.mean()) - exact) < 4 * se + 1e-3, (float(losses.mean()), exact, se)
    # TraceMeanField_ELBO: the same expectation with less noise
    tmf = torch.tensor([TraceMeanField_ELBO().loss(vae.model, vae.guide, x) for _ in range(m)])
    assert float(tmf.std()) < float(losses.std())
    assert abs(-float(tmf.mean()) - exact) < 4 * float(tmf.std()) / math.sqrt(m) + 1e-3
    # the per-example method
    per = vae.elbo(x, num_particles=4000)
    with torch.no_grad():
        se_per = vae.log_weights(x, 4000).std(0) / math.sqrt(4000)
    assert bool(((per - exact_elbo(vae, x)).abs() < 4 * se_per).all())


# ----------------------------------------------------------------------------- IWAE
def mean_field_posterior(vae: VAE) -> None:
    """Set the linear encoder to the best diagonal Gaussian of the linear Gaussian VAE:
    the exact posterior mean M^-1 W^T (x - c), M = W^T W + s^2 I, and the variances
    1 / diag of the posterior precision M / s^2. Its gap is the KL of the ignored
    correlations."""
    lin = vae.decoder.head[0]
    w, c = lin.weight.detach(), lin.bias.detach()
    s2 = float(vae.sigma) ** 2
    m = w.T @ w + s2 * torch.eye(w.shape[1])
    a = torch.linalg.solve(m, w.T)
    sd = (s2 / torch.diagonal(m)).sqrt()
    with torch.no_grad():
        vae.encoder.loc.weight.copy_(a)
        vae.encoder.loc.bias.copy_(-a @ c)
        vae.encoder.scale.weight.zero_()
        vae.encoder.scale.bias.copy_(torch.log(torch.expm1(sd - 1e-5)))


def test_iwae_rises_with_k_towards_the_exact_log_likelihood():
    vae = linear_gaussian(d=5, z=2, sigma=0.5)
    with torch.no_grad():  # correlated columns: a correlated posterior, a real mean-field gap
        w = vae.decoder.head[0].weight
        w[:, 1] = w[:, 0] + 0.2 * torch.randn(5)
    mean_field_posterior(vae)
    x = torch.randn(20, 5)
    exact = exact_log_px(vae, x)
    elbo = exact_elbo(vae, x)
    assert bool((elbo < exact).all())  # the ELBO is a lower bound: the gap is KL(q || p(z|x))
    gap = float((exact - elbo).mean())
    assert gap > 0.1  # the test has a gap to close
    # K = 1 is the ELBO, in expectation
    one = vae.iwae_log_likelihood(x.repeat(50, 1), num_samples=1)
    assert abs(float(one.mean()) - float(elbo.mean())) < 4 * float(one.std()) / math.sqrt(len(one))
    means = {}
    for k in (1, 10, 100, 5000):
        torch.manual_seed(1)
        means[k] = float(vae.iwae_log_likelihood(x, num_samples=k, chunk_size=700).mean())
    assert means[1] < means[10] < means[100] < means[5000]
    assert float(exact.mean()) - means[5000] < 0.1 * gap  # measured: 0.066 of the gap left
    assert means[5000] < float(exact.mean()) + 0.01


def test_iwae_chunks_combine_exactly():
    vae = linear_gaussian(d=5, z=2)
    x = torch.randn(6, 5)
    table = torch.randn(64, 6) * 5
    for chunk in (64, 5, 1):
        pos = [0]

        def fake(x_, num_samples=1, pos=pos):
            out = table[pos[0] : pos[0] + num_samples]
            pos[0] += num_samples
            return out

        vae.log_weights = fake  # the chunks consume the table in order
        got = vae.iwae_log_likelihood(x, num_samples=64, chunk_size=chunk)
        assert pos[0] == 64
        assert torch.allclose(got, torch.logsumexp(table, 0) - math.log(64), atol=1e-5), chunk


def test_importance_weighted_elbo_matches_renyi_and_is_unbiased_for_minibatches():
    vae = VAE(6, 2, hidden_dims=(8,), posterior_flow="nice", num_flows=2, flow_hidden_dims=(8,))
    perturb(vae)
    x = torch.rand(4, 6).bernoulli()
    ours = ImportanceWeightedELBO(num_particles=7, vectorize_particles=False)  # as RenyiELBO
    pyro.set_rng_seed(5)
    a = ours.loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(5)
    b = RenyiELBO(alpha=0, num_particles=7).loss(vae.model, vae.guide, x)
    assert a == pytest.approx(b, rel=1e-5)
    pyro.set_rng_seed(5)
    v = ImportanceWeightedELBO(num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    assert torch.isfinite(v.differentiable_loss(vae.model, vae.guide, x))
    # a minibatch of a data set 3x its size: our loss scales by 3, Renyi's weights change
    pyro.set_rng_seed(5)
    assert ours.loss(vae.model, vae.guide, x, size=12) == pytest.approx(3 * a, rel=1e-5)
    pyro.set_rng_seed(5)
    assert RenyiELBO(alpha=0, num_particles=7).loss(vae.model, vae.guide, x, size=12) != pytest.approx(
        3 * a, rel=1e-3
    )
    # one particle is the ELBO
    pyro.set_rng_seed(6)
    one = ImportanceWeightedELBO(num_particles=1, vectorize_particles=False).differentiable_loss(
        vae.model, vae.guide, x)
    pyro.set_rng_seed(6)
    assert torch.allclose(one, Trace_ELBO().differentiable_loss(vae.model, vae.guide, x), rtol=1e-5)


def test_iwae_training_with_svi():
    vae = VAE(6, 2, hidden_dims=(8,))
    x = torch.rand(16, 6).bernoulli()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}),
              ImportanceWeightedELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1))
    losses = [svi.step(x) for _ in range(60)]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


# ----------------------------------------------------------------------------- flow posterior
@pytest.mark.parametrize("flow", ["nice", "realnvp"])
def test_flow_posterior_log_q_is_the_change_of_variables(flow):
    torch.set_default_dtype(torch.float64)
    vae = VAE(5, 3, hidden_dims=(6,), posterior_flow=flow, num_flows=3, flow_hidden_dims=(7,))
    perturb(vae, 0.5)
    x = torch.rand(4, 5).bernoulli()
    with torch.no_grad():
        mu, sd, h = vae.encoder(x)
    z0 = mu + sd * torch.randn(4, 3)
    brute = []
    for i in range(4):
        t = vae.flow.condition(h[i])
        jac = torch.autograd.functional.jacobian(lambda u, t=t: t(u), z0[i])
        base = torch.distributions.Normal(mu[i], sd[i]).log_prob(z0[i]).sum()
        brute.append(base - torch.linalg.slogdet(jac)[1])
    brute = torch.stack(brute)
    with torch.no_grad():
        z = torch.stack([vae.flow.condition(h[i])(z0[i]) for i in range(4)])
        q = vae.posterior(x)
        assert not torch.allclose(z, z0)  # the flow does something
        assert torch.allclose(q.log_prob(z.clone()), brute, atol=1e-8)  # scoring: inverse pass
    # the sampling path used by elbo() and iwae_log_likelihood(), through the public
    # log_weights: the draws z are read off the decoder's input, and the log-weights must be
    # log p(z) + log p(x | z) - log q(z | x) with log q scored independently by the inverse pass
    seen = []
    handle = vae.decoder.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].detach()))
    try:
        log_w = vae.log_weights(x, 2).detach()
    finally:
        handle.remove()
    zs = seen[0].clone()
    with torch.no_grad():
        log_p = vae.prior(zs.shape[:-1]).log_prob(zs) + vae.likelihood_dist(zs).log_prob(x)
        assert torch.allclose(log_w, log_p - vae.posterior(x).log_prob(zs.clone()), atol=1e-8)


# ----------------------------------------------------------------------------- PCA
def test_linear_gaussian_vae_finds_the_pca_subspace():
    rng = np.random.RandomState(0)
    n, d, k = 400, 8, 2
    basis = np.linalg.qr(rng.randn(d, d))[0]
    data = (rng.randn(n, d) * np.array([3.0, 2.0, 0.6, 0.5, 0.4, 0.3, 0.3, 0.2])) @ basis.T + 1.0
    x = torch.tensor(data, dtype=torch.float32)
    vae = VAE(d, k, hidden_dims=(), likelihood="gaussian")
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.1}), TraceMeanField_ELBO())
    for _ in range(200):
        svi.step(x)
    w = vae.decoder.head[0].weight.detach().double().numpy()

    def max_angle(a: np.ndarray, b: np.ndarray) -> float:
        qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
        cos = np.linalg.svd(qa.T @ qb, compute_uv=False)
        return float(np.degrees(np.arccos(np.clip(cos.min(), -1, 1))))

    _, _, vt = np.linalg.svd(data - data.mean(0), full_matrices=False)
    assert max_angle(w, vt[:k].T) < 5.0
    assert max_angle(w, vt[k : 2 * k].T) > 80.0  # not just any subspace
    # the learned noise level is the probabilistic-PCA one: the mean discarded variance
    eig = np.linalg.svd(data - data.mean(0), compute_uv=False) ** 2 / n
    assert float(vae.sigma) ** 2 == pytest.approx(eig[k:].mean(), rel=0.1)


# ----------------------------------------------------------------------------- interop, checks
def test_predictive():
    vae = VAE(6, 2, hidden_dims=(8,), posterior_flow="realnvp", num_flows=2, flow_hidden_dims=(8,))
    x = torch.rand(5, 6).bernoulli()
    out = Predictive(vae.model, guide=vae.guide, num_samples=3)(x)
    assert out["z"].shape == (3, 5, 2)
    assert out["x"].shape == (3, 5, 6)
    vec = Predictive(vae.model, guide=vae.guide, num_samples=3, parallel=True, return_sites=["z"])(x)
    assert vec["z"].shape[-2:] == (5, 2)


def test_bad_input_fails_before_any_computation():
    vae = VAE(6, 2, hidden_dims=(8,))

    def hook(*_):
        raise AssertionError("the encoder ran on bad input")

    vae.encoder.register_forward_pre_hook(hook)
    vae.decoder.register_forward_pre_hook(hook)
    good = torch.rand(3, 6).bernoulli()
    bad = {
        "NaN": good.clone().index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan"))),
        r"\[0, 1\]": good * 2,
        r"shape .*6\), got \(3, 7\)": torch.rand(3, 7),
    }
    for fn in (vae.model, vae.guide, vae.elbo, vae.iwae_log_likelihood, vae.encode, vae.reconstruct):
        for match, x in bad.items():
            with pytest.raises(ValueError, match=match):
                fn(x)
    with pytest.raises(ValueError, match=r"shape \(N, 6\)"):
        vae.model(good[0])  # one example without the batch dimension
    with pytest.raises(ValueError, match="num_samples"):
        vae.iwae_log_likelihood(good, num_samples=0)
    g = VAE(6, 2, hidden_dims=(8,), likelihood="gaussian", sigma=1.0)
    g.model(good * 5)  # any finite value is in the Gaussian's support
    for kwargs, match in [
        (dict(likelihood="poisson"), "likelihood"),
        (dict(posterior_flow="maf"), "posterior_flow"),
        (dict(encoder="conv"), "conv"),
        (dict(sigma=0.5), "sigma"),
        (dict(activation="gelu"), "activation"),
    ]:
        with pytest.raises(ValueError, match=match):
            VAE(6, 2, **kwargs)
    with pytest.raises(ValueError, match="z_dim >= 2"):
        VAE(6, 1, posterior_flow="nice")


def test_the_vae_that_runs_owns_its_names_in_the_param_store():
    """Two VAEs under one name (e.g. a model rebuilt from a checkpoint in the session that
    trained it): SVI must train the tensors of the VAE it runs, never the other's."""
    a, b = VAE(6, 2, hidden_dims=(8,)), VAE(6, 2, hidden_dims=(8,))
    x = torch.rand(3, 6).bernoulli()
    a.guide(x)
    a.model(x)
    before_a = {k: p.detach().clone() for k, p in a.named_parameters()}
    before_b = {k: p.detach().clone() for k, p in b.named_parameters()}
    svi = SVI(b.model, b.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    assert all(torch.equal(p, before_a[k]) for k, p in a.named_parameters())
    moved = [k for k, p in b.named_parameters() if not torch.equal(p, before_b[k])]
    assert "encoder.loc.weight" in moved and "decoder.head.0.weight" in moved
    store = pyro.get_param_store()
    assert store["encoder$$$loc.weight"] is b.encoder.loc.weight


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("flow", [None, "realnvp"])
def test_methods_under_no_grad_and_inference_mode(context, flow):
    vae = VAE((1, 4, 4), 2, hidden_dims=(8,), posterior_flow=flow, num_flows=2, flow_hidden_dims=(8,))
    perturb(vae, 0.1)
    x = torch.rand(3, 1, 4, 4).bernoulli()
    calls = {
        "elbo": lambda: vae.elbo(x, num_particles=3),
        "iwae": lambda: vae.iwae_log_likelihood(x, num_samples=5),
        "encode": lambda: vae.encode(x),
        "reconstruct": lambda: vae.reconstruct(x),
        "sample": lambda: vae.sample(2),
        "interpolate": lambda: vae.interpolate(x[0], x[1], 4),
    }
    plain = {}
    for name, call in calls.items():
        torch.manual_seed(0)
        plain[name] = call()
        assert not plain[name].requires_grad
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    for name, call in calls.items():
        torch.manual_seed(0)
        with ctx():
            inside = call()
        assert torch.allclose(inside, plain[name]), name
        inside + torch.ones_like(inside, requires_grad=True)  # usable outside the context


# ----------------------------------------------------------------------------- KL warm-up, free bits
def test_kl_weight_scales_the_closed_form_kl_and_the_monte_carlo_kl():
    """loss(beta) = -E log p(x|z) + beta * KL with the same draw: linear in beta, and with the
    closed form its slope is the textbook KL of the encoder's Gaussian."""
    x = torch.rand(6, 5).bernoulli()
    vae = VAE(5, 3, hidden_dims=(8,))
    perturb(vae)

    def loss(v: VAE, beta: float, elbo) -> float:
        v.kl_weight = beta
        pyro.set_rng_seed(3)
        return float(elbo.differentiable_loss(v.model, v.guide, x).detach())

    with torch.no_grad():
        mu, sd, _ = vae.encoder(x)
    kl = float((0.5 * (sd**2 + mu**2 - 1) - torch.log(sd)).sum())
    mf = TraceMeanField_ELBO()
    assert loss(vae, 1.0, mf) - loss(vae, 0.25, mf) == pytest.approx(0.75 * kl, rel=1e-5)
    flow = VAE(5, 3, hidden_dims=(8,), prior_flow="realnvp", num_flows=2, flow_hidden_dims=(8,))
    perturb(flow)
    values = [loss(flow, b, Trace_ELBO()) for b in (0.25, 0.5, 1.0)]
    assert values[2] - values[1] == pytest.approx(2 * (values[1] - values[0]), rel=1e-4)
    assert abs(values[2] - values[0]) > 1e-3  # the prior's term does move with the weight


def _free_bits_case() -> tuple[torch.Tensor, VAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """16 binary rows, a perturbed VAE(6, 4), the encoder's loc and scale and the batch-mean
    KL of each latent dimension (the free-bits tests' common start)."""
    x = torch.rand(16, 6).bernoulli()
    vae = VAE(6, 4, hidden_dims=(10,))
    perturb(vae)
    with torch.no_grad():
        mu, sd, _ = vae.encoder(x)
    kl_bar = (0.5 * (sd**2 + mu**2 - 1) - torch.log(sd)).mean(0)
    return x, vae, mu, sd, kl_bar


def test_free_bits_change_the_gradient_only_below_the_threshold():
    """The loss with free bits lambda has the gradient of -E log p(x|z) + sum over the
    dimensions whose batch-mean KL is >= lambda of their KL, written out by hand here."""
    x, vae, mu, sd, kl_bar = _free_bits_case()
    ranked = kl_bar.sort().values
    assert float(ranked[1] - ranked[0]) > 1e-3 and float(ranked[2] - ranked[1]) > 1e-3

    def grads(lam: float, by_hand: bool) -> list[torch.Tensor]:
        vae.zero_grad()
        pyro.set_rng_seed(5)
        if by_hand:
            loc, scale, _ = vae.encoder(x)
            z = pyro.distributions.Normal(loc, scale).rsample()
            recon = vae.likelihood_dist(z).log_prob(x).sum()
            kl = 0.5 * (scale**2 + loc**2 - 1) - torch.log(scale)
            above = kl.mean(0).detach() >= lam
            (-(recon - kl[:, above].sum())).backward()
        else:
            vae.free_bits = lam
            TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
        return [p.grad.clone() for p in vae.parameters()]

    for lam in (0.0, float((ranked[1] + ranked[2]) / 2), float(ranked[-1]) + 1.0):
        for a, b in zip(grads(lam, False), grads(lam, True)):
            assert torch.allclose(a, b, atol=1e-5), lam
    # and the threshold matters: with half the dimensions free the gradient differs from none
    mid = float((ranked[1] + ranked[2]) / 2)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(grads(mid, False), grads(0.0, False)))
    # the loss's value is -recon + sum_j max(lambda, KL_j) * N
    vae.free_bits = mid
    pyro.set_rng_seed(5)
    with torch.no_grad():
        loss = float(TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x))
        pyro.set_rng_seed(5)
        z = pyro.distributions.Normal(mu, sd).rsample()
        recon = float(vae.likelihood_dist(z).log_prob(x).sum())
    assert loss == pytest.approx(-recon + 16 * float(kl_bar.clamp(min=mid).sum()), rel=1e-5)
    # several particles, sequential or vectorised (the engine's --particles): the same term
    for vectorize in (False, True):
        values = []
        for lam in (mid, 0.0):
            vae.free_bits = lam
            pyro.set_rng_seed(5)
            elbo = TraceMeanField_ELBO(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=1)
            with torch.no_grad():
                values.append(float(elbo.differentiable_loss(vae.model, vae.guide, x)))
        assert values[0] - values[1] == pytest.approx(16 * float(torch.relu(mid - kl_bar).sum()), rel=1e-5)
    # integer data (converted afresh in model and guide) get the term too
    vae.free_bits = mid
    pyro.set_rng_seed(5)
    with torch.no_grad():
        as_int = float(TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x.long()))
    assert as_int == pytest.approx(loss, rel=1e-6)


def test_free_bits_term_carries_the_kl_weight_and_the_plate_scale():
    """The training loss is -recon * size/N + beta * size * sum_j max(lambda, KL_j): the
    free-bits floor is weighted by the warm-up's beta like the KL it stands in for, and
    scaled to the data set's size like the minibatch's other terms."""
    x, vae, _, _, kl_bar = _free_bits_case()
    lam = float(kl_bar.median())  # some dimensions below the floor, some above

    def loss(free_bits: float, beta: float, size: int | None) -> float:
        vae.free_bits, vae.kl_weight = free_bits, beta
        pyro.set_rng_seed(5)
        with torch.no_grad():
            return float(TraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x, size))

    for beta, size in ((1.0, None), (0.3, None), (1.0, 1000), (0.3, 1000)):
        n = 16 if size is None else size
        floor = beta * n * float(torch.relu(lam - kl_bar).sum())
        assert floor > 0.1
        assert loss(lam, beta, size) - loss(0.0, beta, size) == pytest.approx(floor, rel=1e-5), (beta, size)


def test_free_bits_and_warm_up_are_checked():
    with pytest.raises(ValueError, match="free_bits needs the closed-form KL"):
        VAE(5, 3, posterior_flow="realnvp", free_bits=0.5)
    with pytest.raises(ValueError, match="free_bits needs the closed-form KL"):
        VAE(5, 3, prior_flow="nice", free_bits=0.5)
    with pytest.raises(ValueError, match="free_bits a finite number"):
        VAE(5, 3, free_bits=-1.0)
    from pyro_genext.models import kl_warmup_weight

    assert [kl_warmup_weight(s, 3) for s in (0, 1, 2, 3, 10)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    assert kl_warmup_weight(0, 0) == 1.0
    with pytest.raises(ValueError, match="warmup a non-negative integer"):
        kl_warmup_weight(0, -2)


# ----------------------------------------------------------------------------- flow prior
@pytest.mark.parametrize("flow", ["nice", "realnvp"])
def test_flow_prior_log_density_is_the_change_of_variables(flow):
    torch.set_default_dtype(torch.float64)
    vae = VAE(5, 3, hidden_dims=(6,), prior_flow=flow, num_flows=3, flow_hidden_dims=(7,))
    perturb(vae, 0.5)
    u = torch.randn(4, 3)
    with torch.no_grad():
        z = vae.prior_flow(u)
    assert not torch.allclose(z, u)
    brute = []
    for i in range(4):
        jac = torch.autograd.functional.jacobian(vae.prior_flow, u[i])
        brute.append(torch.distributions.Normal(0.0, 1.0).log_prob(u[i]).sum() - torch.linalg.slogdet(jac)[1])
    with torch.no_grad():
        got = vae.prior((4,)).log_prob(z.clone())  # a fresh tensor: the inverse pass, no cache
    assert torch.allclose(got, torch.stack(brute), atol=1e-8)
    draws = vae.sample(7)  # sampling goes through the flow
    assert draws.shape == (7, 5)
    # the model alone draws z from the flow prior and scores it with the same density
    trace = poutine.trace(vae.model).get_trace(torch.rand(3, 5).bernoulli())
    site = trace.nodes["z"]
    assert site["value"].shape == (3, 3) and not site["is_observed"]
    with torch.no_grad():
        z = site["value"]
        assert torch.allclose(site["fn"].log_prob(z.clone()), vae.prior((3,)).log_prob(z))


def test_iwae_with_a_flow_prior_approaches_the_exact_log_likelihood():
    """z in 2-D: log p(x) = log of the integral of p(z) p(x|z) over a grid (quadrature)."""
    torch.set_default_dtype(torch.float64)
    vae = VAE(4, 2, hidden_dims=(8,), prior_flow="realnvp", posterior_flow="realnvp", num_flows=2,
              flow_hidden_dims=(8,))
    perturb(vae, 0.3)
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    t = torch.linspace(-9, 9, 601)
    grid = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    cell = float((t[1] - t[0]) ** 2)
    with torch.no_grad():
        log_prior = vae.prior(grid.shape[:1]).log_prob(grid)
        assert float(log_prior.exp().sum() * cell) == pytest.approx(1.0, abs=1e-3)  # the grid holds p(z)
        lik = vae.likelihood_dist(grid.unsqueeze(1)).log_prob(x)  # (G, 2)
        exact = torch.logsumexp(log_prior.unsqueeze(1) + lik, 0) + math.log(cell)
    torch.manual_seed(0)
    iwae = vae.iwae_log_likelihood(x, 20000)
    elbo = vae.elbo(x, 2000)
    assert torch.allclose(iwae, exact, atol=0.02), (iwae, exact)
    assert bool((elbo < exact - 0.01).all())


# ----------------------------------------------------------------------------- gap decomposition
def test_gap_decomposition_on_a_linear_gaussian_vae_matches_the_closed_forms():
    """x = W z + c + s eps: the posterior is N(m, Lambda^-1), Lambda = I + W^T W / s^2. The
    best diagonal Gaussian keeps the diagonal precisions, so its gap is the KL
    0.5 (sum_i log Lambda_ii - log det Lambda); a flexible posterior closes it."""
    torch.set_default_dtype(torch.float64)
    vae = linear_gaussian(4, 2, 0.5)
    w = torch.tensor([[1.0, 0.8], [0.9, 1.0], [0.5, 0.7], [0.2, 0.1]])  # correlated columns
    with torch.no_grad():
        vae.decoder.head[0].weight.copy_(w)
    x = torch.randn(5, 4)
    lam = torch.eye(2) + w.T @ w / 0.25
    approximation = 0.5 * (torch.log(torch.diagonal(lam)).sum() - torch.logdet(lam))
    assert float(approximation) > 0.5  # a case where the family matters
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    from pyro_genext.models import gap_decomposition

    g = gap_decomposition(vae, x, num_samples=2000, elbo_samples=4000, steps=500)
    log_px = exact_log_px(vae, x)
    # the random encoder is far from the posterior: its log-weights vary by nats, hence the tolerance
    assert torch.allclose(g.elbo_amortised, exact_elbo(vae, x), atol=0.5)
    best = log_px - approximation
    assert torch.allclose(g.elbo_family, best, atol=0.04), (g.elbo_family, best)
    assert bool((log_px - g.elbo_flexible < 0.05).all()), log_px - g.elbo_flexible
    assert bool((log_px - g.elbo_flexible > -0.02).all())  # an ELBO, up to Monte Carlo noise
    assert bool(((g.log_px - log_px).abs() < 4 * g.log_px_se + 0.01).all()), (g.log_px - log_px, g.log_px_se)
    assert torch.allclose(g.approximation_gap + g.amortisation_gap, g.total_gap)
    assert abs(g.summary()["approximation_gap"] - float(approximation)) < 0.03
    for k, v in vae.state_dict().items():  # the decoder was frozen, nothing moved
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in vae.parameters())


def test_gap_decomposition_of_a_flow_posterior_optimises_its_own_family():
    vae = VAE(6, 2, hidden_dims=(8,), posterior_flow="realnvp", num_flows=2, flow_hidden_dims=(8,))
    perturb(vae)
    x = torch.rand(4, 6).bernoulli()
    from pyro_genext.models import gap_decomposition

    g = gap_decomposition(vae, x, num_samples=500, elbo_samples=500, steps=200)
    assert bool((g.amortisation_gap > -0.05).all()), g.amortisation_gap  # started at the encoder's
    assert bool((g.flexible_gap > -0.1).all()) and bool((g.log_px_se < 0.1).all())
    with pytest.raises(ValueError, match="expected steps a positive integer"):
        gap_decomposition(vae, x, steps=0)
    with pytest.raises(ValueError, match="expected at least one example"):
        gap_decomposition(vae, x[:0])


@pytest.mark.parametrize("flow", [None, "nice", "realnvp"])
def test_gap_decomposition_family_started_at_the_encoder_is_the_amortised_posterior(flow):
    """With a learning rate too small to move anything, the per-example family posterior
    is the encoder's own q(z | x): its ELBO estimate must match the amortised one. This
    checks the family's parameters start at the encoder's output (mean, scale, context)
    and that its log q carries the flow's log-det (dropping it moves the RealNVP estimate
    by 0.5 to 1.5 nats here; NICE's posterior couplings preserve volume)."""
    torch.set_default_dtype(torch.float64)
    vae = VAE(6, 2, hidden_dims=(8,), posterior_flow=flow, num_flows=2, flow_hidden_dims=(8,))
    perturb(vae)
    x = torch.rand(4, 6).bernoulli()
    from pyro_genext.models import gap_decomposition

    g = gap_decomposition(vae, x, num_samples=10, elbo_samples=4000, steps=1, lr=1e-12)
    with torch.no_grad():
        se = vae.log_weights(x, 4000).std(0) / math.sqrt(4000)  # of each of the two estimates
    assert bool(((g.elbo_family - g.elbo_amortised).abs() < 4 * math.sqrt(2) * se).all()), (
        g.elbo_family - g.elbo_amortised, se)


# ----------------------------------------------------------------------------- defects found in review
def test_iwae_chunks_are_sized_by_what_the_networks_allocate():
    """A 2-D Gaussian VAE with hidden widths 512/256: each draw allocates about 770 hidden
    activations per example, not the 2 of the data's width; the chunks must bound them."""
    vae = VAE(2, 2, likelihood="gaussian")
    largest = [0]
    forward = vae.decoder.forward

    def recording(z):
        largest[0] = max(largest[0], z.shape[:-1].numel())
        return forward(z)

    vae.decoder.forward = recording
    x = torch.randn(100, 2)
    vae.iwae_log_likelihood(x, 5000)
    assert largest[0] * (512 + 256 + 2) <= 2**22, largest[0]  # about 16 MB of float32 a chunk
    vae.elbo(x, 300)
    assert largest[0] * (512 + 256 + 2) <= 2**22, largest[0]


def test_data_dtypes_are_converted_to_the_model_and_empty_batches_refused():
    from pyro_genext.flows import realnvp
    from pyro_genext.models import FlowDensity

    vae = VAE(4, 2, hidden_dims=(8,))
    x = torch.rand(3, 4).round()
    ref = vae.double().elbo(x.double())
    torch.manual_seed(1)
    a = vae.elbo(x.long())  # integer data into a float64 VAE
    torch.manual_seed(1)
    b = vae.elbo(x.double())
    assert a.dtype == torch.float64 and torch.equal(a, b) and ref.shape == (3,)
    vae32 = VAE(4, 2, hidden_dims=(8,))
    assert vae32.elbo(x.double()).dtype == torch.float32  # float64 data into a float32 VAE
    assert vae32.encode(x.bool()).shape == (3, 2)
    for call in (lambda: vae32.elbo(torch.zeros(0, 4)), lambda: vae32.encode(torch.zeros(0, 4)),
                 lambda: vae32.iwae_log_likelihood(torch.zeros(0, 4), 5)):
        with pytest.raises(ValueError, match=r"at least one example, got an empty batch of shape \(0, 4\)"):
            call()
    density = FlowDensity(realnvp(4, num_layers=2, hidden_dims=(8,)))
    y = torch.randn(3, 4, dtype=torch.float64)
    assert torch.allclose(density.log_prob(y), density.log_prob(y.float()))
    assert density.log_prob(y).dtype == torch.float32
    with pytest.raises(ValueError, match=r"at least one example, got an empty batch of shape \(0, 4\)"):
        density.log_prob(torch.zeros(0, 4))


def test_non_tensor_and_complex_data_are_refused_by_both_models():
    from pyro_genext.flows import realnvp
    from pyro_genext.models import FlowDensity

    vae, density = VAE(4, 2, hidden_dims=(8,)), FlowDensity(realnvp(4, num_layers=2, hidden_dims=(8,)))
    for call in (vae.elbo, vae.encode, density.log_prob):
        with pytest.raises(TypeError, match="expected data as a torch.Tensor, got list"):
            call([[0.0, 1.0, 0.0, 1.0]])
        with pytest.raises(ValueError, match="expected real data, got dtype torch.complex64"):
            call(torch.zeros(3, 4, dtype=torch.complex64))


@pytest.mark.parametrize("kwargs, match", [
    ({"likelihood": "gaussian", "sigma": float("inf")}, "finite sigma > 0"),
    ({"posterior_flow": "realnvp", "flow_hidden_dims": (0,)}, r"integers in flow_hidden_dims, got \(0,\)"),
    ({"posterior_flow": "nice", "flow_hidden_dims": (-3,)}, r"integers in flow_hidden_dims, got \(-3,\)"),
    ({"prior_flow": "realnvp", "flow_hidden_dims": (4, 0)}, "positive integers in flow_hidden_dims"),
    ({"encoder": "conv", "conv_channels": (0,)}, r"positive integers in conv_channels, got \(0,\)"),
])
def test_bad_widths_and_sigma_are_refused(kwargs, match):
    shape = (1, 8, 8) if kwargs.get("encoder") == "conv" else 4
    with pytest.raises(ValueError, match=match):
        VAE(shape, 2, **kwargs)
