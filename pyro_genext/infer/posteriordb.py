r"""Posteriors of posteriordb (Magnusson et al., github.com/stan-dev/posteriordb) as Pyro
models, with their reference draws.

posteriordb holds Stan programs, their data and 10,000 reference draws from long,
checked NUTS runs. Each Stan program ported here was rewritten by hand as a Pyro model
with the same priors, constraints, likelihood and transformed data (an unstated prior is
flat over the declared support: :class:`FlatPrior`). Load one in two lines::

    from pyro_genext.infer.posteriordb import load_posterior
    t = load_posterior("eight_schools-eight_schools_noncentered", root="path/to/posteriordb")

``t`` is a :class:`PosteriorDBTarget`, a :class:`~pyro_genext.infer.targets.Target`:
``t.model(*t.args)`` is the model with its data bound, and ``t.draws`` the reference
draws keyed by the model's site names, each ``(10000,) + site shape`` (Stan's
``beta[2]`` is ``t.draws["beta"][:, 1]``), constrained values as given.

**Vectorised.** Every port has no plates: each site's value is ``batch + shape`` and the
model broadcasts over any leading batch dims, so it runs under
``Trace_ELBO(vectorize_particles=True)``, :func:`~pyro_genext.infer.fit_guide` and
:mod:`pyro_genext.diagnostics`, and can score a whole batch of draws at once
(:func:`log_density`).

**Faithful.** :func:`score_check` tests a port against its reference draws: in the
unconstrained space the score :math:`g = \nabla_u \log p(u)` of the posterior satisfies
:math:`\mathbb E[g] = 0` and :math:`\mathbb E[u g^\top] = -I` (integration by parts),
which a wrong prior, constraint or likelihood breaks.

The folder is ``root`` if given, else the environment variable ``PYRO_GENEXT_POSTERIORDB``:
either a clone of posteriordb or its ``posterior_database`` folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to, transform_to

from ..data import DatasetNotFoundError
from .targets import Target

__all__ = [
    "ENV_VAR", "FlatPrior", "PositiveNormal", "PosteriorDBNotFoundError", "PosteriorDBTarget", "PORTS",
    "ScoreCheck", "is_ported", "list_posteriors", "load_posterior", "log_density", "score_check",
]

ENV_VAR = "PYRO_GENEXT_POSTERIORDB"
Data = dict[str, torch.Tensor]


# ------------------------------------------------------------------ the flat prior
class _PositiveOrdered(type(constraints.positive_ordered_vector)):  # type: ignore[misc]
    """Pyro's ``positive_ordered_vector`` with ``event_dim = 1`` (Pyro's own says 0,
    though it constrains whole vectors: its ``check`` reduces the last dim)."""

    event_dim = 1


positive_ordered = _PositiveOrdered()
biject_to.register(_PositiveOrdered)(lambda c: biject_to(constraints.positive_ordered_vector))
transform_to.register(_PositiveOrdered)(lambda c: transform_to(constraints.positive_ordered_vector))


class FlatPrior(dist.ImproperUniform):
    """The flat (improper) prior of a Stan parameter declared without one: ``log_prob``
    is 0 over ``support``, as :class:`~pyro.distributions.ImproperUniform`.

    Unlike ``ImproperUniform`` it can be run without a guide: ``sample`` returns a point
    uniform on :math:`[-2, 2]` in the unconstrained space (the start Pyro's
    ``init_to_uniform`` picks), so that tracing the model for its shapes, or an
    autoguide's initialisation, works. Those points are **not** draws of a prior (there
    is none); never use them as such.

    Example::

        >>> p = FlatPrior(constraints.positive)
        >>> float(p.log_prob(torch.tensor(3.0))), bool(p.sample() > 0)
        (0.0, True)
    """

    def __init__(self, support: constraints.Constraint, event_shape: tuple[int, ...] = (),
                 batch_shape: tuple[int, ...] = (), dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(support, torch.Size(batch_shape), torch.Size(event_shape))
        self.dtype = dtype or torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else None

    def expand(self, batch_shape: Any, _instance: Any = None) -> FlatPrior:
        return FlatPrior(self._support, tuple(self.event_shape), tuple(batch_shape), self.dtype, self.device)

    def sample(self, sample_shape: Any = ()) -> torch.Tensor:
        t = biject_to(self._support)
        shape = torch.Size(sample_shape) + self.batch_shape + t.inv.forward_shape(self.event_shape)
        with torch.no_grad():  # on the data's device: the start of a model on a GPU
            return t(torch.rand(shape, dtype=self.dtype, device=self.device) * 4 - 2)


def _flat(name: str, support: constraints.Constraint, like: torch.Tensor,
          shape: tuple[int, ...] = ()) -> torch.Tensor:
    """A parameter of ``shape`` with a flat prior on ``support`` (one site), in ``like``'s dtype
    and on its device."""
    if shape and support.event_dim == 0:
        support = constraints.independent(support, len(shape))
    return pyro.sample(name, FlatPrior(support, shape, dtype=like.dtype, device=like.device))


class PositiveNormal(dist.TorchDistribution):
    r"""The normal distribution :math:`N(\mu, \sigma^2)` truncated to :math:`(0, \infty)`:
    what Stan means by ``real<lower=0> x; x ~ normal(mu, sigma)`` (Stan drops the
    normalising constant :math:`\Phi(\mu/\sigma)`, which does not change the posterior).
    A proper distribution, so that a guide can start at its median. Sampled by the
    inverse CDF.

    Example::

        >>> d = PositiveNormal(torch.tensor(1.0), torch.tensor(0.5))
        >>> bool((d.sample((1000,)) > 0).all()), round(float(d.log_prob(torch.tensor(1.0))), 4)
        (True, -0.2028)
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.positive

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args: bool | None = None) -> None:
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape: Any, _instance: Any = None) -> PositiveNormal:
        return PositiveNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape))

    def sample(self, sample_shape: Any = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            low = torch.special.ndtr(-self.loc / self.scale)
            u = low + (1 - low) * torch.rand(shape, dtype=self.loc.dtype)
            x = self.loc + self.scale * torch.special.ndtri(u)
            return x.clamp_min(torch.finfo(x.dtype).tiny)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        z = (value - self.loc) / self.scale
        return (-0.5 * z**2 - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)
                - torch.log(torch.special.ndtr(self.loc / self.scale)))


