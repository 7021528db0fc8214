r"""Five posteriors that Gaussian guides get wrong in five different ways, as Pyro
models, with what is known about them exactly.

* :func:`funnel`: Neal's funnel (Neal 2003), :math:`y \sim \mathcal N(0, 3^2)`,
  :math:`x_i \mid y \sim \mathcal N(0, e^{y})`; scale depends on position. Exact
  moments: :math:`\operatorname{sd}(y) = 3`, :math:`\operatorname{sd}(x_i) = e^{9/4}`.
* :func:`banana`: :math:`x_1 \sim \mathcal N(0, 2^2)`,
  :math:`x_2 \mid x_1 \sim \mathcal N(b(x_1^2 - 4), 1)`; curved. Exact moments:
  :math:`\operatorname{sd}(x_2) = \sqrt{1 + 32 b^2}`.
* :func:`bimodal`: an equal mixture of two Gaussians in 2-D; two modes.
* :func:`eight_schools`: the centered parametrisation (Rubin 1981; Gelman et al. 2013),
  a funnel between :math:`\tau` and :math:`\theta`. No closed form: a NUTS reference.
* :func:`logistic_regression`: on scikit-learn's breast-cancer data (569 x 30,
  standardised), nearly Gaussian. No closed form: a NUTS reference.

The first three have no data, so their evidence is exactly :math:`p(\text{data}) = 1`
(``log_evidence = 0``) and the ELBO is minus the KL divergence from guide to target.
Every model is vectorised (it runs under an outer particle plate), as Pyro's vectorised
ELBOs and :mod:`pyro_genext.diagnostics` need.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.distributions as dist
import torch

__all__ = [
    "Target", "funnel", "banana", "bimodal", "eight_schools", "logistic_regression",
    "unequal_groups", "gp_hyperparameters", "horseshoe", "TARGETS", "HELD_OUT",
]


@dataclass
class Target:
    """A model with its arguments and what is known about its posterior.

    Attributes:
        name: short name.
        model: the Pyro model; call it as ``model(*args)``.
        args: the model's arguments (data).
        mean, sd: exact posterior means and standard deviations of each latent site
            (constrained values), where known; else empty.
        log_evidence: exact :math:`\\log p(\\text{data})`, or ``None``.
        neck: the site whose spread a guide most easily misses, if any.
        ref_mean, ref_sd: exact posterior means and standard deviations of each latent
            site in the **unconstrained** space (``biject_to(support).inv`` of the value:
            ``log tau`` for a scale), where known (in closed form or by quadrature);
            else empty and a benchmark needs an MCMC reference.
    """

    name: str
    model: Callable[..., Any]
    args: tuple[Any, ...] = ()
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    sd: dict[str, torch.Tensor] = field(default_factory=dict)
    log_evidence: float | None = None
    neck: str | None = None
    ref_mean: dict[str, torch.Tensor] = field(default_factory=dict)
    ref_sd: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mean and not self.ref_mean:  # every site on the real line
            self.ref_mean, self.ref_sd = dict(self.mean), dict(self.sd)


def funnel(dim: int = 10) -> Target:
    """Neal's funnel in ``dim`` dimensions (``y`` and ``dim - 1`` coordinates ``x``).

    Example::

        >>> t = funnel(3)
        >>> t.sd["y"], t.sd["x"]
        (tensor(3.), tensor([9.4877, 9.4877]))
    """
    if dim < 2:
        raise ValueError(f"funnel: expected dim >= 2, got {dim}")
    k = dim - 1

    def model() -> None:
        y = pyro.sample("y", dist.Normal(0.0, 3.0))
        scale = torch.exp(y / 2).unsqueeze(-1).expand(y.shape + (k,))
        pyro.sample("x", dist.Normal(0.0, scale).to_event(1))

    return Target(
        "funnel", model,
        mean={"y": torch.tensor(0.0), "x": torch.zeros(k)},
        sd={"y": torch.tensor(3.0), "x": torch.full((k,), math.exp(9 / 4))},
        log_evidence=0.0, neck="y",
    )


def banana(b: float = 0.5) -> Target:
    """The banana :math:`x_1 \\sim N(0, 4)`, :math:`x_2 \\mid x_1 \\sim N(b(x_1^2-4), 1)`."""

    def model() -> None:
        x1 = pyro.sample("x1", dist.Normal(0.0, 2.0))
        pyro.sample("x2", dist.Normal(b * (x1**2 - 4.0), 1.0))

    return Target(
        "banana", model,
        mean={"x1": torch.tensor(0.0), "x2": torch.tensor(0.0)},
        sd={"x1": torch.tensor(2.0), "x2": torch.tensor(math.sqrt(1 + 32 * b * b))},
        log_evidence=0.0,
    )


def bimodal(offset: float = 1.5, scale: float = 0.7) -> Target:
    """An equal mixture of :math:`N(\\pm(o, o), s^2 I)` in 2-D."""
    locs = torch.tensor([[offset, offset], [-offset, -offset]])

    def model() -> None:
        # z is given a standard normal site and the factor turns it into the mixture
        # exactly (so the evidence stays 1); a MixtureSameFamily site would do too, but
        # torch cannot map its support to the real line, which AutoContinuous needs
        base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        z = pyro.sample("z", base)
        mix = dist.MixtureSameFamily(dist.Categorical(torch.ones(2)), dist.Normal(locs, scale).to_event(1))
        pyro.factor("mixture", mix.log_prob(z) - base.log_prob(z))

    sd = math.sqrt(scale**2 + offset**2)
    return Target("bimodal", model, mean={"z": torch.zeros(2)}, sd={"z": torch.full((2,), sd)},
                  log_evidence=0.0)


EIGHT_SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(centered: bool = True) -> Target:
    """Eight schools (Rubin 1981), ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``,
    ``theta_j ~ N(mu, tau)`` (centered) and ``y_j ~ N(theta_j, sigma_j)``. With
    ``centered=False`` ``theta = mu + tau * eta``, the same posterior over
    ``(mu, tau, theta)`` in a geometry NUTS handles (what the reference uses)."""

    def model(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", len(sigma), dim=-1):
            if centered:
                theta = pyro.sample("theta", dist.Normal(mu, tau))
            else:
                eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
                theta = pyro.deterministic("theta", mu + tau * eta)
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    m, sd = _normal_hierarchy_reference(EIGHT_SCHOOLS_Y, EIGHT_SCHOOLS_SIGMA, 5.0, 5.0)
    return Target("eight_schools", model, (EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y), neck="tau",
                  ref_mean=m, ref_sd=sd)


def logistic_regression() -> Target:
    """Bayesian logistic regression on scikit-learn's breast-cancer data: standardised
    features, ``w ~ N(0, I_30)``, ``b ~ N(0, 1)``, ``label ~ Bernoulli(logits=Xw + b)``."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.get_default_dtype())
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=x.dtype)

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        logits = (w * x).sum(-1) + b
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("label", dist.Bernoulli(logits=logits), obs=y)

    return Target("logistic", model, (x, y))


