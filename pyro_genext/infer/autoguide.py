r"""Flow autoguides: :class:`AutoRealNVP` and :class:`AutoNICE`.

Both are :class:`~pyro.infer.autoguide.AutoContinuous` guides: every latent site of the
model is mapped to the real line by ``biject_to(site.support).inv`` and the pieces are
concatenated into one vector :math:`z \in \mathbb R^D`. The posterior over :math:`z` is

.. math::

    u \sim \mathcal N(0, I_D), \qquad v = f_K \circ \dots \circ f_1(u), \qquad
    z = \mu + \operatorname{diag}(\sigma)\, T\, v,

with couplings :math:`f_k` (RealNVP's affine or NICE's additive) acting on standardised
coordinates :math:`v`, and an affine stage (:class:`~pyro_genext.transforms.Affine`) that
is Pyro's own Gaussian guide: :math:`T = I` (``affine="diagonal"``, as ``AutoNormal``) or
unit lower triangular (``affine="full"``, as ``AutoMultivariateNormal``). Every coupling
starts at the identity (zero last layer), :math:`\mu` starts at ``init_loc_fn`` and
:math:`\sigma` at ``init_scale``, so at initialisation the guide *is* the Gaussian guide
:math:`\mathcal N(\mu, \text{init\_scale}^2 I)`: ``AutoNormal(model, init_scale=s)`` for
``AutoRealNVP(model, init_scale=s)``. (The defaults differ: Pyro's Gaussian guides start
at ``init_scale=0.1``, ours at 1.0, chosen by measurement; see :class:`AutoCouplingFlow`.)
Training lets the couplings add what a Gaussian cannot (funnels, curvature, skew).

Which coordinates condition which: coupling :math:`k` splits the coordinates by bit
:math:`b = \lfloor k/2 \rfloor \bmod \lceil \log_2 D \rceil` of their index (those with the
bit clear on one side), and consecutive couplings swap the two sides. Any two distinct
indices differ in some bit, so after :math:`2\lceil\log_2 D\rceil` couplings every pair of
coordinates has been related by a coupling in both directions. A fixed
:class:`~pyro_genext.transforms.Permute` brings each split into contiguous halves, so the
couplings keep the fast slice path. (The recipes' ``mask="half"`` uses the same split in
every layer, which never relates two coordinates of the same half.)

Using a fitted guide: it is a Pyro autoguide, so what works with ``AutoNormal`` works
with it: ``guide()`` draws one posterior sample of every latent site (constrained
values); ``Predictive(model, guide=guide, num_samples=1000)(*args)`` draws latent sites
and posterior-predictive replicates of the observed ones;
:meth:`~AutoCouplingFlow.median` and :meth:`~AutoCouplingFlow.quantiles` summarise it;
:mod:`pyro_genext.diagnostics` says whether to trust it (Pareto :math:`\hat k`) and
exports it to ArviZ. Train it with :func:`~pyro_genext.infer.fit_guide` or any SVI loop.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from torch import nn

from ..transforms import Affine, Chain, MaskedCoupling, Permute
from ..transforms.base import FlowTransform
from ..transforms.elementwise import check_bound

__all__ = ["AutoCouplingFlow", "AutoRealNVP", "AutoNICE", "coupling_splits"]


def coupling_splits(dim: int, num_layers: int) -> list[tuple[torch.Tensor, int, int]]:
    r"""The partition used by each coupling of a flow guide on :math:`D` = ``dim``
    coordinates.

    Returns, per coupling, ``(order, size, parity)``: the coordinates listed with those
    whose bit :math:`b_k = \lfloor k/2\rfloor \bmod \lceil\log_2 D\rceil` is clear first,
    the number ``size`` of those, and which side conditions (``0``: the first ``size``
    coordinates of ``order`` condition the rest; ``1``: the other way round).

    Example::

        >>> [(o.tolist(), n, p) for o, n, p in coupling_splits(3, 4)]
        [([0, 2, 1], 2, 0), ([0, 2, 1], 2, 1), ([0, 1, 2], 2, 0), ([0, 1, 2], 2, 1)]
    """
    if dim < 2:
        raise ValueError(f"coupling_splits: a coupling needs dim >= 2, got {dim}")
    nbits = max(1, math.ceil(math.log2(dim)))
    idx = torch.arange(dim)
    out = []
    for k in range(num_layers):
        bit = (idx >> ((k // 2) % nbits)) & 1
        order = torch.argsort(bit, stable=True)
        out.append((order, int((bit == 0).sum()), k % 2))
    return out


def _is_int(x: object) -> bool:
    """An integer, not a bool (``True`` is an ``int`` to Python, not a count to a user)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    """A real number, not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _split_mask(dim: int, size: int, parity: int) -> torch.Tensor:
    mask = torch.zeros(dim)
    mask[:size] = 1.0
    return 1.0 - mask if parity else mask


@contextmanager
def _parameters_detached(module: nn.Module) -> Iterator[None]:
    """Within the block, every parameter of ``module`` reads as ``p.detach()``: the same
    values, outside the autograd graph of ``p``. The swap is plain Python on the modules'
    parameter dicts, undone on exit (also on an error), so it works where
    :func:`torch.func.functional_call` is refused: under ``torch.jit.trace``, which Pyro's
    ``JitTrace*_ELBO`` use (the trace records ``detach`` of each parameter, so a replay
    detaches the parameters it is given). Not thread-safe: another thread using the same
    module meanwhile would see the detached copies."""
    swapped = [(m._parameters, name, p) for m in module.modules()
               for name, p in m._parameters.items() if p is not None]
    try:
        for params, name, p in swapped:
            params[name] = p.detach()  # type: ignore[assignment]
        yield
    finally:
        for params, name, p in swapped:
            params[name] = p


class _StickingTheLanding(dist.TransformedDistribution):
    """A flow posterior whose ``log_prob`` treats the flow's parameters as constants.

    ``rsample`` is the ordinary reparametrised sample (differentiable in the parameters);
    ``log_prob(z)`` runs the inverse with detached parameters, so its gradient reaches
    the parameters only through ``z``: the path derivative of Roeder et al. (2017).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        (flow,) = self.transforms
        with _parameters_detached(flow):
            x, ladj = flow._inverse_and_ladj(value)
        return self.base_dist.log_prob(x) - ladj