def _normal_vec(loc: float, scale: float, n: int, like: torch.Tensor) -> dist.Independent:
    """``n`` independent :math:`N(loc, scale^2)` as one vector site, in ``like``'s dtype."""
    return dist.Normal(torch.full((n,), float(loc), dtype=like.dtype, device=like.device), scale).to_event(1)


# ------------------------------------------------------------------ linear regressions
def _column(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1)


def _design(*cols: torch.Tensor) -> torch.Tensor:
    """``[1, col_1, ..., col_k]`` as an ``(N, k + 1)`` matrix (Stan's ``beta[1]`` is the
    intercept in every ARM regression here)."""
    return torch.cat([torch.ones_like(_column(cols[0]))] + [_column(c) for c in cols], 1)


def linear_regression(response: str, beta_prior: str = "flat",
                      sigma_prior: str = "flat") -> Callable[[torch.Tensor, torch.Tensor], None]:
    r"""The model ``response ~ normal(x * beta, sigma)`` of a design matrix ``x``
    (``N x D``): ``beta`` a ``D``-vector, ``sigma > 0``.

    Priors as the Stan programs state them: ``beta_prior`` ``"flat"`` or ``"normal10"``
    (:math:`N(0, 10^2)` each); ``sigma_prior`` ``"flat"`` (on :math:`(0, \infty)`),
    ``"cauchy2.5"`` (half-Cauchy, scale 2.5) or ``"normal10"`` (half-normal, scale 10).
    """
    if beta_prior not in ("flat", "normal10") or sigma_prior not in ("flat", "cauchy2.5", "normal10"):
        raise ValueError(f"linear_regression: unknown priors {beta_prior!r}, {sigma_prior!r}")

    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        d = x.shape[-1]
        if beta_prior == "flat":
            beta = _flat("beta", constraints.real, x, (d,))
        else:
            beta = pyro.sample("beta", _normal_vec(0.0, 10.0, d, x))
        if sigma_prior == "flat":
            sigma = _flat("sigma", constraints.positive, x)
        else:
            half = dist.HalfCauchy if sigma_prior == "cauchy2.5" else dist.HalfNormal
            sigma = pyro.sample("sigma", half(torch.tensor(2.5 if half is dist.HalfCauchy else 10.0,
                                                           dtype=x.dtype)))
        loc = beta @ x.T
        pyro.sample(response, dist.Normal(loc, sigma[..., None]).to_event(1), obs=y)

    return model


def _z(x: torch.Tensor, twice: bool = False) -> torch.Tensor:
    """``(x - mean) / sd`` (Stan's ``sd``: the sample sd, ``N - 1``); ``twice``: ``/ 2 sd``."""
    return (x - x.mean()) / ((2 if twice else 1) * x.std())


def _earnings(kind: str) -> Callable[[Data], tuple[torch.Tensor, torch.Tensor]]:
    def build(d: Data) -> tuple[torch.Tensor, torch.Tensor]:
        earn, h = d["earn"], d["height"]
        if kind == "earn_height":
            return _design(h), earn
        if kind == "log10earn_height":
            return _design(h), torch.log10(earn)
        m = d["male"]
        cols = {
            "logearn_height": (h,),
            "logearn_height_male": (h, m),
            "logearn_interaction": (h, m, h * m),
            "logearn_interaction_z": (_z(h), m, _z(h) * m),
            "logearn_logheight_male": (torch.log(h), m),
        }[kind]
        return _design(*cols), torch.log(earn)
    return build


def _kidiq(kind: str) -> Callable[[Data], tuple[torch.Tensor, torch.Tensor]]:
    def build(d: Data) -> tuple[torch.Tensor, torch.Tensor]:
        hs, iq = d["mom_hs"], d["mom_iq"]
        if kind == "kidscore_momhs":
            cols: tuple[torch.Tensor, ...] = (hs,)
        elif kind == "kidscore_momiq":
            cols = (iq,)
        elif kind == "kidscore_momhsiq":
            cols = (hs, iq)
        elif kind == "kidscore_interaction":
            cols = (hs, iq, hs * iq)
        elif kind == "kidscore_mom_work":
            w = d["mom_work"]
            cols = ((w == 2).to(hs), (w == 3).to(hs), (w == 4).to(hs))
        else:
            a, b = {"kidscore_interaction_c": (hs - hs.mean(), iq - iq.mean()),
                    "kidscore_interaction_c2": (hs - 0.5, iq - 100),
                    "kidscore_interaction_z": (_z(hs, True), _z(iq, True))}[kind]
            cols = (a, b, a * b)
        return _design(*cols), d["kid_score"]
    return build