# ------------------------------------------------------------------ held-out posteriors
def _normal_hierarchy_reference(
    ybar: torch.Tensor, se: torch.Tensor, mu_sd: float, tau_scale: float, grid: int = 20001
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    r"""Exact posterior moments of ``mu``, ``log tau`` and ``theta`` for
    ``mu ~ N(0, mu_sd)``, ``tau ~ HalfCauchy(tau_scale)``, ``theta_j ~ N(mu, tau)``,
    ``ybar_j ~ N(theta_j, se_j)``: given :math:`\tau` everything is Gaussian (Gelman et al.
    2013, sec. 5.4), so one quadrature over :math:`\log\tau` gives the moments."""
    y, s2 = ybar.double(), se.double() ** 2
    log_tau = torch.linspace(-15.0, 8.0, grid, dtype=torch.float64)[:, None]
    tau2 = torch.exp(2 * log_tau)
    v = s2 + tau2                                    # y_j | mu, tau ~ N(mu, v_j)
    prec_mu = 1 / mu_sd**2 + (1 / v).sum(-1, keepdim=True)
    b = (y / v).sum(-1, keepdim=True)
    log_lik = (-0.5 * (torch.log(2 * math.pi * v) + y**2 / v).sum(-1, keepdim=True)
               - math.log(mu_sd) - 0.5 * torch.log(prec_mu) + b**2 / (2 * prec_mu))
    tau = torch.exp(log_tau)
    log_prior = math.log(2 / (math.pi * tau_scale)) - torch.log1p((tau / tau_scale) ** 2)
    w = torch.softmax((log_lik + log_prior + log_tau).squeeze(-1), 0)[:, None]  # + log|d tau/d log tau|
    m_mu, v_mu = b / prec_mu, 1 / prec_mu
    prec_t = 1 / s2 + 1 / tau2
    m_t = (y / s2 + m_mu / tau2) / prec_t
    v_t = 1 / prec_t + (1 / (tau2 * prec_t)) ** 2 * v_mu

    def moments(m: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (w * m).sum(0)
        return mean, ((w * (var + m**2)).sum(0) - mean**2).sqrt()

    out = {"mu": moments(m_mu, v_mu), "tau": moments(log_tau, torch.zeros_like(log_tau)),
           "theta": moments(m_t, v_t)}
    f = torch.get_default_dtype()
    return ({k: m.to(f).squeeze() if k != "theta" else m.to(f) for k, (m, _) in out.items()},
            {k: s.to(f).squeeze() if k != "theta" else s.to(f) for k, (_, s) in out.items()})


def unequal_groups() -> Target:
    """A centred hierarchical normal model whose eight groups have very unequal sizes
    (1 to 200 observations, 271 in all): ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(2)``,
    ``theta_j ~ N(mu, tau)``, ``y_ij ~ N(theta_j, 1)``. The small groups make a funnel
    between ``tau`` and their ``theta``; the large ones pin theirs to within 0.07. Data
    simulated (seed 0) with ``mu = 1``, ``tau = 0.5``. Exact reference by quadrature over
    ``log tau`` (:func:`_normal_hierarchy_reference`, on the group means)."""
    sizes = torch.tensor([1, 1, 2, 3, 5, 10, 49, 200])
    gen = torch.Generator().manual_seed(0)
    theta = 1.0 + 0.5 * torch.randn(len(sizes), generator=gen)
    group = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    y = theta[group] + torch.randn(len(group), generator=gen)

    def model(group: torch.Tensor, y: torch.Tensor | None = None) -> None:
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(2.0))
        with pyro.plate("groups", len(sizes), dim=-1):
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        with pyro.plate("data", len(group), dim=-1):
            pyro.sample("y", dist.Normal(theta[..., group], 1.0), obs=y)

    ybar = torch.zeros(len(sizes)).index_add_(0, group, y) / sizes
    m, sd = _normal_hierarchy_reference(ybar, 1 / sizes.double().sqrt(), 5.0, 2.0)
    return Target("unequal_groups", model, (group, y), neck="tau", ref_mean=m, ref_sd=sd)


def gp_hyperparameters(grid: int = 32) -> Target:
    """The three hyper-parameters of a Gaussian process regression, the latent function
    integrated out: ``lengthscale ~ LogNormal(0, 1)``, ``amplitude ~ LogNormal(0, 1)``,
    ``noise ~ LogNormal(-1, 1)``, ``y ~ N(0, amplitude^2 K_rbf + noise^2 I)`` on 20
    points of :math:`\\sin(2x)` plus noise 0.3 (seed 0). Skewed, correlated
    log-scales. Reference by quadrature on a ``grid``\\ :sup:`3` grid of the log
    hyper-parameters."""
    gen = torch.Generator().manual_seed(0)
    x = torch.linspace(0.0, 4.0, 20)
    y = torch.sin(2 * x) + 0.3 * torch.randn(20, generator=gen)
    priors = {"amplitude": (0.0, 1.0), "lengthscale": (0.0, 1.0), "noise": (-1.0, 1.0)}

    def cov(amp: torch.Tensor, ls: torch.Tensor, noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        d2 = (x[:, None] - x[None, :]) ** 2
        k = amp[..., None, None] ** 2 * torch.exp(-0.5 * d2 / ls[..., None, None] ** 2)
        return k + (noise[..., None, None] ** 2 + 1e-6) * torch.eye(len(x), dtype=x.dtype)

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        h = {k: pyro.sample(k, dist.LogNormal(*v)) for k, v in priors.items()}
        k = cov(h["amplitude"], h["lengthscale"], h["noise"], x)
        pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(x), k), obs=y)

    # quadrature on the log hyper-parameters; every edge lies 4.5 posterior sd or more
    # from the posterior mean, and grids of 32 and 48 points per axis give the same
    # moments to 4 digits
    axes = {"amplitude": (-2.5, 2.5), "lengthscale": (-2.5, 1.5), "noise": (-4.0, 0.5)}
    g = {k: torch.linspace(*v, grid, dtype=torch.float64) for k, v in axes.items()}
    a, ls, n = torch.meshgrid(g["amplitude"], g["lengthscale"], g["noise"], indexing="ij")
    pts = torch.stack([a.reshape(-1), ls.reshape(-1), n.reshape(-1)], -1)
    logp = torch.empty(len(pts), dtype=torch.float64)
    xd, yd = x.double(), y.double()
    for i in range(0, len(pts), 16384):
        c = pts[i:i + 16384]
        k = cov(c[:, 0].exp(), c[:, 1].exp(), c[:, 2].exp(), xd)
        lik = torch.distributions.MultivariateNormal(torch.zeros_like(xd), k).log_prob(yd)
        # density of log h: Normal(prior loc, prior scale)
        prior = sum(torch.distributions.Normal(*priors[name]).log_prob(c[:, j])
                    for j, name in enumerate(("amplitude", "lengthscale", "noise")))
        logp[i:i + 16384] = lik + prior
    w = torch.softmax(logp, 0)[:, None]
    mean = (w * pts).sum(0)
    sd = ((w * (pts - mean) ** 2).sum(0)).sqrt()
    names = ("amplitude", "lengthscale", "noise")
    f = torch.get_default_dtype()
    return Target("gp", model, (x, y), ref_mean={k: mean[j].to(f) for j, k in enumerate(names)},
                  ref_sd={k: sd[j].to(f) for j, k in enumerate(names)})


