r"""Where a guide starts: the posterior's mode and its curvature (a Laplace approximation),
found before the variational fit, so that the guide starts inside the support, at the
mode, with a per-coordinate scale that matches the posterior's.

Pyro's autoguides start at ``init_to_median`` of the prior with one ``init_scale`` for
every coordinate. Two things go wrong on real models (measured in docs/real_models.rst):

* a flat prior (``ImproperUniform``, the prior a Stan program leaves unstated) cannot be
  sampled, so ``init_to_median``, ``init_to_feasible`` and ``init_to_uniform`` all raise
  ``NotImplementedError`` before the first step;
* coordinates on very different scales (a regression on raw dollars, a predictor near
  2000 with small spread): Adam moves each parameter by about ``lr`` per step whatever
  its scale, so a location :math:`10^4` away or a posterior sd of :math:`10^4` is out of
  reach in a few thousand steps at ``lr = 5e-3``, while a coordinate with posterior sd
  0.02 jitters at that step size.

:func:`laplace` maximises the log joint density of the **unconstrained** latent vector
(the coordinates an ``AutoContinuous`` guide works in, log-Jacobians included) by L-BFGS
with a strong-Wolfe line search (invariant to the coordinates' scales up to its curvature
estimate), then takes the Hessian there: :math:`\hat u = \arg\max_u \log p(x, u)`,
:math:`\Sigma = (-\nabla^2 \log p(x, \hat u))^{-1}`. :func:`precondition` writes
:math:`\hat u` and :math:`\Sigma` into a guide's affine stage, so the guide starts as
the Laplace approximation and a flow's couplings act on coordinates standardised by it.
:func:`~pyro_genext.infer.fit_guide` does both with ``init="laplace"`` (``init="map"``:
the mode only, the guide's own ``init_scale``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median, init_to_value
from pyro.poutine.util import site_is_subsample

from ..transforms.base import Bijector
from ..transforms.linear import _softplus_inverse

__all__ = ["Laplace", "Standardised", "init_to_support", "laplace", "precondition", "stale_params",
           "start_elbo"]


def init_to_support(site: dict[str, Any]) -> torch.Tensor:
    """An ``init_loc_fn`` that needs no sample: the point of the site's support whose
    unconstrained coordinates are all zero (``0`` on the real line, ``1`` for a positive
    site, the centre of an interval or a simplex). Works for ``ImproperUniform``, where
    Pyro's strategies, which draw from the site, raise ``NotImplementedError``.

    Example::

        >>> import pyro.distributions as dist
        >>> from torch.distributions import constraints
        >>> site = {"fn": dist.ImproperUniform(constraints.positive, (), (2,))}
        >>> init_to_support(site)
        tensor([1., 1.])
    """
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
    dtype, device = _dtype_device(fn)
    return transform(torch.zeros(shape, dtype=dtype, device=device)).detach()


def _dtype_device(fn: Any) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device of a distribution's tensors (through ``base_dist``), or those
    it states (``FlatPrior``); ``(None, None)`` (the defaults) where it has none."""
    seen: set[int] = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        for value in vars(fn).values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.dtype, value.device
        if isinstance(getattr(fn, "device", None), torch.device):
            return getattr(fn, "dtype", None), fn.device
        fn = getattr(fn, "base_dist", None)
    return None, None


def _init_median_or_support(site: dict[str, Any]) -> torch.Tensor:
    try:
        return init_to_median(site, fallback=init_to_support)
    except NotImplementedError:  # a distribution that cannot be sampled (ImproperUniform)
        return init_to_support(site)


