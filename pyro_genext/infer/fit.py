r"""A fitting loop for any Pyro model and guide: :func:`fit_guide`.

Pyro leaves the loop to the user (``for step in range(n): svi.step(...)``); NumPyro has
``SVI.run``. This is the loop, with what a variational fit needs besides the step:

* the objective as a module: Pyro's :class:`~pyro.infer.elbo.ELBOModule`
  (``Trace_ELBO(...)(model, guide)``, whose forward is the differentiable loss), or the
  importance-weighted bound :math:`\mathcal L_K = \mathbb E \log \frac1K \sum_k w_k`
  (Burda et al. 2015, arXiv:1509.00519) with ``objective="iwae"``
  (:class:`~pyro_genext.infer.ImportanceWeightedELBO`, after an ELBO warmup);
* **one** ``torch.optim.Adam`` (``fused=True`` where torch has it, else ``foreach=True``)
  over every parameter of model and guide
  (Pyro's ``pyro.optim`` wrappers run one optimiser per parameter tensor), created after
  the first evaluation of the loss, since autoguides build their parameters lazily on
  their first call;
* gradient clipping by the global norm, a learning rate decaying exponentially from
  ``lr`` to ``lr * final_lr`` by ``num_steps``, never below that floor;
* a non-finite loss, gradient or model evaluation refused before the update it would
  make, with the step and the parameters it reached;
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
from pyro.infer.elbo import ELBO

from .autoguide import AutoCouplingFlow
from .objectives import ImportanceWeightedELBO

__all__ = ["FitResult", "fit_guide"]


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
        learning_rates: the learning rate of every step.
        window: the steps in each window of the stopping rule.
        init: where the guide started: ``"laplace"``, ``"map"``, or ``"own"`` (the
            guide's own ``init_loc_fn``/``init_scale``, or its parameters as they were),
            with the reason after a colon where ``init="auto"`` fell back to ``"own"``.

    Its ``repr`` is one line (steps, how the fit ended, the final loss, time); the
    losses are in :attr:`losses`.
    """

    losses: list[float] = field(repr=False)
    num_steps: int
    stopped_early: bool
    window_means: list[float] = field(default_factory=list, repr=False)
    seconds: float = 0.0
    learning_rates: list[float] = field(default_factory=list, repr=False)
    window: int = 1
    init: str = "own"

    @property
    def final_loss(self) -> float:
        """The mean loss of the last ``window`` steps (of all of them if fewer)."""
        last = self.losses[-max(1, self.window):]
        return sum(last) / len(last) if last else math.nan

    def __repr__(self) -> str:
        return (f"FitResult(num_steps={self.num_steps}, stopped_early={self.stopped_early}, "
                f"final_loss={self.final_loss:.4g}, seconds={self.seconds:.3g}, "
                f"init={self.init.split(':')[0]!r})")


def _check(name: str, value: Any, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"fit_guide: expected {name} {expected}, got {value!r}")


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_vectorised(elbo: ELBO, model: Any, guide: Any, args: Any, kwargs: Any) -> None:
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


def _falling(losses: list[float], window: int, min_improvement: float) -> bool:
    """Whether the least-squares line through ``losses`` falls by more than
    ``min_improvement`` per ``window`` steps, beyond twice its standard error."""
    y = torch.tensor(losses, dtype=torch.float64)
    n = len(y)
    t = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    tt = float((t * t).sum())
    slope = float((t * y).sum()) / tt
    resid = y - y.mean() - slope * t
    se = math.sqrt(float((resid * resid).sum()) / (n - 2) / tt)
    return -slope * window - 2 * se * window > min_improvement


def _subsamples(model: Callable[..., Any], args: Any, kwargs: Any) -> bool:
    """Whether one run of ``model`` has a plate that subsamples its data."""
    from pyro.infer.autoguide.initialization import InitMessenger

    from .init import init_to_support

    with poutine.block(), torch.no_grad(), pyro.validation_enabled(False):  # no draw: flat priors
        trace = poutine.trace(InitMessenger(init_to_support)(model)).get_trace(*args, **kwargs)
    return any(site["type"] == "sample" and poutine.util.site_is_subsample(site)
               and site["value"].numel() < site["fn"].size  # type: ignore[union-attr,attr-defined]
               for site in trace.nodes.values())