def _mesquite(kind: str) -> Callable[[Data], tuple[torch.Tensor, torch.Tensor]]:
    def build(d: Data) -> tuple[torch.Tensor, torch.Tensor]:
        d1, d2, ch, g = d["diam1"], d["diam2"], d["canopy_height"], d["group"]
        if kind == "mesquite":
            return _design(d1, d2, ch, d["total_height"], d["density"], g), d["weight"]
        log = torch.log
        vol, area, shape = log(d1 * d2 * ch), log(d1 * d2), log(d1 / d2)
        cols = {
            "logmesquite": lambda: (log(d1), log(d2), log(ch), log(d["total_height"]), log(d["density"]), g),
            "logmesquite_logva": lambda: (vol, area, g),
            "logmesquite_logvas": lambda: (vol, area, shape, log(d["total_height"]), log(d["density"]), g),
            "logmesquite_logvash": lambda: (vol, area, shape, log(d["total_height"]), g),
            "logmesquite_logvolume": lambda: (vol,),
        }[kind]()
        return _design(*cols), log(d["weight"])
    return build


def _nes(d: Data) -> tuple[torch.Tensor, torch.Tensor]:
    age = d["age_discrete"]
    f = d["real_ideo"]
    cols = (f, d["race_adj"], (age == 2).to(f), (age == 3).to(f), (age == 4).to(f),
            d["educ1"], d["gender"], d["income"])
    return _design(*cols), d["partyid7"]


def _blr(d: Data) -> tuple[torch.Tensor, torch.Tensor]:
    return d["X"], d["y"]


# ------------------------------------------------------------------ other models
def _ark(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
    """``y[t] ~ normal(alpha + sum_k beta[k] y[t - k], sigma)`` for ``t > K``."""
    y, k = d["y"], int(d["K"])
    lags = torch.stack([y[k - j - 1: len(y) - j - 1] for j in range(k)], -1)  # column j: y[t-j-1]

    def model(lags: torch.Tensor, y: torch.Tensor) -> None:
        alpha = pyro.sample("alpha", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
        beta = pyro.sample("beta", _normal_vec(0.0, 10.0, lags.shape[-1], y))
        sigma = pyro.sample("sigma", dist.HalfCauchy(torch.tensor(2.5, dtype=y.dtype)))
        loc = alpha[..., None] + beta @ lags.T
        pyro.sample("y", dist.Normal(loc, sigma[..., None]).to_event(1), obs=y)

    return model, (lags, y[k:])


def _eight_schools_noncentered(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
    def model(sigma: torch.Tensor, y: torch.Tensor) -> None:
        theta_trans = pyro.sample("theta_trans", _normal_vec(0.0, 1.0, len(y), y))
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=y.dtype)))
        theta = pyro.deterministic("theta", theta_trans * tau[..., None] + mu[..., None], event_dim=1)
        pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)

    return model, (d["sigma"], d["y"])


def _eight_schools_draws(draws: Data) -> Data:
    return {**draws, "theta_trans": (draws["theta"] - draws["mu"][:, None]) / draws["tau"][:, None]}


def _gp_regr(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
    """Stan's ``gp_exp_quad_cov(x, alpha, rho) + diag(sigma)``: the noise term is
    ``sigma``, not ``sigma^2``, as the program has it."""
    def model(x: torch.Tensor, y: torch.Tensor) -> None:
        one = torch.tensor(1.0, dtype=y.dtype)
        rho = pyro.sample("rho", dist.Gamma(25 * one, 4 * one))
        alpha = pyro.sample("alpha", dist.HalfNormal(2 * one))
        sigma = pyro.sample("sigma", dist.HalfNormal(one))
        d2 = (x[:, None] - x[None, :]) ** 2
        k = alpha[..., None, None] ** 2 * torch.exp(-d2 / (2 * rho[..., None, None] ** 2))
        cov = k + sigma[..., None, None] * torch.eye(len(x), dtype=y.dtype)
        pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), scale_tril=torch.linalg.cholesky(cov)),
                    obs=y)

    return model, (d["x"], d["y"])


