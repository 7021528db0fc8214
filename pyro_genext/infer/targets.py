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

__all__ = ["Target", "funnel", "banana", "bimodal", "eight_schools", "logistic_regression", "TARGETS"]


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
    """

    name: str
    model: Callable[..., Any]
    args: tuple[Any, ...] = ()
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    sd: dict[str, torch.Tensor] = field(default_factory=dict)
    log_evidence: float | None = None
    neck: str | None = None


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

    return Target("eight_schools", model, (EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y), neck="tau")


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


TARGETS: dict[str, Callable[[], Target]] = {
    "funnel": funnel,
    "eight_schools": eight_schools,
    "logistic": logistic_regression,
    "banana": banana,
    "bimodal": bimodal,
}