class AutoCouplingFlow(AutoContinuous):
    r"""Base of :class:`AutoRealNVP` and :class:`AutoNICE`; see the module docstring for
    the posterior it builds.

    Args:
        model: a Pyro model.
        num_layers: number of couplings. With latent dimension 1 there is nothing to
            condition on and the guide is the affine stage alone (a Gaussian).
        hidden_dims: widths of each coupling's conditioner MLP; default ``(32, 32)``.
            The defaults, 10 couplings of two hidden layers of 32 (those of Agrawal,
            Sheldon, Domke 2020), were chosen against 4 couplings of width
            ``max(32, 4 D)`` (the defaults before issue 15), both with ``stl=True``,
            on the five tuning targets of :mod:`~pyro_genext.infer.targets`: a better
            ELBO on four of them (funnel -0.10 against -0.23, the neck's sd 2.53
            against 2.26), a worse ELBO and mean on the two-mode target
            (docs/api/infer.rst).
        affine: ``"diagonal"`` (the affine stage of ``AutoNormal``) or ``"full"``
            (that of ``AutoMultivariateNormal``, :math:`O(D^2)` parameters); prefer
            ``"full"`` for nearly Gaussian posteriors with strong correlations (measured
            in docs/api/infer.rst).
        init_loc_fn: per-site initialisation of :math:`\mu`, as in Pyro's autoguides.
        init_scale: initial :math:`\sigma` of every unconstrained coordinate: the draws
            start with this spread, as those of Pyro's Gaussian guides with the same
            ``init_scale``. Default 1.0, not Pyro's 0.1, by measurement (issue 23,
            docs/benchmarks_posteriors.rst "The initial spread"): by the plain loop of
            the posterior benchmark (4000 steps, seed 0) 0.1 gave a lower ELBO on five of
            the eight posteriors (funnel -0.119 against -0.082, logistic regression
            -55.47 against -55.40, unequal groups -373.78 against -373.61), a higher one
            on three (two modes, GP, horseshoe); 0.3 was lower on seven. The price of 1.0: on a posterior much
            narrower than 1 the first Adam steps move the couplings, whose output is
            scaled by :math:`\sigma`, far in :math:`z`; Pyro's
            ``test_median_module`` (posterior sd 0.07, 20 Adam steps at lr 0.005 from
            the exact location) moves ``AutoNICE``'s median by more than 0.1 in 25 of 31
            seeds at 1.0, 11 at 0.3 and none at 0.1 (``AutoRealNVP``: 10, 0, 0). Pass
            ``init_scale=0.1`` where the posterior's scale is known to be small.
        create_plates: as in Pyro's autoguides, for subsampling.
        stl: "sticking the landing" (Roeder, Wu, Duvenaud 2017, arXiv:1703.09194): the
            guide's ``log_prob`` is computed with its parameters held fixed while the sample
            stays differentiable, which drops the score term of the gradient. At the exact
            posterior that gradient is zero for every sample. Works with any ELBO of the
            standard SVI loop, Pyro's JIT ELBOs (``JitTrace_ELBO``, ``JitTraceGraph_ELBO``,
            ``JitTraceEnum_ELBO``) included: the parameters are detached by swapping them
            for detached copies during the scoring pass, not by
            :func:`torch.func.functional_call`, which ``torch.jit.trace`` refuses. It costs
            a second pass through the couplings per step (scoring cannot reuse the sampling
            pass, whose log-determinant depends on the parameters). On by default since
            issue 15: on the five tuning targets it gave a better ELBO than the ordinary
            gradient on all five (one seed) and cut the banana's moment errors from 0.052 /
            0.106 to 0.006 / 0.007 (docs/api/infer.rst). Pass ``stl=False`` for the ordinary
            estimator, e.g. with ``RenyiELBO``, whose gradient the path derivative alone
            does not give (with the importance-weighted objective of
            :func:`~pyro_genext.infer.fit_guide` an ``stl`` guide gets DReG instead).
        scale_bound: bound of each affine coupling's log-scale (RealNVP only).
        num_quantile_samples: draws used by :meth:`median` and :meth:`quantiles` (antithetic
            pairs from a fixed seed, so both summarise the same draws).
        init_coupling_scale: standard deviation of the normal initialisation of each
            coupling conditioner's last weight matrix; ``0`` starts every coupling
            exactly at the identity (the guide is then the Gaussian guide), a small value
            near it (Agrawal, Sheldon, Domke 2020 use 0.001-0.01), so that the layers
            below the last receive gradient from the first step.

    Names: as with Pyro's autoguides, the parameters are named after the class, so two
    ``AutoRealNVP`` guides in one session share them; clear the param store
    (``pyro.clear_param_store()``) before fitting another model.

    Saving and loading: the guide's parameters live in Pyro's param store under the
    guide's name (``"AutoRealNVP.flow$$$..."``), as those of any ``PyroModule``, and so
    does the fixed stage of a guide started at the Laplace approximation
    (``fit_guide``'s default ``init="auto"``, or ``precondition``:
    ``"AutoRealNVP.standardised$$$loc"`` and ``"...$$$scale_tril"``, read by the guide,
    never optimised). ``pyro.get_param_store().save(path)`` and, in a new session,
    ``load(path)`` before the first call of a fresh guide restore the trained posterior,
    fixed stage included; to fit that guide further, pass ``init=None`` to ``fit_guide``
    (its default would refuse a param store that already holds the guide's parameters).
    ``guide.load_state_dict(state)`` works once the fresh guide has been called (or
    :meth:`setup` has been run) on the model's arguments after the same ``load``.
    """

    elementwise = "affine"

    def __init__(
        self,
        model: Callable[..., Any],
        num_layers: int = 10,
        hidden_dims: Sequence[int] | None = None,
        affine: str = "diagonal",
        init_loc_fn: Callable[..., Any] = init_to_median,
        init_scale: float = 1.0,
        create_plates: Callable[..., Any] | None = None,
        stl: bool = True,
        scale_bound: float | None = 2.0,
        num_quantile_samples: int = 1000,
        init_coupling_scale: float = 0.0,
    ) -> None:
        name = type(self).__name__
        if affine not in ("diagonal", "full"):
            raise ValueError(f"{name}: expected affine='diagonal' or 'full', got {affine!r}")
        if not _is_int(num_layers) or num_layers < 0:
            raise ValueError(f"{name}: expected num_layers an integer >= 0, got {num_layers!r}")
        if not _is_real(init_scale) or not 0 < init_scale < math.inf:
            raise ValueError(f"{name}: expected init_scale a finite number > 0, got {init_scale!r}")
        if hidden_dims is not None and (
            isinstance(hidden_dims, (str, bytes)) or not isinstance(hidden_dims, Sequence)
            or len(hidden_dims) == 0 or not all(_is_int(h) and h >= 1 for h in hidden_dims)
        ):
            raise ValueError(
                f"{name}: expected hidden_dims a non-empty sequence of positive integer widths "
                f"(or None for the default), got {hidden_dims!r}"
            )
        try:
            check_bound(scale_bound)
        except ValueError as e:  # refused here, not at the first call
            raise ValueError(f"{name}: {e}") from None
        if not _is_real(init_coupling_scale) or not 0 <= init_coupling_scale < math.inf:
            raise ValueError(
                f"{name}: expected init_coupling_scale a finite number >= 0, got {init_coupling_scale!r}"
            )
        if not _is_int(num_quantile_samples) or num_quantile_samples < 1:
            raise ValueError(
                f"{name}: expected num_quantile_samples an integer >= 1, got {num_quantile_samples!r}"
            )
        if not isinstance(stl, bool):
            raise ValueError(f"{name}: expected stl True or False, got {stl!r}")
        self.num_layers = num_layers
        self.hidden_dims = None if hidden_dims is None else tuple(int(h) for h in hidden_dims)
        self.affine = affine
        self.stl = stl
        self.scale_bound = scale_bound
        self.num_quantile_samples = int(num_quantile_samples)
        self._init_scale = float(init_scale)
        self.init_coupling_scale = float(init_coupling_scale)
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.create_plates = create_plates

    # ---------------------------------------------------------------- building
    def _build_flow(self, loc: torch.Tensor) -> Chain:
        d = self.latent_dim
        parts: list[FlowTransform] = []
        if d >= 2 and self.num_layers > 0:
            hidden = self.hidden_dims or (32, 32)
            current = torch.arange(d)  # the coordinate held at each position
            for order, size, parity in coupling_splits(d, self.num_layers):
                if not torch.equal(order, current):
                    # positions now hold `current`; bring `order` into place
                    parts.append(Permute(torch.argsort(current)[order]))
                    current = order
                coupling = MaskedCoupling(
                    _split_mask(d, size, parity),
                    elementwise=self.elementwise,
                    scale_bound=self.scale_bound,
                    hidden_dims=hidden,
                )
                if self.init_coupling_scale > 0:  # near the identity, not at it
                    last = coupling.conditioner.net[-1]  # type: ignore[index]
                    nn.init.normal_(last.weight, std=self.init_coupling_scale)  # type: ignore[union-attr]
                parts.append(coupling)
            if not torch.equal(current, torch.arange(d)):
                parts.append(Permute(torch.argsort(current)))
        parts.append(Affine(d, loc=loc, scale=self._init_scale, tril=self.affine == "full"))
        # cache_size=1: the sample's inverse and log-det are served from the sampling pass
        return Chain(parts, cache_size=1).to(device=loc.device, dtype=loc.dtype)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        self.flow = self._build_flow(self._init_loc())
        store = pyro.get_param_store()
        names = self._standardised_names()
        if all(n in store for n in names):  # a preconditioned guide's fixed stage, e.g. just loaded
            loc, tril = (store[n].detach().clone() for n in names)
            self._attach_standardised(loc, tril)

    def _standardised_names(self) -> tuple[str, str]:
        """Where :func:`~pyro_genext.infer.init.precondition` keeps the fixed stage in
        Pyro's param store (read, never registered as a sample-time parameter: no
        optimiser sees it), so that ``save``/``load`` of the store restores it."""
        return f"{self._pyro_name}.standardised$$$loc", f"{self._pyro_name}.standardised$$$scale_tril"

    def _attach_standardised(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        """Append the fixed stage ``z = loc + scale_tril w`` to the flow, and record it in
        the param store."""
        from .init import Standardised

        ref = self._modules["flow"][-1].loc  # type: ignore[index]
        loc, scale_tril = loc.to(ref), scale_tril.to(ref)
        self.flow = Chain([*self.flow._parts, Standardised(loc, scale_tril)], cache_size=1)
        store = pyro.get_param_store()
        for name, value in zip(self._standardised_names(), (loc, scale_tril)):
            store[name] = value.detach().clone()

    def setup(self, *args: Any, **kwargs: Any) -> AutoCouplingFlow:
        """Build the guide's parameters for the model's arguments without sampling (what
        the first call would do), e.g. before ``load_state_dict``. Returns the guide."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        return self

    # ---------------------------------------------------------------- posterior
    #: whether each call registers the flow's parameters with Pyro (``pyro.module``), as
    #: SVI's parameter capture and the param store need; ``fit_guide``, which captures the
    #: parameters once, turns it off for its loop (about 2 ms a step of 9 on the CPU)
    _register_params = True

    def _flow(self) -> Chain:
        flow = self._modules["flow"]
        assert isinstance(flow, Chain)
        if not self._register_params:
            return flow
        # Take the parameters in the param store (e.g. just loaded) into the module.
        # (Before the guide's first call its name is its own, as for any PyroModule.)
        if self._pyro_context.used:
            name = self._pyro_get_fullname("flow")
        else:
            name = f"{self._pyro_name}.flow" if self._pyro_name else "flow"
        pyro.module(name, flow, update_module_params=True)
        return flow

    def get_base_dist(self) -> dist.Distribution:
        loc = self._modules["flow"][-1].loc  # type: ignore[index]
        zeros = torch.zeros(self.latent_dim, dtype=loc.dtype, device=loc.device)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def get_transform(self, *args: Any, **kwargs: Any) -> Chain:
        return self._flow()

    def get_posterior(self, *args: Any, **kwargs: Any) -> dist.Distribution:
        """The flow posterior over the unconstrained latent vector, a
        ``TransformedDistribution`` (with the path-derivative ``log_prob`` if ``stl``)."""
        cls = _StickingTheLanding if self.stl else dist.TransformedDistribution
        return cls(self.get_base_dist(), [self.get_transform(*args, **kwargs)])

    # ---------------------------------------------------------------- summaries
    #: seed of the draws that :meth:`median` and :meth:`quantiles` summarise
    quantile_seed = 0

    @torch.no_grad()
    def _unconstrained_quantiles(self, q: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Coordinate-wise quantiles ``q`` of the summary draws of the unconstrained
        latent vector, each row unpacked and mapped into its site's support, as Pyro's
        ``AutoContinuous.quantiles`` does with its Gaussian.

        The draws are antithetic pairs :math:`T(u), T(-u)` of ``num_quantile_samples``
        base draws in all (rounded up to an even number), with ``u`` from a generator
        seeded with :attr:`quantile_seed`: the same draws at every call with the same
        parameters (so ``median()`` is ``quantiles([..., 0.5, ...])`` at 0.5, exactly),
        and Pyro's global random stream is left untouched. Where :math:`T` is odd about
        :math:`T(0)` (an affine map: the guide at initialisation) the draws are symmetric
        about :math:`T(0)` and their median is :math:`T(0)` exactly."""
        self.setup(*args, **kwargs)
        flow = self._flow()
        loc = self._modules["flow"][-1].loc  # type: ignore[index]
        gen = torch.Generator(device=loc.device).manual_seed(self.quantile_seed)
        half = -(-self.num_quantile_samples // 2)
        u = torch.randn(half, self.latent_dim, generator=gen, device=loc.device, dtype=loc.dtype)
        latent = flow._forward_and_ladj(torch.cat([u, -u]))[0]
        rows = latent.quantile(q.to(latent), dim=0)  # (len(q), D)
        out: dict[str, list[torch.Tensor]] = {}
        for row in rows:
            for site, v in self._unpack_latent(row):
                out.setdefault(site["name"], []).append(biject_to(site["fn"].support)(v))
        return {k: torch.stack(v) for k, v in out.items()}

    @torch.no_grad()
    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Posterior median of each latent site, **estimated by sampling**: the
        coordinate-wise median of the summary draws of the unconstrained latent vector
        (``num_quantile_samples`` antithetic draws from a fixed seed, see
        :meth:`quantiles`), mapped into each site's support (a flow has no closed-form
        median). It equals ``quantiles([0.5])`` exactly, and at initialisation the
        guide's loc exactly. Its Monte Carlo error is at most about
        :math:`\\sqrt{\\pi/2}\\,\\mathrm{sd}/\\sqrt{N}` for a near-normal marginal (less where
        the posterior is nearly symmetric, thanks to the antithetic pairs). For
        a site with a coordinate-wise transform (``LogNormal``, ``Beta``, ...) this is the
        median of the constrained draws; for a simplex or a correlation matrix it is a
        point of the support (the map of the unconstrained median), not a coordinate-wise
        median, which would leave the support.

        Example::

            >>> import pyro, pyro.distributions as dist
            >>> pyro.clear_param_store()  # guides of one class share parameter names
            >>> def model():
            ...     pyro.sample("x", dist.LogNormal(0.0, 1.0))
            >>> AutoRealNVP(model, init_scale=1.0).median()["x"].shape
            torch.Size([])
        """
        half = torch.tensor([0.5])
        return {k: v[0] for k, v in self._unconstrained_quantiles(half, *args, **kwargs).items()}

    @torch.no_grad()
    def quantiles(
        self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Posterior quantiles of each latent site, **estimated by sampling** as for
        :meth:`median`: coordinate-wise quantiles of the unconstrained draws, mapped into
        the support. The draws are ``num_quantile_samples`` base draws (rounded up to an
        even number) in antithetic pairs :math:`T(u)`, :math:`T(-u)`, from a generator
        seeded with :attr:`quantile_seed`, the same at every call: two calls with the
        same parameters summarise the same draws, and neither moves Pyro's global random
        stream. Returns a dict of tensors of shape ``(len(quantiles),) + site
        shape``, as Pyro's."""
        q = torch.as_tensor(quantiles, dtype=torch.get_default_dtype())
        if q.dim() != 1 or not ((q >= 0) & (q <= 1)).all():
            raise ValueError(f"expected a list of quantiles in [0, 1], got {quantiles!r}")
        return self._unconstrained_quantiles(q, *args, **kwargs)


class AutoRealNVP(AutoCouplingFlow):
    r"""A flow autoguide with RealNVP's affine couplings
    :math:`v_B \mapsto (v_B - t(v_A))\,e^{s(v_A)}` on standardised coordinates, followed by
    Pyro's Gaussian affine stage; see :mod:`pyro_genext.infer.autoguide` for the posterior
    and :class:`AutoCouplingFlow` for the arguments.

    At initialisation it equals ``AutoNormal`` (``affine="diagonal"``) or
    ``AutoMultivariateNormal`` (``affine="full"``) with the same ``init_scale`` (ours
    defaults to 1.0, Pyro's to 0.1). Cost per SVI step: one pass through
    each coupling's MLP for the sample and, with ``stl=True`` (the default), one more for
    its score (none with ``stl=False``: the score comes from the sampling pass's cache).

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> pyro.clear_param_store()  # guides of one class share parameter names
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> def model():
        ...     x = pyro.sample("x", dist.Normal(0.0, 3.0))
        ...     pyro.sample("y", dist.Normal(0.0, torch.exp(x / 2)))
        >>> guide = AutoRealNVP(model, num_layers=2, hidden_dims=(8,))
        >>> svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        >>> losses = [svi.step() for _ in range(5)]
        >>> sorted(guide.median())
        ['x', 'y']

    References: Dinh, Sohl-Dickstein, Bengio (2016), arXiv:1605.08803; Agrawal, Sheldon,
    Domke (2020), Advances in black-box VI: normalizing flows, importance weighting, and
    optimization, arXiv:2006.10343.
    """

    elementwise = "affine"


class AutoNICE(AutoCouplingFlow):
    r"""A flow autoguide with NICE's additive (volume-preserving) couplings
    :math:`v_B \mapsto v_B + t(v_A)` on standardised coordinates, followed by Pyro's
    Gaussian affine stage, which supplies all of the change of volume; see
    :mod:`pyro_genext.infer.autoguide` and :class:`AutoCouplingFlow`.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> pyro.clear_param_store()  # guides of one class share parameter names
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> guide = AutoNICE(model, num_layers=2, hidden_dims=(8,))
        >>> guide()["x"].shape
        torch.Size([3])

    Reference: Dinh, Krueger, Bengio (2014), NICE, arXiv:1410.8516.
    """

    elementwise = "additive"