def _log_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:math:`\\log(e^a e^b)` for batches of square matrices."""
    return torch.logsumexp(a[..., :, :, None] + b[..., None, :, :], -2)


def hmm_log_likelihood(log_trans: torch.Tensor, log_emit: torch.Tensor) -> torch.Tensor:
    r"""The forward algorithm of the Stan programs in log space: with
    :math:`\gamma_1 = e_1`, :math:`\gamma_t(k) = \log\sum_j \exp(\gamma_{t-1}(j) +
    \log\theta_{jk}) + e_t(k)`, returns :math:`\log\sum_k \exp\gamma_N(k)` (no initial
    state distribution, as in the programs). ``log_trans``: ``(..., K, K)``, row ``j``
    the log transition probabilities out of state ``j``; ``log_emit``: ``(..., N, K)``.

    The N - 1 steps are matrix products in the (log-sum-exp, +) semiring, reduced
    pairwise in :math:`\lceil\log_2 N\rceil` batched rounds instead of N sequential ones.

    Example (one state: the likelihood is the product of the emissions)::

        >>> float(hmm_log_likelihood(torch.zeros(1, 1), torch.full((5, 1), -1.0)))
        -5.0
    """
    m = log_trans.unsqueeze(-3) + log_emit[..., 1:, None, :]  # (..., N-1, K, K)
    while m.shape[-3] > 1:
        h = m.shape[-3] // 2
        paired = _log_matmul(m[..., 0:2 * h:2, :, :], m[..., 1:2 * h:2, :, :])
        m = torch.cat([paired, m[..., 2 * h:, :, :]], -3)
    first = log_emit[..., 0, :, None]
    if m.shape[-3] == 0:
        return torch.logsumexp(first.squeeze(-1), -1)
    return torch.logsumexp(first + m[..., 0, :, :], (-2, -1))


def _hmm_example(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
    """Two states; ``theta1``, ``theta2`` flat on the simplex (Dirichlet(1, 1)),
    ``mu`` positive-ordered with ``N(3, 1)`` and ``N(10, 1)`` factors,
    ``y[t] ~ normal(mu[z_t], 1)``."""
    def model(y: torch.Tensor) -> None:
        ones = torch.ones(2, dtype=y.dtype, device=y.device)
        theta1 = pyro.sample("theta1", dist.Dirichlet(ones))
        theta2 = pyro.sample("theta2", dist.Dirichlet(ones))
        mu = _flat("mu", positive_ordered, y, (2,))
        prior = dist.Normal(torch.tensor([3.0, 10.0], dtype=y.dtype, device=y.device), 1.0)
        pyro.factor("mu_prior", prior.log_prob(mu).sum(-1))
        log_emit = dist.Normal(mu[..., None, :], 1.0).log_prob(y[:, None])
        log_trans = torch.log(torch.stack([theta1, theta2], -2))
        pyro.factor("forward", hmm_log_likelihood(log_trans, log_emit))

    return model, (d["y"],)


def _hmm_drive(emission: str) -> Callable[[Data], tuple[Callable[..., None], tuple[Any, ...]]]:
    """``theta_k ~ Dirichlet(alpha[k])``; ``phi``, ``lambda`` ordered (positive-ordered
    for exponential emissions) with ``N(0, 1)``, ``N(3, 1)`` factors on their two
    components; emissions of ``u`` and ``v`` exponential with rates ``phi[k]``,
    ``lambda[k]`` (``hmm_drive_0``) or normal with means ``phi[k]``, ``lambda[k]`` and
    sds ``tau``, ``rho`` (``hmm_drive_1``)."""
    def build(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
        def model(u: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor, tau: torch.Tensor,
                  rho: torch.Tensor) -> None:
            theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
            theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
            support = (positive_ordered if emission == "exponential"
                       else constraints.ordered_vector)
            phi = _flat("phi", support, u, (2,))
            lam = _flat("lambda", support, u, (2,))
            prior = dist.Normal(torch.tensor([0.0, 3.0], dtype=u.dtype, device=u.device), 1.0)
            pyro.factor("phi_prior", prior.log_prob(phi).sum(-1))
            pyro.factor("lambda_prior", prior.log_prob(lam).sum(-1))
            if emission == "exponential":
                log_emit = (dist.Exponential(phi[..., None, :]).log_prob(u[:, None])
                            + dist.Exponential(lam[..., None, :]).log_prob(v[:, None]))
            else:
                log_emit = (dist.Normal(phi[..., None, :], tau).log_prob(u[:, None])
                            + dist.Normal(lam[..., None, :], rho).log_prob(v[:, None]))
            log_trans = torch.log(torch.stack([theta1, theta2], -2))
            pyro.factor("forward", hmm_log_likelihood(log_trans, log_emit))

        one = torch.ones((), dtype=d["u"].dtype, device=d["u"].device)
        return model, (d["u"], d["v"], d["alpha"], d.get("tau", one), d.get("rho", one))
    return build


# ------------------------------------------------------------------ ODE models
def rk4(f: Callable[[float, torch.Tensor], torch.Tensor], y0: torch.Tensor, t0: float,
        times: torch.Tensor, max_step: float, knots: tuple[float, ...] = ()) -> torch.Tensor:
    r"""Solve :math:`y' = f(t, y)`, :math:`y(t_0) = y_0` by the classical fixed-step
    Runge-Kutta method of order 4; returns :math:`y` at ``times`` (increasing, after
    ``t0``), shape ``(..., len(times), dim)``. Between consecutive points of ``times`` and
    ``knots`` (extra points to step through, e.g. a fine grid where the solution turns
    fast) the steps are equal and at most ``max_step`` long. Vectorised: ``y0`` and ``f``
    may carry any batch dims; differentiable by autograd.

    Example (:math:`y' = -y`: :math:`y(1) = e^{-1}`)::

        >>> y = rk4(lambda t, y: -y, torch.ones(1, dtype=torch.float64), 0.0,
        ...         torch.tensor([1.0]), max_step=0.1)
        >>> abs(float(y[0, 0]) - math.exp(-1)) < 1e-6
        True
    """
    wanted = [float(t) for t in times]
    out, y, t = [], y0, float(t0)
    for t1 in sorted(set(wanted) | {k for k in knots if k > t0}):
        n = max(1, math.ceil((t1 - t) / max_step - 1e-9))
        h = (t1 - t) / n
        for _ in range(n):
            k1 = f(t, y)
            k2 = f(t + h / 2, y + h / 2 * k1)
            k3 = f(t + h / 2, y + h / 2 * k2)
            k4 = f(t + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t += h
        t = t1
        if t1 in wanted:
            out.append(y)
    return torch.stack(out, -2)


def _lotka_volterra(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
    r"""Predator and prey: ``theta = (alpha, beta, gamma, delta) > 0`` with
    ``normal(1, 0.5)`` priors on ``alpha``, ``gamma`` and ``normal(0.05, 0.05)`` on
    ``beta``, ``delta``, truncated to :math:`(0, \infty)` (:class:`PositiveNormal`);
    ``z_init ~ lognormal(log 10, 1)``, ``sigma ~ lognormal(-1, 1)``; the populations
    ``z`` solve :math:`u' = (\alpha - \beta v) u`, :math:`v' = (-\gamma + \delta u) v`
    from ``z_init`` at time 0; ``y_init ~ lognormal(log z_init, sigma)``,
    ``y[:, k] ~ lognormal(log z[:, k], sigma[k])``. Stan's RK45 (tolerance 1e-5 relative)
    is replaced by :func:`rk4` with steps of 0.1 (largest relative error 2e-6 against
    SciPy at tolerance 1e-11, over 20 reference draws)."""
    def model(ts: torch.Tensor, y_init: torch.Tensor, y: torch.Tensor) -> None:
        dt, dv = y.dtype, y.device
        loc = torch.tensor([1.0, 0.05, 1.0, 0.05], dtype=dt, device=dv)
        scale = torch.tensor([0.5, 0.05, 0.5, 0.05], dtype=dt, device=dv)
        theta = pyro.sample("theta", PositiveNormal(loc, scale).to_event(1))
        z_init = pyro.sample("z_init", dist.LogNormal(torch.full((2,), math.log(10.0), dtype=dt, device=dv),
                                                      1.0).to_event(1))
        sigma_loc = torch.full((2,), -1.0, dtype=dt, device=dv)
        sigma = pyro.sample("sigma", dist.LogNormal(sigma_loc, 1.0).to_event(1))
        a, b, g, e = (theta[..., i] for i in range(4))

        def f(t: float, z: torch.Tensor) -> torch.Tensor:
            u, v = z[..., 0], z[..., 1]
            return torch.stack([(a - b * v) * u, (-g + e * u) * v], -1)

        z = rk4(f, z_init, 0.0, ts, 0.1)
        pyro.sample("y_init", dist.LogNormal(torch.log(z_init), sigma).to_event(1), obs=y_init)
        pyro.sample("y", dist.LogNormal(torch.log(z), sigma[..., None, :]).to_event(2), obs=y)

    return model, (d["ts"], d["y_init"], d["y"])


def _one_comp(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
    r"""One compartment, first-order absorption, Michaelis-Menten elimination:
    ``k_a, K_m, V_m, sigma ~ cauchy(0, 1)`` on :math:`(0, \infty)`;
    :math:`C' = e^{-k_a t} D k_a / V - (V_m / V)\, C / (K_m + C)`, :math:`C(t_0) = 0`;
    ``C_hat ~ lognormal(log C, sigma)``. Stan's BDF solver is replaced by :func:`rk4`
    with steps of 0.1 after a geometric grid over the first half day (25 points from
    5e-7), where a small ``K_m`` makes the start stiff: largest relative error 8e-7
    against SciPy's LSODA at tolerance 1e-11 over 23 reference draws (those with the
    smallest ``K_m``, the largest ``V_m`` and ``k_a`` among them). The program's dose is 0
    at exactly :math:`t = 0`, a single point that does not change the solution."""
    t0 = float(d["t0"])
    knots = tuple((t0 + 0.5 * torch.logspace(-6, 0, 25, dtype=torch.float64)).tolist())

    def model(times: torch.Tensor, c_hat: torch.Tensor, dose: torch.Tensor, volume: torch.Tensor) -> None:
        one = torch.tensor(1.0, dtype=c_hat.dtype)
        k_a = pyro.sample("k_a", dist.HalfCauchy(one))
        k_m = pyro.sample("K_m", dist.HalfCauchy(one))
        v_m = pyro.sample("V_m", dist.HalfCauchy(one))
        sigma = pyro.sample("sigma", dist.HalfCauchy(one))

        def f(t: float, c: torch.Tensor) -> torch.Tensor:
            x = c[..., 0]
            absorbed = torch.exp(-k_a * (t - t0)) * dose * k_a / volume
            return (absorbed - v_m / volume * x / (k_m + x))[..., None]

        start = torch.zeros(k_a.shape + (1,), dtype=c_hat.dtype, device=c_hat.device)
        conc = rk4(f, start, t0, times, 0.1, knots)[..., 0]
        pyro.sample("C_hat", dist.LogNormal(torch.log(conc), sigma[..., None]).to_event(1), obs=c_hat)

    return model, (d["times"], d["C_hat"], d["D"], d["V"])


# ------------------------------------------------------------------ the registry
Builder = Callable[[Data], tuple[Callable[..., None], tuple[Any, ...]]]


def _regression(design: Callable[[Data], tuple[torch.Tensor, torch.Tensor]], response: str,
                beta_prior: str = "flat", sigma_prior: str = "flat") -> Builder:
    model = linear_regression(response, beta_prior, sigma_prior)

    def build(d: Data) -> tuple[Callable[..., None], tuple[Any, ...]]:
        return model, design(d)
    return build


PORTS: dict[str, Builder] = {
    **{k: _regression(_earnings(k), "earn" if k == "earn_height" else
                      "log10_earn" if k == "log10earn_height" else "log_earn")
       for k in ("earn_height", "log10earn_height", "logearn_height", "logearn_height_male",
                 "logearn_interaction", "logearn_interaction_z", "logearn_logheight_male")},
    # the kidiq programs with bounded data declare sigma ~ cauchy(0, 2.5); the
    # kidiq_with_mom_work ones leave it flat
    **{k: _regression(_kidiq(k), "kid_score", sigma_prior="cauchy2.5")
       for k in ("kidscore_momhs", "kidscore_momiq", "kidscore_momhsiq", "kidscore_interaction")},
    **{k: _regression(_kidiq(k), "kid_score")
       for k in ("kidscore_interaction_c", "kidscore_interaction_c2", "kidscore_interaction_z",
                 "kidscore_mom_work")},
    **{k: _regression(_mesquite(k), "weight" if k == "mesquite" else "log_weight")
       for k in ("mesquite", "logmesquite", "logmesquite_logva", "logmesquite_logvas",
                 "logmesquite_logvash", "logmesquite_logvolume")},
    "nes": _regression(_nes, "partyid7"),
    "blr": _regression(_blr, "y", beta_prior="normal10", sigma_prior="normal10"),
    "arK": _ark,
    "eight_schools_noncentered": _eight_schools_noncentered,
    "gp_regr": _gp_regr,
    "hmm_example": _hmm_example,
    "hmm_drive_0": _hmm_drive("exponential"),
    "hmm_drive_1": _hmm_drive("normal"),
    "lotka_volterra": _lotka_volterra,
    "one_comp_mm_elim_abs": _one_comp,
}
"""The ported Stan programs, by posteriordb model name: each builds ``(model, args)``
from the posterior's data."""