@contextmanager
def _rng_kept() -> Iterator[None]:
    """Run the block on saved random states, restored after it (also on an error): the
    host's torch, numpy and ``random`` states, and every CUDA device's if CUDA is in use."""
    state = pyro.util.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        pyro.util.set_rng_state(state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@dataclass
class Laplace:
    r"""A Laplace approximation of a posterior in the unconstrained coordinates of an
    ``AutoContinuous`` guide (sites in the order the model samples them, each flattened).

    Attributes:
        loc: the mode :math:`\hat u` of the unconstrained log joint, shape ``(D,)``.
        cov: :math:`\Sigma = (-\nabla^2 \log p(x, \hat u))^{-1}`, shape ``(D, D)``.
        values: the mode of each latent site in its support (constrained), for
            ``init_to_value``.
        log_joint: :math:`\log p(x, \hat u)`.
        converged: whether the Newton steps met their tolerance at a point where the
            negative Hessian is positive definite.
    """

    loc: torch.Tensor
    cov: torch.Tensor
    values: dict[str, torch.Tensor]
    log_joint: float
    converged: bool

    @property
    def scale(self) -> torch.Tensor:
        """The marginal standard deviations :math:`\\sqrt{\\Sigma_{ii}}`."""
        return self.cov.diagonal().sqrt()


def _hessian(target: Callable[[torch.Tensor], torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    hess = torch.autograd.functional.hessian(lambda v: -target(v), u.detach())
    return 0.5 * (hess + hess.T)


class _Unconstrained:
    """The model's log joint density as a function of the flat unconstrained vector."""

    def __init__(self, model: Callable[..., Any], args: Any, kwargs: Any,
                 init_loc_fn: Callable[..., Any]) -> None:
        with poutine.block():
            trace = poutine.trace(InitMessenger(init_loc_fn)(model)).get_trace(*args, **kwargs)
        self.model, self.args, self.kwargs = model, args, kwargs
        self.sites = []
        start = []
        for name, site in trace.iter_stochastic_nodes():
            if site_is_subsample(site):
                continue
            fn: Any = site["fn"]
            value: torch.Tensor = site["value"]  # type: ignore[assignment]
            if fn.support.is_discrete:
                raise ValueError(f"laplace: site {name!r} is discrete; expected continuous latent sites")
            t = biject_to(fn.support)
            u = t.inv(value.detach())
            self.sites.append((name, t, u.shape, value.shape))
            start.append(u.reshape(-1))
        if not self.sites:
            raise ValueError("laplace: the model has no latent sites")
        # the start in the model's dtype and device: init_to_support's zeros are the default
        # dtype on the host, which for a float64 model on raw scales lost the mode by a sd
        ref = torch.as_tensor(trace.log_prob_sum())  # (a float where no site has a density)
        self.start = torch.cat(start).to(dtype=ref.dtype, device=ref.device)

    def unpack(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        values, ladj, i = {}, u.new_zeros(()), 0
        for name, t, ushape, xshape in self.sites:
            n = math.prod(ushape)
            piece = u[i:i + n].reshape(ushape)
            x = t(piece)
            values[name] = x.reshape(xshape)
            ladj = ladj + t.log_abs_det_jacobian(piece, x).sum()
            i += n
        return values, ladj

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        values, ladj = self.unpack(u)
        with poutine.block():
            trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace(
                *self.args, **self.kwargs)
        return trace.log_prob_sum() + ladj


def _value(target: _Unconstrained, u: torch.Tensor) -> float:
    """The log joint at ``u``, ``-inf`` where the model cannot be evaluated (a parameter
    outside its distribution's support: Pyro's validation raises ``ValueError``; a
    Cholesky factorisation of the model fails with a ``RuntimeError``)."""
    try:
        with torch.no_grad():
            value = float(target(u))
    except (ValueError, RuntimeError):  # Pyro's validation; a model's LinAlgError
        return -math.inf
    return value if math.isfinite(value) else -math.inf


def _lbfgs(target: _Unconstrained, start: torch.Tensor, max_iter: int, tolerance: float) -> torch.Tensor:
    """L-BFGS with a strong-Wolfe line search from ``start``. A trial point where the
    model fails (a first step of unit length overflowing a rate: an HMM of posteriordb
    from some prior medians) restarts it from the start with a step ten times shorter,
    at most three times; the point with the highest log joint reached is returned."""
    best, best_value = start.clone(), _value(target, start)
    for lr in (1.0, 0.1, 0.01):
        u = start.clone().requires_grad_(True)
        optim = torch.optim.LBFGS([u], lr=lr, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=tolerance * 1e-2, history_size=50,
                                  line_search_fn="strong_wolfe")

        def closure(u: torch.Tensor = u) -> torch.Tensor:
            loss = -target(u)  # the gradient of u only: a model's pyro.param keeps its .grad
            (u.grad,) = torch.autograd.grad(loss, u)
            return loss.detach()

        try:
            optim.step(closure)
        except (ValueError, RuntimeError):
            continue
        value = _value(target, u.detach())
        if value > best_value:
            best, best_value = u.detach().clone(), value
        if math.isfinite(value):
            break
    return best


def _newton(target: _Unconstrained, u: torch.Tensor, steps: int,
            tolerance: float) -> tuple[torch.Tensor, bool]:
    """At most ``steps`` Newton steps with backtracking; whether the squared Newton
    decrement fell below ``2 * tolerance`` at a point with a positive definite negative
    Hessian."""
    for _ in range(steps):
        v = u.clone().requires_grad_(True)
        loss = -target(v)
        (grad,) = torch.autograd.grad(loss, v)
        hess = _hessian(target, u)
        chol, info = torch.linalg.cholesky_ex(hess)
        if info != 0 or not torch.isfinite(grad).all():
            return u, False
        step = torch.cholesky_solve(grad[:, None], chol)[:, 0]
        decrement = float(grad @ step)  # the squared Newton decrement: invariant to scale
        if decrement < tolerance * 2:
            return u, True
        t, base = 1.0, float(loss.detach())
        while t > 1e-4:  # backtracking
            trial = u - t * step
            value = -_value(target, trial)
            if math.isfinite(value) and value <= base - 0.25 * t * decrement:
                break
            t /= 2
        else:
            return u, False
        u = trial
    return u, False


def start_elbo(model: Callable[..., Any], loc: torch.Tensor, scale_tril: torch.Tensor, *args: Any,
               num_draws: int = 64, seed: int = 0, **kwargs: Any) -> float:
    r"""The ELBO of the Gaussian :math:`\mathcal N(m, L L^\top)` over ``model``'s flat
    unconstrained latent vector (sites in the order the model samples them, as for
    :func:`laplace`), estimated from ``num_draws`` draws of a generator seeded ``seed`` on
    ``loc``'s device (the global random state is not used): :math:`\frac1N \sum_n \log
    p(x, u_n) - \log q(u_n)`. ``-inf`` where the model cannot be evaluated at a draw.
    ``loc`` ``(D,)`` and ``scale_tril`` ``(D, D)``, lower triangular with a positive
    diagonal, for the model's :math:`D` unconstrained coordinates; ``num_draws >= 1``.

    A flow guide of this library at its own start *is* such a Gaussian
    (:math:`m` from its ``init_loc_fn``, :math:`L = \text{init\_scale}\, I`), its
    couplings at the identity (exactly so with ``init_coupling_scale=0``, the default).

    Example (the conjugate model of :func:`laplace`: its Laplace approximation is the
    posterior, so every draw's log weight is the log evidence,
    :math:`\log \mathcal N(y; 0, I + 1 1^\top) = -\tfrac32 \log 2\pi - \tfrac12 \log 4 -
    \tfrac38 = -3.825` for :math:`y = (1, 1, 1)`; a start one sd away is lower)::

        >>> import pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.ones(3)
        >>> fit = laplace(model, y)
        >>> round(start_elbo(model, fit.loc, fit.cov.sqrt(), y), 3)
        -3.825
        >>> start_elbo(model, fit.loc + 0.5, fit.cov.sqrt(), y) < -3.83
        True
    """
    return _start_elbo(model, loc, scale_tril, args, kwargs, num_draws=num_draws, seed=seed)


def _start_elbo(model: Callable[..., Any], loc: torch.Tensor, scale_tril: torch.Tensor, args: Any,
                kwargs: Any, num_draws: int = 64, seed: int = 0) -> float:
    """:func:`start_elbo` with the model's arguments as a tuple and a dict (no keyword of
    the model can collide with ``num_draws`` or ``seed``)."""
    if not (isinstance(num_draws, int) and not isinstance(num_draws, bool) and num_draws >= 1):
        raise ValueError(f"start_elbo: expected num_draws an integer >= 1, got {num_draws!r}")
    with _rng_kept():  # the layout; a prior draws on the data's device, and the draw is forgotten
        target = _Unconstrained(model, args, kwargs, _init_median_or_support)
    d = len(target.start)
    if loc.shape != (d,) or scale_tril.shape != (d, d):
        raise ValueError(f"start_elbo: expected loc ({d},) and scale_tril ({d}, {d}) for the model's {d} "
                         f"unconstrained coordinates, got {tuple(loc.shape)} and {tuple(scale_tril.shape)}")
    if not (torch.equal(scale_tril, scale_tril.tril()) and bool((scale_tril.diagonal() > 0).all())):
        raise ValueError("start_elbo: expected scale_tril lower triangular with a positive diagonal")
    loc = loc.to(target.start)
    scale_tril = scale_tril.to(target.start)
    gen = torch.Generator(device=loc.device).manual_seed(seed)
    eps = torch.randn(num_draws, d, generator=gen, dtype=loc.dtype, device=loc.device)
    log_q = (-0.5 * (eps * eps).sum(-1) - scale_tril.diagonal().log().sum()
             - 0.5 * d * math.log(2 * math.pi))
    total = 0.0
    for e, lq in zip(loc + eps @ scale_tril.T, log_q):
        total += _value(target, e) - float(lq)
    return total / num_draws


def laplace(
    model: Callable[..., Any],
    *args: Any,
    init_loc_fn: Callable[..., Any] | None = None,
    max_iter: int = 500,
    newton_steps: int = 50,
    tolerance: float = 1e-4,
    **kwargs: Any,
) -> Laplace:
    r"""The mode of ``model``'s posterior in the unconstrained space and the inverse of the
    negative Hessian there; see the module docstring.

    The model runs as written: with a subsampling plate the log joint is a noisy
    estimate and L-BFGS is not meant for that; pass the full data for this step.

    Args:
        model: a Pyro model with continuous latent sites; ``*args, **kwargs`` go to it.
        init_loc_fn: where L-BFGS starts; default ``init_to_median`` of the prior, or
            :func:`init_to_support` for a site that cannot be sampled.
        max_iter: the most L-BFGS iterations.
        newton_steps: the most Newton steps after L-BFGS.
        tolerance: half the squared Newton decrement :math:`g^\top H^{-1} g / 2` (the
            predicted gain of log density of another step) at which the mode is found.

    Example (the conjugate model of :func:`~pyro_genext.infer.fit_guide`: the posterior
    of ``mu`` is :math:`N(3/4, 1/4)`, Gaussian, so the Laplace approximation is exact)::

        >>> import pyro, pyro.distributions as dist
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> fit = laplace(model, torch.ones(3))
        >>> round(float(fit.loc), 4), round(float(fit.scale), 4), fit.converged
        (0.75, 0.5, True)
    """
    return _laplace(model, args, kwargs, init_loc_fn=init_loc_fn, max_iter=max_iter,
                    newton_steps=newton_steps, tolerance=tolerance)


def _laplace(model: Callable[..., Any], args: Any, kwargs: Any, init_loc_fn: Callable[..., Any] | None = None,
             max_iter: int = 500, newton_steps: int = 50, tolerance: float = 1e-4) -> Laplace:
    """:func:`laplace` with the model's arguments as a tuple and a dict (no keyword of the
    model can collide with the options)."""
    if not callable(model):
        raise TypeError(f"laplace: expected a callable model, got {type(model).__name__}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"laplace: expected max_iter an integer >= 1, got {max_iter!r}")
    if not (isinstance(tolerance, float) and tolerance > 0):
        raise ValueError(f"laplace: expected tolerance a float > 0, got {tolerance!r}")
    target = _Unconstrained(model, args, kwargs, init_loc_fn or _init_median_or_support)
    # L-BFGS from far away into the mode's basin, then Newton steps, which L-BFGS's
    # curvature estimate needs on badly scaled coordinates (raw dollars: it stopped 6 sds
    # short of the earnings mode in float32). L-BFGS in float32 can also stop early where
    # the log joint is large (it stops on a change below ``tolerance * 1e-2``, finer than
    # float32 resolves at 1e4): where the Newton steps then fail (an indefinite Hessian,
    # earnings from some starts of sigma), L-BFGS restarts from where they left off, up to
    # three times, while it still gains.
    u = _lbfgs(target, target.start, max_iter, tolerance)
    for _ in range(4):
        u, converged = _newton(target, u, newton_steps, tolerance)
        if converged:
            break
        again = _lbfgs(target, u, max_iter, tolerance)
        if not _value(target, again) > _value(target, u) + tolerance:
            break
        u = again
    hess = _hessian(target, u)
    chol, info = torch.linalg.cholesky_ex(hess)
    if info != 0:  # not a strict maximum: keep the mode, with unit scales
        cov, converged = torch.eye(len(u), dtype=u.dtype, device=u.device), False
    else:
        cov = torch.cholesky_inverse(chol)
    values, _ = target.unpack(u)
    with torch.no_grad():
        log_joint = float(target(u))
    return Laplace(u, cov, {k: v.detach() for k, v in values.items()}, log_joint, converged)


class Standardised(Bijector):
    r"""The fixed affine map :math:`z = m + L w` (:math:`L` lower triangular with a
    positive diagonal), :math:`\log|\det J| = \sum_i \log L_{ii}`; ``m`` and ``L``
    are buffers, not parameters: the coordinates a preconditioned flow guide learns in.

    Example::

        >>> t = Standardised(torch.tensor([1.0, 2.0]), torch.tensor([[2.0, 0.0], [1.0, 3.0]]))
        >>> t(torch.ones(2))
        tensor([3., 6.])
    """

    loc: torch.Tensor
    scale_tril: torch.Tensor

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        d = loc.shape[-1]
        if loc.shape != (d,) or scale_tril.shape != (d, d) or not (scale_tril.diagonal() > 0).all():
            raise ValueError("Standardised: expected loc (D,) and a lower-triangular (D, D) scale_tril with "
                             f"a positive diagonal, got {tuple(loc.shape)} and {tuple(scale_tril.shape)}")
        super().__init__((d,))
        self.register_buffer("loc", loc.detach().clone())
        self.register_buffer("scale_tril", scale_tril.detach().tril().clone())

    def _ladj(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_tril.diagonal().log().sum().expand(x.shape[:-1])

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc + x @ self.scale_tril.T, self._ladj(x)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.linalg.solve_triangular(self.scale_tril, (y - self.loc).unsqueeze(-1), upper=False)
        return w.squeeze(-1), self._ladj(y)


def stale_params(guide: Any) -> list[str]:
    """The names in Pyro's param store that ``guide``'s first call would load (those
    under its ``_pyro_name``)."""
    name = guide._pyro_name
    return [k for k in pyro.get_param_store().keys()
            if k.startswith(name) and k[len(name):][:1] in (".", "$")]


def precondition(guide: Any, fit: Laplace, model: Callable[..., Any], *args: Any, scale: bool = True,
                 **kwargs: Any) -> Any:
    r"""Start ``guide`` at the Laplace approximation ``fit`` of ``model``. Builds the guide's
    parameters for the model's arguments ``*args, **kwargs`` (the guide's own
    ``init_loc_fn`` is not run: it may not be able to, on a flat prior); call it on a
    fresh guide, before its first call. Returns the guide.

    A flow guide (:class:`~pyro_genext.infer.AutoRealNVP`,
    :class:`~pyro_genext.infer.AutoNICE`) gets a fixed last stage :class:`Standardised`,
    :math:`z = \hat u + \operatorname{chol}(\Sigma)\, w` (with ``scale=False``:
    :math:`z = \hat u + \sigma_0 w`, :math:`\sigma_0` the guide's ``init_scale``), and its
    learnt affine stage restarts at the identity; so at the start the guide *is* the
    Laplace approximation, and every learnt parameter (the affine stage's location and
    scale, the couplings) works in units of the posterior's sds, which is what Adam's
    steps of about ``lr`` per parameter need. (Writing the mode and scales into the learnt
    stage instead leaves a location whose sd is :math:`10^{-2}` jittering by ``lr`` per
    step: measured in docs/real_models.rst.) The fixed stage is a buffer of the guide's
    flow, recorded in Pyro's param store too (read by the guide, never optimised), so a
    saved and loaded param store restores it in a fresh guide.
    Pyro's ``AutoMultivariateNormal`` gets the Laplace approximation in its own
    parameters (``loc``, ``scale``, ``scale_tril``).

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro_genext.infer import AutoRealNVP
        >>> pyro.clear_param_store()
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.tensor([1e4, 0.0]), torch.tensor([1e3, 1e-2])).to_event(1))
        >>> guide = precondition(AutoRealNVP(model), laplace(model), model)
        >>> stage = guide.flow[-1]
        >>> [round(float(v), 3) for v in stage.loc], [round(float(v), 3) for v in stage.scale_tril.diagonal()]
        ([10000.0, 0.0], [1000.0, 0.01])
    """
    return _precondition(guide, fit, model, args, kwargs, scale=scale)


def _precondition(guide: Any, fit: Laplace, model: Callable[..., Any], args: Any, kwargs: Any,
                  scale: bool = True) -> Any:
    """:func:`precondition` with the model's arguments as a tuple and a dict."""
    from .autoguide import AutoCouplingFlow

    if not isinstance(guide, (AutoCouplingFlow, AutoMultivariateNormal)):
        raise TypeError("precondition: expected an AutoRealNVP, AutoNICE or AutoMultivariateNormal "
                        f"guide, got {type(guide).__name__}")
    if not isinstance(fit, Laplace):
        raise TypeError(f"precondition: expected a Laplace (from laplace()), got {type(fit).__name__}")
    if guide.prototype_trace is not None:
        raise ValueError("precondition: the guide's parameters are already built; precondition a "
                         "fresh guide (before its first call)")
    stale = stale_params(guide)
    if stale:  # the guide's first call would load them over the preconditioned values
        raise ValueError(f"precondition: Pyro's param store already holds parameters under the "
                         f"guide's name {guide._pyro_name!r} (e.g. {stale[0]!r}), which the guide's "
                         "first call would load over the preconditioned start; call "
                         "pyro.clear_param_store() first")
    # Pyro's autoguides wrap the model in their init_loc_fn at construction (AutoGuide._model);
    # build the prototype from the mode instead, then put the guide's model back
    own = guide._model
    guide._model = (InitMessenger(init_to_value(values=fit.values, fallback=init_to_support))(model),)
    try:
        guide._setup_prototype(*args, **kwargs)
    finally:
        guide._model = own
    if guide.latent_dim != len(fit.loc):
        raise ValueError(f"precondition: the guide has {guide.latent_dim} unconstrained coordinates, "
                         f"the Laplace approximation {len(fit.loc)}")
    with torch.no_grad():
        if not isinstance(guide, AutoCouplingFlow):  # Pyro's: into its own parameters
            guide.loc.copy_(fit.loc)
            if scale:
                chol = torch.linalg.cholesky(fit.cov)
                sd = chol.diagonal()
                guide.scale = sd  # PyroParams with their constraints
                guide.scale_tril = chol / sd[:, None]
            return guide
        # a flow: a fixed stage z = u_hat + chol(Sigma) w after the learnt one, which then
        # starts at the identity and learns in units of the posterior's sds
        chol = torch.linalg.cholesky(fit.cov) if scale else torch.diag(
            torch.full_like(fit.loc, guide._init_scale))
        learnt: Any = guide.flow[-1]
        learnt.loc.zero_()
        learnt.raw_scale.copy_(_softplus_inverse(torch.ones_like(fit.loc)))
        guide._attach_standardised(fit.loc, chol)  # also into the param store: save/load keep it
    return guide