def horseshoe(centered: bool = True) -> Target:
    """A sparse linear regression with the horseshoe prior (Carvalho, Polson, Scott 2010):
    ``tau ~ HalfCauchy(1)``, ``lambda_j ~ HalfCauchy(1)``, ``beta_j ~ N(0, tau lambda_j)``
    (``centered``; else ``beta = tau lambda z``, ``z ~ N(0, 1)``, which NUTS handles),
    ``sigma ~ HalfNormal(1)``, ``y ~ N(X beta, sigma)``; 40 observations of 6 standard
    normal features, two of them active (coefficients 2 and -1.5), noise 1 (seed 0).
    Many local scales with heavy tails. No closed form: a NUTS reference."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen)
    y = x @ torch.tensor([2.0, -1.5, 0.0, 0.0, 0.0, 0.0]) + torch.randn(40, generator=gen)

    def model(x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        p = x.shape[1]
        tau = pyro.sample("tau", dist.HalfCauchy(1.0))
        lam = pyro.sample("lambda", dist.HalfCauchy(torch.ones(p)).to_event(1))
        scale = tau.unsqueeze(-1) * lam
        if centered:
            beta = pyro.sample("beta", dist.Normal(0.0, scale).to_event(1))
        else:
            z = pyro.sample("z", dist.Normal(torch.zeros(p), 1.0).to_event(1))
            beta = pyro.deterministic("beta", scale * z, event_dim=1)
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Normal((beta * x).sum(-1), sigma), obs=y)

    return Target("horseshoe", model, (x, y), neck="tau")


TARGETS: dict[str, Callable[[], Target]] = {
    "funnel": funnel,
    "eight_schools": eight_schools,
    "logistic": logistic_regression,
    "banana": banana,
    "bimodal": bimodal,
}
"""The five tuning targets: the defaults of the flow guides were chosen on these."""

HELD_OUT: dict[str, Callable[[], Target]] = {
    "unequal_groups": unequal_groups,
    "gp": gp_hyperparameters,
    "horseshoe": horseshoe,
}
"""Posteriors kept out of the tuning, to confirm the defaults on other geometries."""