DERIVED: dict[str, Callable[[Data], Data]] = {
    "eight_schools_noncentered": _eight_schools_draws,
}
"""Draws of sites that posteriordb does not store (a parameter it reports only through a
transformed parameter), computed from the stored ones."""


# ------------------------------------------------------------------ reading the folder
class PosteriorDBNotFoundError(DatasetNotFoundError, ValueError):
    """No posteriordb folder given, or none where one was named."""


def _database(root: str | os.PathLike[str] | None) -> Path:
    if root is None:
        root = os.environ.get(ENV_VAR)
        if not root:
            raise PosteriorDBNotFoundError(
                f"posteriordb: no folder given: pass root= (a clone of posteriordb or its "
                f"posterior_database folder) or set the environment variable {ENV_VAR}")
    path = Path(root)
    for p in (path / "posterior_database", path):
        if (p / "posteriors").is_dir():
            return p
    raise PosteriorDBNotFoundError(f"posteriordb: expected a folder holding posteriors/ (a posteriordb "
                                   f"clone or its posterior_database folder), got {str(path)!r}")


def _read_json(path: Path) -> Any:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            return json.loads(z.read(z.namelist()[0]))
    return json.loads(path.read_text())


def list_posteriors(root: str | os.PathLike[str] | None = None, ported: bool | None = None) -> list[str]:
    """Names of the posteriors in the folder that have reference draws (sorted);
    ``ported=True``: only those with a Pyro port, ``False``: only those without."""
    db = _database(root)
    names = sorted(p.name[: -len(".json")] for p in (db / "posteriors").glob("*.json"))
    draws = db / "reference_posteriors" / "draws" / "draws"
    names = [n for n in names if (draws / f"{n}.json.zip").exists()]
    if ported is None:
        return names
    return [n for n in names if is_ported(n, db) == ported]