def _auto_init(model: Callable[..., Any], guide: Any, args: Any, kwargs: Any) -> tuple[Any, str]:
    """``init="auto"``: ``(laplace_fit, "laplace")`` for a fresh flow guide whose model's
    Laplace approximation is found (:func:`~pyro_genext.infer.init.laplace` converged)
    and has a higher ELBO than the guide's own start (the Gaussian
    ``N(init_loc_fn, init_scale^2 I)``, which a flow guide of this library is at its
    start), else ``(None, "own: <why>")``. Each part runs on the random states it was
    called with, restored after it: the own start judged is the one the guide then takes,
    and a fall-back start draws what ``init=None`` would."""
    from .init import _laplace, _rng_kept, _start_elbo, _Unconstrained, init_to_support, stale_params

    if not isinstance(guide, AutoCouplingFlow):
        return None, "own: not a flow guide of this library"
    if guide.prototype_trace is not None:  # fitted before: go on from its parameters
        return None, "own: the guide's parameters were already built"
    stale = stale_params(guide)
    if stale:
        raise ValueError(f"fit_guide: Pyro's param store already holds parameters under the guide's "
                         f"name {guide._pyro_name!r} (e.g. {stale[0]!r}), which its first call would load "
                         "over the start that init='auto' gives a fresh guide; call "
                         "pyro.clear_param_store() first, or pass init=None to start from them")
    try:
        with _rng_kept():
            if _subsamples(model, args, kwargs):
                return None, "own: the model subsamples its data (the Laplace fit needs the full log joint)"
        with _rng_kept():
            fit = _laplace(model, args, kwargs)
        if not fit.converged:
            return None, "own: the Laplace fit did not converge (no strict mode)"
        lap = _start_elbo(model, fit.loc, torch.linalg.cholesky(fit.cov), args, kwargs)
    except (ValueError, RuntimeError, NotImplementedError) as e:
        return None, f"own: the Laplace fit failed ({str(e).splitlines()[0][:120]})"
    try:  # the guide's own start (its init_loc_fn); Pyro's cannot sample a flat prior
        with _rng_kept():
            own_loc = _Unconstrained(guide.model, args, kwargs, init_to_support).start
        eye = torch.eye(len(own_loc), dtype=own_loc.dtype, device=own_loc.device)
        own = _start_elbo(model, own_loc, guide._init_scale * eye, args, kwargs)
    except (NotImplementedError, ValueError, RuntimeError):
        own = -math.inf
    if not lap > own:  # a funnel's mode: the neck, with sds of e^-20
        return None, (f"own: its start's ELBO ({own:.4g}) is not below the Laplace approximation's "
                      f"({lap:.4g}): the mode is unlike the posterior's bulk (e.g. a funnel's neck)")
    return fit, "laplace"


