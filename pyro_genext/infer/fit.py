r"""A fitting loop for any Pyro model and guide: :func:`fit_guide`.

Pyro leaves the loop to the user (``for step in range(n): svi.step(...)``); NumPyro has
``SVI.run``. This is the loop, with what a variational fit needs besides the step:

* the objective as a module: Pyro's :class:`~pyro.infer.elbo.ELBOModule`
  (``Trace_ELBO(...)(model, guide)``, whose forward is the differentiable loss), or the
  importance-weighted bound :math:`\mathcal L_K = \mathbb E \log \frac1K \sum_k w_k`
  (Burda et al. 2015, arXiv:1509.00519) with ``objective="iwae"``;
* **one** ``torch.optim.Adam(foreach=True)`` over every parameter of model and guide
  (Pyro's ``pyro.optim`` wrappers run one optimiser per parameter tensor), created after
  the first evaluation of the loss, since autoguides build their parameters lazily on
  their first call;
* gradient clipping by the global norm, a learning rate decaying exponentially from
  ``lr`` to ``lr * final_lr`` by ``num_steps``;
* a stopping rule on the smoothed loss (see :func:`fit_guide`), a progress bar, and the
  loss history.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.poutine as poutine
import pyro.util
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import plate_log_prob_sum

__all__ = ["FitResult", "ImportanceWeightedELBO", "fit_guide"]


class ImportanceWeightedELBO(Trace_ELBO):
    r"""The importance-weighted bound :math:`\mathcal L_K = \mathbb E\,\log\frac1K
    \sum_{k=1}^K p(x, z_k)/q(z_k)`, :math:`z_k \sim q` (Burda, Grosse, Salakhutdinov 2015,
    arXiv:1509.00519), as a loss ``-L_K`` with vectorised particles; :math:`\mathcal L_1`
    is the ELBO and :math:`\mathcal L_K` rises to :math:`\log p(x)` as :math:`K` grows.
    The same bound as Pyro's ``RenyiELBO(alpha=0)``, with a ``differentiable_loss`` (so
    ``ImportanceWeightedELBO(K)(model, guide)`` is an ``ELBOModule``).

    With a guide whose ``log_prob`` holds its parameters fixed (``AutoRealNVP(stl=True)``)
    the gradient is the doubly reparametrised one, DReG (Tucker, Lawson, Gu, Maddison
    2018, arXiv:1810.04152): the normalised weights enter squared, and the estimator's
    variance goes to zero at the exact posterior. That is the right gradient for the
    guide's parameters only: fit models with learnable parameters with a guide without
    ``stl`` (the plain IWAE gradient).

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> pyro.clear_param_store()
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = AutoNormal(model, init_scale=1.0)
        >>> abs(ImportanceWeightedELBO(10).loss(model, guide)) < 1e-5  # q = p: log p(x) = 0
        True
    """

    def __init__(self, num_particles: int = 10, max_plate_nesting: float = float("inf")) -> None:
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=max_plate_nesting)

    def _log_weights(self, model: Any, guide: Any, args: Any, kwargs: Any) -> torch.Tensor:
        (model_trace, guide_trace), = self._get_traces(model, guide, args, kwargs)
        guide_trace.pack_tensors()
        model_trace.pack_tensors(guide_trace.plate_to_symbol)
        # with one particle Pyro adds no particle plate: "" sums everything to a scalar
        symbol = guide_trace.plate_to_symbol.get("num_particles_vectorized", "")
        return plate_log_prob_sum(model_trace, symbol) - plate_log_prob_sum(guide_trace, symbol)

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        lw = self._log_weights(model, guide, args, kwargs)
        bound = torch.logsumexp(lw, 0) - math.log(lw.numel())
        if getattr(guide, "stl", False):  # DReG: sum_k (w_k / sum w)^2 d log w_k, path only
            w = torch.softmax(lw.detach(), 0)
            return -(bound.detach() + (w**2 * (lw - lw.detach())).sum())
        return -bound

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


@dataclass
class FitResult:
    """What :func:`fit_guide` did.

    Attributes:
        losses: the loss of every step (the negative ELBO estimate, or of the
            importance-weighted bound), as floats.
        num_steps: steps run (fewer than asked if the plateau rule stopped the fit).
        stopped_early: whether the plateau rule stopped it.
        window_means: the smoothed curve the rule looked at: the mean loss of each
            complete window of ``window`` steps.
        seconds: wall-clock time of the loop.
    """

    losses: list[float]
    num_steps: int
    stopped_early: bool
    window_means: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"fit_guide: expected {name} {expected}, got {value!r}")


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_vectorised(elbo: Trace_ELBO, model: Any, guide: Any, args: Any, kwargs: Any) -> None:
    """Refuse a model that puts the particles outside the ELBO's plates: Pyro's vectorised
    ELBOs check only the rightmost ``max_plate_nesting`` dims of a site and sum the rest,
    so such a model counts its likelihood once per particle, silently. Run on saved and
    restored random number generators: the fit draws what it would draw without it."""
    state = pyro.util.get_rng_state()
    try:
        with torch.random.fork_rng(), torch.no_grad():
            traces = next(iter(elbo._get_traces(model, guide, args, kwargs)))
    finally:
        pyro.util.set_rng_state(state)
    for trace in traces:
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and len(site["fn"].batch_shape) > elbo.max_plate_nesting:
                raise ValueError(
                    f"fit_guide: site {name!r} has batch shape {tuple(site['fn'].batch_shape)} "
                    f"under the plate of {elbo.num_particles} particles, more dims than the "
                    f"{elbo.max_plate_nesting} of the plates: the model is not vectorised (index "
                    "latent values with `...`; no unsqueeze of a value that a plate batches), "
                    "or pass vectorize_particles=False"
                )


def fit_guide(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_steps: int = 4000,
    lr: float = 5e-3,
    final_lr: float = 0.1,
    num_particles: int = 8,
    objective: str = "elbo",
    vectorize_particles: bool = True,
    clip_norm: float | None = 10.0,
    stop_on_plateau: bool = True,
    window: int | None = None,
    patience: int = 4,
    min_improvement: float = 0.0,
    plateau_factor: float = 0.3,
    progress_bar: bool = True,
    init: str | None = None,
    temper: int = 0,
    temper_start: float = 0.01,
    **kwargs: Any,
) -> FitResult:
    r"""Fit ``guide`` (and any ``pyro.param`` of ``model``) by stochastic variational
    inference; returns a :class:`FitResult`. Works with any Pyro guide (``AutoNormal``,
    ``AutoMultivariateNormal``, ``AutoIAFNormal``, :class:`~pyro_genext.infer.AutoRealNVP`,
    a hand-written one). The particles are vectorised: the model and guide must run under
    an extra outer plate, as for ``Trace_ELBO(vectorize_particles=True)``; one whose
    sites gain a dim outside the plates is refused before the first step (Pyro's ELBO
    would count its likelihood once per particle, silently); pass
    ``vectorize_particles=False`` for a model that cannot (one run per particle, slower).

    Each step: ``num_particles`` vectorised particles of the objective (``"elbo"``:
    ``Trace_ELBO``; ``"iwae"``: :class:`ImportanceWeightedELBO` with
    :math:`K` = ``num_particles``), a backward pass, the gradient clipped to global
    norm ``clip_norm``, one step of a single ``Adam(foreach=True)`` over all
    parameters, the learning rate multiplied by ``final_lr ** (1 / num_steps)``.

    Stopping rule (``stop_on_plateau``): the losses are averaged over windows of
    ``window`` steps (default ``max(25, num_steps // 50)``). A window *improves* if its
    mean is below the best earlier window mean by more than
    ``max(min_improvement, 2 se)``, where :math:`\mathrm{se}` is the standard error of
    the difference of the two means (from the spread of the losses in each window). After
    ``patience`` windows in a row without improvement (the smoothed loss has not moved by
    more than its noise for ``patience * window`` steps) the learning rate is multiplied
    by ``plateau_factor``, down to no less than ``lr * final_lr``; on a plateau at that
    final rate the fit stops. So a fit stops early only where the loss has stopped
    improving at the small step size that ends a full schedule, and not with parameters
    still jittering at a large one.

    The rule watches the objective. The importance-weighted bound is flatter near the
    posterior than the ELBO (it is exact for any guide as :math:`K \to \infty`), so with
    ``objective="iwae"`` it can stop while the guide's moments still move: on a conjugate
    normal model it stopped at 350 of 800 steps with the posterior mean at 0.70 (exact
    0.84; 0.83 after all 800 steps). Pass ``stop_on_plateau=False`` with that objective.

    Args:
        model, guide: the Pyro model and guide; ``*args, **kwargs`` go to both.
        num_steps: the most steps to run.
        lr, final_lr: the initial learning rate and the fraction of it reached at
            ``num_steps``.
        num_particles: particles per step (:math:`K` of the importance-weighted bound).
        objective: ``"elbo"`` or ``"iwae"``.
        vectorize_particles: run the particles as one vectorised batch (``"iwae"``
            needs it).
        clip_norm: global gradient-norm bound, or ``None``.
        stop_on_plateau, window, patience, min_improvement, plateau_factor: the
            stopping rule.
        progress_bar: show a ``tqdm`` bar with the smoothed loss.
        init: where the guide starts. ``None``: where the guide's own
            ``init_loc_fn`` and ``init_scale`` put it. ``"laplace"``: at the
            posterior's mode with the Laplace approximation's covariance in its
            affine stage (:func:`~pyro_genext.infer.init.laplace` then
            :func:`~pyro_genext.infer.init.precondition`; a fresh ``AutoRealNVP``,
            ``AutoNICE`` or ``AutoMultivariateNormal``); ``"map"``: at the mode with
            the guide's own scale. Use ``"laplace"`` for models with flat priors
            (``ImproperUniform``, which Pyro's initialisations cannot sample) or
            coordinates on very different scales: on posteriordb's ``earnings`` (raw
            dollars, flat priors) the start at ``b = 0, sigma = 1`` ends in a NaN loss
            at step 12, ``"laplace"`` within 0.023 reference sds of the means and 1.3 %
            of the sds on three seeds (docs/real_models.rst). It costs an L-BFGS run and a
            Hessian (:math:`D` gradient evaluations) before the first step, and runs
            the model as written (not for a model that subsamples its data).
        temper, temper_start: likelihood tempering (:mod:`~pyro_genext.infer.tempering`):
            for the first ``temper`` steps the observed sites' log-density (``obs=``
            and ``pyro.factor`` sites) is weighted by :math:`\beta` rising
            geometrically from ``temper_start`` to 1, so the guide starts from the
            prior's spread; ``0`` (the default) fits the posterior from the start.
            The stopping rule waits for the end of the schedule, and ``losses`` before
            it are of the tempered objective. On a two-mode target with the modes 12 sds
            apart, ``temper=num_steps // 2`` kept both modes, near balanced, on two
            seeds of three; the default and ``objective="iwae"`` lost one mode on two
            seeds and kept 27 % and 33 % in it on the third. It ran 1400 steps against
            the default's 520-880 (docs/real_models.rst).

    Example (a conjugate model: the posterior of ``mu`` is :math:`N(3/4, 1/4)`)::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> pyro.clear_param_store(); pyro.set_rng_seed(0)
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> guide = AutoNormal(model)
        >>> result = fit_guide(model, guide, torch.ones(3), num_steps=1500, lr=0.05,
        ...                    progress_bar=False)
        >>> loc, scale = float(guide.locs.mu.detach()), float(guide.scales.mu.detach())
        >>> abs(loc - 0.75) < 0.03, abs(scale - 0.5) < 0.03, result.stopped_early
        (True, True, True)

    References: the step size, particles, decay and clipping are those of the plain loop
    of issue 15; Agrawal, Sheldon, Domke (2020), arXiv:2006.10343, for importance-weighted
    training. The loop follows NumPyro's ``SVI.run``.
    """
    _check("model", model, callable(model), "a callable")
    _check("guide", guide, callable(guide), "a callable")
    _check("num_steps", num_steps, _whole(num_steps) and num_steps >= 1, "an integer >= 1")
    _check("lr", lr, _finite(lr) and lr > 0, "a finite number > 0")
    _check("final_lr", final_lr, _finite(final_lr) and 0 < final_lr <= 1, "in (0, 1]")
    _check("num_particles", num_particles, _whole(num_particles) and num_particles >= 1,
           "an integer >= 1")
    _check("objective", objective, objective in ("elbo", "iwae"), "'elbo' or 'iwae'")
    _check("clip_norm", clip_norm, clip_norm is None or (_finite(clip_norm) and clip_norm > 0),
           "a finite number > 0 or None")
    _check("plateau_factor", plateau_factor, _finite(plateau_factor) and 0 < plateau_factor < 1,
           "in (0, 1)")
    _check("patience", patience, _whole(patience) and patience >= 1, "an integer >= 1")
    _check("min_improvement", min_improvement, _finite(min_improvement) and min_improvement >= 0,
           "a finite number >= 0")
    win = max(25, num_steps // 50) if window is None else window
    _check("window", window, _whole(win) and win >= 2, "an integer >= 2 or None")

    _check("init", init, init in (None, "map", "laplace"), "None, 'map' or 'laplace'")
    _check("temper", temper, _whole(temper) and 0 <= temper <= num_steps, "an integer in [0, num_steps]")
    _check("temper_start", temper_start, _finite(temper_start) and 0 < temper_start <= 1, "in (0, 1]")

    if init is not None:  # start at the posterior's mode (issue 24)
        from .init import laplace, precondition

        fit = laplace(model, *args, **kwargs)
        precondition(guide, fit, model, *args, scale=init == "laplace", **kwargs)
    if objective == "iwae" and not vectorize_particles:
        raise ValueError("fit_guide: objective='iwae' needs vectorize_particles=True")
    tempered = None
    if temper:  # the likelihood's weight rises to 1 over the first `temper` steps (issue 24)
        from .tempering import TemperObserved, tempering_weight

        tempered = TemperObserved(temper_start)
        model = tempered(model)
    elbo = (Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize_particles)
            if objective == "elbo" else ImportanceWeightedELBO(num_particles))
    loss_fn = elbo(model, guide)  # type: ignore[arg-type]  # an ELBOModule
    # the first evaluation builds the guide's parameters; record them all, as SVI does
    with poutine.trace(param_only=True) as capture:
        first = loss_fn(*args, **kwargs)
    found = (s["value"].unconstrained() for s in capture.trace.nodes.values())  # type: ignore[union-attr]
    params = list({id(p): p for p in found}.values())
    if not params:
        raise ValueError("fit_guide: the model and guide have no parameters to fit")
    if vectorize_particles and num_particles > 1:
        _check_vectorised(elbo, model, guide, args, kwargs)
    optim = torch.optim.Adam(params, lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=final_lr ** (1 / num_steps))

    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="fit_guide", unit="step")
    losses: list[float] = []
    means: list[float] = []
    best: tuple[float, float] | None = None  # (mean, variance of the mean)
    stall, stopped = 0, False
    t0 = time.perf_counter()
    for step in range(num_steps):
        if tempered is not None:
            tempered.weight = tempering_weight(step, temper, temper_start)
        loss = first if step == 0 else loss_fn(*args, **kwargs)
        value = float(loss.detach())
        if not math.isfinite(value):  # before the update it would make: the guide stays usable
            raise RuntimeError(f"fit_guide: the loss is {value} at step {step}; lower lr or "
                               "keep clip_norm")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
        optim.step()
        sched.step()
        losses.append(value)
        if (step + 1) % win:
            continue
        recent = torch.tensor(losses[-win:], dtype=torch.float64)
        mean, var = float(recent.mean()), float(recent.var() / win)
        means.append(mean)
        if bar is not None:
            bar.update(win)
            bar.set_postfix(loss=f"{mean:.4g}")
        if temper and step < temper + win:  # the objective still moves with the weight: no plateau yet
            best, stall = None, 0
        elif best is None or best[0] - mean > max(min_improvement, 2 * math.sqrt(best[1] + var)):
            best, stall = (mean, var), 0
        else:
            stall += 1
        if stop_on_plateau and stall >= patience:
            current = optim.param_groups[0]["lr"]
            if current <= lr * final_lr * (1 + 1e-6):  # at the final rate: done
                stopped = True
                break
            for group in optim.param_groups:  # else cut the rate, as on a schedule's end
                group["lr"] = max(lr * final_lr, group["lr"] * plateau_factor)
            stall = 0
    if bar is not None:
        bar.close()
    return FitResult(losses, len(losses), stopped, means, time.perf_counter() - t0)