def is_ported(name: str, root: str | os.PathLike[str] | None = None) -> bool:
    """Whether the posterior ``name``'s Stan program has a Pyro port (:data:`PORTS`)."""
    return _read_json(_database(root) / "posteriors" / f"{name}.json")["model_name"] in PORTS


_INDEX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[([0-9, ]+)\])?$")


def stan_draws(chains: list[dict[str, list[float]]], dtype: torch.dtype | None = None) -> Data:
    """posteriordb's draws (a list of chains, each ``{"beta[2]": [...], ...}``) as
    ``{"beta": tensor (draws, *shape)}``, the chains concatenated, Stan's 1-based
    indices made 0-based (``beta[2]`` is ``out["beta"][:, 1]``; ``z[1,2]`` is
    ``out["z"][:, 0, 1]``).

    Example::

        >>> d = stan_draws([{"a": [1.0, 2.0], "b[1]": [3.0, 4.0], "b[2]": [5.0, 6.0]}])
        >>> d["a"].tolist(), d["b"].tolist()
        ([1.0, 2.0], [[3.0, 5.0], [4.0, 6.0]])
    """
    cols: dict[str, dict[tuple[int, ...], list[float]]] = {}
    for chain in chains:
        for key, values in chain.items():
            m = _INDEX.match(key)
            if m is None:
                raise ValueError(f"stan_draws: expected a name like 'beta' or 'beta[2,1]', got {key!r}")
            idx = tuple(int(i) - 1 for i in m.group(2).split(",")) if m.group(2) else ()
            cols.setdefault(m.group(1), {}).setdefault(idx, []).extend(values)
    out = {}
    dtype = dtype or torch.get_default_dtype()
    for name, entries in cols.items():
        n = len(next(iter(entries.values())))
        if not next(iter(entries)):
            out[name] = torch.tensor(entries[()], dtype=dtype)
            continue
        shape = tuple(max(i[d] for i in entries) + 1 for d in range(len(next(iter(entries)))))
        x = torch.full((n,) + shape, math.nan, dtype=dtype)
        for idx, values in entries.items():
            x[(slice(None),) + idx] = torch.tensor(values, dtype=dtype)
        out[name] = x
    return out