def fit_guide(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    num_steps: int = 4000,
    lr: float = 5e-3,
    final_lr: float = 0.1,
    num_particles: int = 8,
    objective: str = "elbo",
    warmup: int | None = None,
    vectorize_particles: bool = True,
    clip_norm: float | None = 10.0,
    stop_on_plateau: bool = True,
    window: int | None = None,
    patience: int = 4,
    min_improvement: float = 0.0,
    plateau_factor: float = 0.3,
    progress_bar: bool = True,
    init: str | None = "auto",
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
    ``Trace_ELBO``; ``"iwae"``: :class:`~pyro_genext.infer.ImportanceWeightedELBO` with
    :math:`K` = ``num_particles``, after ``warmup`` steps of ``Trace_ELBO``), a backward
    pass, the gradient clipped to global norm ``clip_norm``, one step of a single
    ``Adam`` over all parameters (fused on CPU and CUDA), the learning rate multiplied by
    ``final_lr ** (1 / num_steps)``. The gradient of the bound is DReG's for the
    parameters of an ``stl`` flow guide and IWAE's for every other parameter (a model's
    ``pyro.param`` included): see :class:`~pyro_genext.infer.ImportanceWeightedELBO`.

    Refusals: a non-finite loss, a non-finite gradient (a finite loss can have one, e.g.
    ``torch.where`` with ``sqrt`` of a negative value in the branch not taken), and an
    error of the model or guide at the guide's draws (Pyro's validation of a scale that
    underflowed to 0) raise ``RuntimeError`` before the update, naming the step (and
    for a gradient the parameters whose gradient is not finite); every parameter is left
    as the last finite step left it.

    Importance-weighted training starts with ``warmup`` steps of the ELBO (default a
    quarter of ``num_steps``). From a guide's initial spread, draws of the bound's
    particles that land where the target is tiny (eight schools' funnel neck) have
    weights of 0 and receive no gradient, so nothing pulls the guide's tails back: on
    eight schools with ``AutoRealNVP`` and K = 10, log tau's lower tail ran to -22..-33
    and a scale underflowed to 0 within 9-46 steps in all three seeds, with DReG and
    without. The ELBO, which weighs every draw equally, first draws the guide onto the
    posterior; the bound then refines it: at the defaults (4000 steps, 1000 of them the
    ELBO's) eight schools trains in all three seeds (final bound 31.34-31.37; the guide's
    lowest unconstrained coordinate in 4000 draws -42 to -55, so its tails stay long),
    and so it does with ``stl=False`` (the IWAE gradient; final bound 31.48-31.70) with far
    longer tails (-122 to -515): a longer run can still draw a ``tau`` that underflows.
    Where the bound fails the refusal above says so.

    Stopping rule (``stop_on_plateau``): the losses are grouped in windows of ``window``
    steps (default ``max(25, num_steps // 50)``). At the end of each window, once
    ``2 * patience`` windows have passed since the start (or the last cut), a
    least-squares line is fitted to the losses of those ``2 * patience`` windows. The
    loss is *still falling* if the line falls per window by more than
    ``min_improvement`` plus twice its standard error (the noise of the slope, from the
    scatter of the losses about the line); otherwise it is a plateau: the learning rate
    is multiplied by ``plateau_factor``, down to no less than ``lr * final_lr``, and on a
    plateau at that final rate the fit stops. So a fit stops early only where the loss
    has stopped improving at the small step size that ends a full schedule, and not while
    its trend is still downward by more than its noise. (Until issue 23 a window had to
    beat the best earlier window mean by 2 se; a minimum of noisy means is biased low, and
    a fit whose loss fell by 0.6 per window of 30 steps under noise of sd 4.3 per step was
    stopped at step 150. On eight schools and logistic regression, 1500 steps, two
    seeds each, AutoNormal now stops at 840-1050 steps (780-810 before) and
    AutoMultivariateNormal at 1260-1440 (990-1260); the final loss's excess over that
    of all 1500 steps went from -0.18..1.38 to -0.42..0.70 nats for six of the eight
    fits and stayed at 0.49 and 1.24 (0.47 and 1.31 before) for eight schools'
    AutoMultivariateNormal, whose loss has heavy-tailed noise.) The learning rate never falls
    below ``lr * final_lr``: the exponential decay continues after a cut, held at that
    floor.

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
        warmup: with ``"iwae"``, the steps of the ELBO first (default
            ``num_steps // 4``; ``0`` for none); ``None`` or ``0`` with ``"elbo"``.
        vectorize_particles: run the particles as one vectorised batch (``"iwae"``
            needs it).
        clip_norm: global gradient-norm bound, or ``None``.
        stop_on_plateau, window, patience, min_improvement, plateau_factor: the
            stopping rule (``min_improvement``: the fall per window, in the loss's units,
            below which the loss counts as flat).
        progress_bar: show a ``tqdm`` bar with the smoothed loss.
        init: where the guide starts. ``"auto"`` (the default): ``"laplace"`` for a
            fresh flow guide of this library (:class:`~pyro_genext.infer.AutoRealNVP`,
            :class:`~pyro_genext.infer.AutoNICE`) where the Laplace fit converges and its
            ELBO (:func:`~pyro_genext.infer.init.start_elbo`, 64 draws) is above that of
            the guide's own start (the Gaussian ``N(init_loc_fn, init_scale^2 I)`` it is
            before training), else ``None``. So Pyro's guides, a guide fitted before (it
            goes on from its parameters), a model that subsamples its data, a model
            without a strict mode (eight schools centred) and one whose mode is unlike its
            bulk (Neal's funnel: the mode is in the neck, with sds of :math:`e^{-20}`; the
            banana; the horseshoe) keep their own start, and draw what ``init=None``
            draws; :attr:`FitResult.init` says which, and why. A fresh
            flow guide over a param store that already holds parameters under its name is
            refused (its first call would load them over the start): clear the store, or
            pass ``init=None``. ``None``: where the guide's own ``init_loc_fn`` and
            ``init_scale`` put it. ``"laplace"``: at the posterior's mode with the Laplace
            approximation's covariance in its affine stage
            (:func:`~pyro_genext.infer.init.laplace` then
            :func:`~pyro_genext.infer.init.precondition`; a fresh ``AutoRealNVP``,
            ``AutoNICE`` or ``AutoMultivariateNormal``); ``"map"``: at the mode with the
            guide's own scale. The Laplace start matters for models with flat priors
            (``ImproperUniform``, which Pyro's initialisations cannot sample) or
            coordinates on very different scales: on posteriordb's ``earnings`` (raw
            dollars, flat priors) the start at ``b = 0, sigma = 1`` ends in a NaN loss at
            step 12, ``"laplace"`` within 0.023 reference sds of the means and 1.3 % of the
            sds on three seeds (docs/real_models.rst); ``"auto"`` chooses it on 38 of the
            39 posteriordb posteriors (all but eight schools, docs/posteriordb.rst). It costs an
            L-BFGS run, a Hessian (:math:`D` gradient evaluations) and, with ``"auto"``,
            128 model evaluations before the first step: 0.07-0.90 s on those posteriors
            without ODEs, 3.6-7.3 s with one. It runs the model as written (with
            ``"auto"``, not for a model that subsamples its data). ``"auto"`` judges a
            guide whose ``init_loc_fn`` or ``init_scale`` you chose the same way, and may
            replace that start; pass ``init=None`` to keep it.
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
    if warmup is None:
        warmup = num_steps // 4 if objective == "iwae" else 0
    _check("warmup", warmup, _whole(warmup) and 0 <= warmup <= num_steps
           and (objective == "iwae" or warmup == 0),
           "None or an integer in [0, num_steps] (and 0 or None with objective='elbo')")
    _check("clip_norm", clip_norm, clip_norm is None or (_finite(clip_norm) and clip_norm > 0),
           "a finite number > 0 or None")
    _check("plateau_factor", plateau_factor, _finite(plateau_factor) and 0 < plateau_factor < 1,
           "in (0, 1)")
    _check("patience", patience, _whole(patience) and patience >= 1, "an integer >= 1")
    _check("min_improvement", min_improvement, _finite(min_improvement) and min_improvement >= 0,
           "a finite number >= 0")
    win = max(25, num_steps // 50) if window is None else window
    _check("window", window, _whole(win) and win >= 2, "an integer >= 2 or None")

    _check("init", init, init in ("auto", None, "map", "laplace"), "'auto', None, 'map' or 'laplace'")
    _check("temper", temper, _whole(temper) and 0 <= temper <= num_steps, "an integer in [0, num_steps]")
    _check("temper_start", temper_start, _finite(temper_start) and 0 < temper_start <= 1, "in (0, 1]")

    if objective == "iwae" and not vectorize_particles:
        raise ValueError("fit_guide: objective='iwae' needs vectorize_particles=True")
    from .init import _laplace, _precondition

    started, mode = "own", None
    if init == "auto":
        mode, started = _auto_init(model, guide, args, kwargs)
    elif init is not None:  # start at the posterior's mode (issue 24)
        mode, started = _laplace(model, args, kwargs), init
    if mode is not None:
        _precondition(guide, mode, model, args, kwargs, scale=started == "laplace")
    tempered = None
    if temper:  # the likelihood's weight rises to 1 over the first `temper` steps (issue 24)
        from .tempering import TemperObserved, tempering_weight

        tempered = TemperObserved(temper_start)
        model = tempered(model)
    trace_elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize_particles)
    elbo = trace_elbo if objective == "elbo" else ImportanceWeightedELBO(num_particles)
    loss_fn = elbo(model, guide)  # type: ignore[arg-type]  # an ELBOModule
    warm_fn = trace_elbo(model, guide)  # type: ignore[arg-type]  # the first `warmup` steps
    # the first evaluation builds the guide's parameters; record them all, as SVI does
    with poutine.trace(param_only=True) as capture:
        first = (warm_fn if warmup else loss_fn)(*args, **kwargs)
    found = {id(s["value"].unconstrained()): (name, s["value"].unconstrained())  # type: ignore[union-attr]
             for name, s in capture.trace.nodes.items()}  # type: ignore[union-attr]
    params = [p for _, p in found.values()]
    names = {key: name for key, (name, _) in found.items()}
    if not params:
        raise ValueError("fit_guide: the model and guide have no parameters to fit")
    if vectorize_particles and num_particles > 1:
        _check_vectorised(elbo, model, guide, args, kwargs)
    # fused where torch has it (CPU and CUDA floating point: a third of foreach's time for
    # a flow guide's 62 tensors on the CPU), else foreach
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) and len(
        {(p.device, p.dtype) for p in params}) == 1
    optim = torch.optim.Adam(params, lr=lr, fused=True) if fused else torch.optim.Adam(
        params, lr=lr, foreach=True)
    sched = torch.optim.lr_scheduler.ExponentialLR(optim, gamma=final_lr ** (1 / num_steps))

    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, desc="fit_guide", unit="step")
    losses: list[float] = []
    means: list[float] = []
    rates: list[float] = []
    floor = lr * final_lr
    since, stopped = 0, False  # complete windows since the start or the last cut
    t0 = time.perf_counter()
    # the first evaluation registered the flow guide's parameters (captured above): the
    # loop need not again (restored after it, also on an error)
    quiet = [g for g in ([guide] if isinstance(guide, AutoCouplingFlow) else []) if g._register_params]
    try:
        for g in quiet:
            g._register_params = False
        for step in range(num_steps):
            if step == warmup and warmup:  # the objective changes: the rule starts afresh
                since = 0 if step % win == 0 else -1
            hint = (" With objective='iwae' the guide's tails can drift where every importance weight "
                    "vanishes (a funnel): a longer ELBO warmup, a lower lr, or objective='elbo'."
                    if objective == "iwae" and step >= warmup else " Lower lr or keep clip_norm.")
            if tempered is not None:
                tempered.weight = tempering_weight(step, temper, temper_start)
            try:
                loss = first if step == 0 else (warm_fn if step < warmup else loss_fn)(*args, **kwargs)
            except NotImplementedError:  # a combination the objective refuses: its own message
                raise
            except (ValueError, RuntimeError) as e:  # e.g. a scale that underflowed to 0
                raise RuntimeError(f"fit_guide: the model or guide failed at step {step}, at the guide's "
                                   f"draws; the parameters are as the last step left them.{hint} "
                                   f"The error: {str(e).splitlines()[0]}") from e
            value = float(loss.detach())
            if not math.isfinite(value):  # before the update it would make: the guide stays usable
                raise RuntimeError(f"fit_guide: the loss is {value} at step {step}; the parameters are as "
                                   f"the last step left them.{hint}")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            # clip_grad_norm_'s two halves, with the check between them
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            bad = [] if torch.isfinite(norm) else [
                names[id(p)] for p in params if p.grad is not None and not p.grad.isfinite().all()]
            if not bad and not torch.isfinite(norm):  # every gradient finite, only their norm
                norm = torch.nn.utils.get_total_norm([g.double() for g in grads], foreach=True)
            if bad:  # before the update: no parameter is touched
                listed = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
                optim.zero_grad(set_to_none=True)
                raise RuntimeError(f"fit_guide: the gradient is {float(norm)} at step {step} (the loss is "
                                   f"finite, {value:.6g}) in {listed}: a derivative of the model or "
                                   "guide is not finite there (e.g. torch.where with a NaN in the branch "
                                   f"not taken); the parameters are as this step found them.{hint}")
            if clip_norm is not None and norm.dtype != grads[0].dtype:  # a norm past float32's range
                for g in grads:
                    g.mul_(min(1.0, clip_norm / float(norm)))
            elif clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, clip_norm, norm, foreach=True)
            rates.append(optim.param_groups[0]["lr"])
            optim.step()
            sched.step()
            for group in optim.param_groups:  # the decay goes on after a cut: not below the floor
                if group["lr"] < floor * (1 - 1e-9):
                    group["lr"] = floor
            losses.append(value)
            if (step + 1) % win:
                continue
            means.append(sum(losses[-win:]) / win)
            if bar is not None:
                bar.update(win)
                bar.set_postfix(loss=f"{means[-1]:.4g}")
            since += 1
            if temper and step < temper + win:  # the objective still moves with the weight: no plateau yet
                since = 0
                continue
            if (not stop_on_plateau or step < warmup or since < 2 * patience
                    or _falling(losses[-2 * patience * win:], win, min_improvement)):
                continue
            current = optim.param_groups[0]["lr"]
            if current <= floor * (1 + 1e-6):  # at the final rate: done
                stopped = True
                break
            for group in optim.param_groups:  # else cut the rate, as on a schedule's end
                group["lr"] = max(floor, group["lr"] * plateau_factor)
            since = 0
    finally:
        for g in quiet:
            g._register_params = True
    if bar is not None:
        bar.close()
    return FitResult(losses, len(losses), stopped, means, time.perf_counter() - t0, rates, win, started)