_INTEGER_DATA = ("mom_work", "age_discrete", "K", "T", "N")


def _data(raw: dict[str, Any], dtype: torch.dtype) -> Data:
    """Stan's data as tensors: reals (and int vectors used as reals) in ``dtype``;
    integer arrays stay integer where the program compares them (``mom_work``,
    ``age_discrete``), and are cast where a model uses them as reals."""
    out = {}
    for k, v in raw.items():
        t = torch.tensor(v)
        out[k] = t.to(dtype) if t.is_floating_point() or k not in _INTEGER_DATA else t
    return out


@dataclass
class PosteriorDBTarget(Target):
    """A :class:`~pyro_genext.infer.targets.Target` read from posteriordb: ``model``,
    ``args``, ``mean`` and ``sd`` (constrained) and ``ref_mean`` and ``ref_sd``
    (unconstrained) as there, the moments estimated from the reference draws; and:

    Attributes:
        draws: the reference draws by site name, each ``(draws,) + site shape``,
            constrained values as given (plus any :data:`DERIVED` site).
        ess: the smallest bulk effective sample size over the reference's parameters.
        stan_file: the path of the Stan program the model was ported from.
        info: posteriordb's record of the posterior (``posteriors/NAME.json``).
    """

    draws: dict[str, torch.Tensor] = field(default_factory=dict)
    ess: float = math.nan
    stan_file: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def load_posterior(name: str, root: str | os.PathLike[str] | None = None,
                   dtype: torch.dtype | None = None) -> PosteriorDBTarget:
    """The posterior ``name`` of posteriordb as a Pyro model with its data and
    reference draws (see the module docstring). ``root``: the posteriordb folder, else
    ``$PYRO_GENEXT_POSTERIORDB``; ``dtype``: of data and draws (default: torch's
    default dtype).

    Raises ``ValueError`` for a name not in the folder, or one whose Stan program has
    no port, naming the ported ones.
    """
    db = _database(root)
    path = db / "posteriors" / f"{name}.json"
    if not isinstance(name, str) or not path.exists():
        raise ValueError(f"load_posterior: no posterior {name!r} in {db}; ported: "
                         f"{', '.join(list_posteriors(db, ported=True))}")
    info = _read_json(path)
    model_name = info["model_name"]
    if model_name not in PORTS:
        raise ValueError(f"load_posterior: {name!r} (Stan program {model_name!r}) has no Pyro port; "
                         f"ported: {', '.join(list_posteriors(db, ported=True))}")
    dtype = dtype or torch.get_default_dtype()
    data = _data(_read_json(db / "data" / "data" / f"{info['data_name']}.json.zip"), dtype)
    model, args = PORTS[model_name](data)
    ref = info.get("reference_posterior_name") or name
    chains = _read_json(db / "reference_posteriors" / "draws" / "draws" / f"{ref}.json.zip")
    draws = stan_draws(chains, dtype)
    if model_name in DERIVED:
        draws = DERIVED[model_name](draws)
    diag = _read_json(db / "reference_posteriors" / "draws" / "info" / f"{ref}.info.json")["diagnostics"]
    ess = float(min(diag["effective_sample_size_bulk"]))
    sites = latent_sites(model, args)
    mean = {k: draws[k].mean(0) for k in sites}
    sd = {k: draws[k].std(0) for k in sites}
    u = {k: biject_to(s["fn"].support).inv(draws[k]) for k, s in sites.items()}
    return PosteriorDBTarget(
        name, model, args, mean=mean, sd=sd,
        ref_mean={k: v.mean(0) for k, v in u.items()}, ref_sd={k: v.std(0) for k, v in u.items()},
        draws=draws, ess=ess, stan_file=db / "models" / "stan" / f"{model_name}.stan", info=info,
    )


# ------------------------------------------------------------------ densities and checks
def latent_sites(model: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, Any]:
    """The model's latent sample sites (of one unguided run, without validation: the
    values of a :class:`FlatPrior` may make an ODE blow up), in the order it samples them."""
    with torch.no_grad(), pyro.poutine.block(), pyro.validation_enabled(False):
        tr = pyro.poutine.trace(model).get_trace(*args)
    return {k: s for k, s in tr.nodes.items()
            if s["type"] == "sample" and not s["is_observed"]}


def log_density(target: Target, draws: dict[str, torch.Tensor],
                unconstrained: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    r"""The model's log joint density at a batch of draws ``{site: (n,) + shape}``
    (constrained values), all ``n`` at once: returns ``(u, log_p)`` where ``u`` holds
    the unconstrained values (leaf tensors that require grad) and ``log_p`` (shape
    ``(n,)``) the log density in the unconstrained space, :math:`\log p(T(u)) +
    \log|\det J_T(u)|`, where :math:`T` is ``biject_to(support)`` of each site
    (``unconstrained=False``: :math:`\log p(x)`, no Jacobian)."""
    sites = latent_sites(target.model, target.args)
    missing = sorted(set(sites) - set(draws))
    if missing:
        raise ValueError(f"log_density: expected draws of every latent site {sorted(sites)}, "
                         f"missing {missing}")
    n = len(next(iter(draws.values())))
    u, values = {}, {}
    log_det = torch.zeros(n, dtype=draws[next(iter(sites))].dtype)
    for k, s in sites.items():
        t = biject_to(s["fn"].support)
        u[k] = t.inv(draws[k]).detach().requires_grad_(True)
        values[k] = t(u[k])
        if unconstrained:
            log_det = log_det + t.log_abs_det_jacobian(u[k], values[k]).reshape(n, -1).sum(-1)
    tr = pyro.poutine.trace(pyro.poutine.condition(target.model, values)).get_trace(*target.args)
    log_p = log_det
    nodes: list[Any] = list(tr.nodes.values())
    for node in nodes:
        if node["type"] == "sample":
            lp = node["fn"].log_prob(node["value"]) * node.get("scale", 1.0)
            log_p = log_p + lp.reshape(n, -1).sum(-1) if lp.dim() else log_p + lp
    return u, log_p


@dataclass
class ScoreCheck:
    r"""What :func:`score_check` found: ``z_mean[j]`` is :math:`\bar g_j / \mathrm{se}`
    and ``z_cross[i, j]`` is :math:`(\overline{u_i g_j} + \delta_{ij}) / \mathrm{se}`,
    over the unconstrained coordinates ``names``; ``max_z`` the largest of their absolute
    values, ``passed`` whether it is below ``threshold``."""

    names: list[str]
    z_mean: torch.Tensor
    z_cross: torch.Tensor
    max_z: float
    threshold: float
    passed: bool
    num_draws: int


def score_check(target: PosteriorDBTarget, num_draws: int = 2000, threshold: float = 5.0,
                model: Callable[..., Any] | None = None) -> ScoreCheck:
    r"""Check that the model's posterior is the one the reference draws come from, by
    two identities of the score :math:`g(u) = \nabla_u \log p(u)` in the unconstrained
    space (integration by parts, the density vanishing at infinity):
    :math:`\mathbb E[g] = 0` and :math:`\mathbb E[u\, g^\top] = -I`.

    Each is estimated from ``num_draws`` reference draws (evenly spaced over the
    chains; the draws are thinned and nearly independent) with the standard error
    :math:`\mathrm{sd}/\sqrt{n_\text{eff}}`, :math:`n_\text{eff} = n \cdot
    \mathrm{ESS}/N` (the reference's smallest bulk ESS scaled to the subset). The check
    passes if every :math:`|z| <` ``threshold``. ``model``: score another model against
    the same draws (a mutant). The identities hold for any parametrisation of the
    unconstrained space, so Pyro's transforms serve though Stan's differ.
    """
    n_all = len(next(iter(target.draws.values())))
    idx = torch.linspace(0, n_all - 1, min(num_draws, n_all)).round().long()
    draws = {k: v[idx] for k, v in target.draws.items()}
    t = Target(target.name, model or target.model, target.args)
    u, log_p = log_density(t, draws)
    grads = torch.autograd.grad(log_p.sum(), list(u.values()))
    n = len(idx)
    g = torch.cat([gr.reshape(n, -1) for gr in grads], 1).detach()
    x = torch.cat([v.reshape(n, -1) for v in u.values()], 1).detach()
    names = [f"{k}[{i}]" if v[0].numel() > 1 else k for k, v in u.items() for i in range(v[0].numel())]
    n_eff = n * min(1.0, target.ess / n_all) if math.isfinite(target.ess) else n / 2
    z_mean = g.mean(0) / (g.std(0) / math.sqrt(n_eff))
    xc = x - x.mean(0)  # centring u leaves E[u g^T] unchanged (E[g] = 0) and cuts its variance
    prod = xc[:, :, None] * g[:, None, :]
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    z_cross = (prod.mean(0) + eye) / (prod.std(0) / math.sqrt(n_eff))
    max_z = float(torch.cat([z_mean.abs(), z_cross.abs().reshape(-1)]).max())
    return ScoreCheck(names, z_mean, z_cross, max_z, threshold, max_z < threshold, n)
