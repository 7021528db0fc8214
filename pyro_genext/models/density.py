r"""Flow density models: maximum likelihood with Pyro's SVI.

:class:`FlowDensity` turns a bijector (forward is base -> data, e.g. :func:`~pyro_genext.realnvp`
or :func:`~pyro_genext.nice`) into a density on the data,

.. math::

    x = \mathrm{pre}(f(z)), \quad z \sim p_Z, \qquad
    \log p(x) = \log p_Z(z) - \log\left|\det \frac{\partial f}{\partial z}\right|
              - \log\left|\det \frac{\partial\,\mathrm{pre}}{\partial h}\right|_{h = f(z)},

where ``pre`` is the pre-processing bijector of :mod:`pyro_genext.transforms.preprocess`
for data with discrete levels, and the identity for continuous data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from torch import nn
from torch.distributions import Transform

from ..checks import as_model_dtype, data_checks_enabled
from ..distributions import FlowDistribution
from ..metrics import bits_per_dim
from ..transforms.base import FlowTransform, check_event_shape
from ..transforms.normalization import initialize
from ..transforms.preprocess import LevelScaling, LogitPreprocess

__all__ = ["FlowDensity"]

BaseName = Literal["normal", "logistic"]
Check = Literal["levels", "range", "support"]


class FlowDensity(PyroModule):
    r"""A normalizing-flow density model of continuous or discrete-level data.

    Continuous data (``levels=None``, e.g. 2-D toy densities): the density is that of
    :math:`x = f(z)`, :math:`z \sim p_Z`.

    Discrete data (``levels=L``): each dimension of ``x`` is an integer level in
    :math:`\{0, \dots, L-1\}` (given as a float or integer tensor). The model is a density on
    the data scale :math:`[0, L)^D`:

    * :meth:`model` dequantizes, :math:`x + u`, :math:`u \sim \mathcal{U}[0, 1)^D`, in
      training mode (``dequantize=True``; call ``.eval()`` or pass ``dequantize=False`` to
      score the levels themselves);
    * the density is ``TransformedDistribution(base, [flow, pre])`` with ``pre`` RealNVP's
      logit pre-processing :class:`~pyro_genext.transforms.LogitPreprocess` (``alpha``), or
      the plain :class:`~pyro_genext.transforms.LevelScaling` by :math:`L` when
      ``alpha=None`` (the flow then models the unit scale, as NICE did), so
      :meth:`log_prob` includes every Jacobian and
      :func:`~pyro_genext.metrics.bits_per_dim` applies to it directly. With
      :math:`\alpha > 0` the support is slightly wider than :math:`[0, L)^D` (see
      :mod:`~pyro_genext.transforms.preprocess`); :meth:`sample` clamps into the data range.

    The base :math:`p_Z` is a standard normal (``base="normal"``) or a standard logistic
    (``base="logistic"``, NICE's choice, :math:`\log p(z) = -z - 2\operatorname{softplus}(-z)`).

    Training: call :meth:`initialize` on the first training batch (it starts the flow's
    :class:`~pyro_genext.transforms.ActNorm` layers from the data; without it they start
    as the identity), then ``SVI(m.model, m.guide, optim, Trace_ELBO())``; the guide is
    empty, so the ELBO is the log-likelihood (of the dequantized data) and SVI is maximum
    likelihood. :meth:`model` registers the flow with ``pyro.module`` under
    ``"<name>.flow"`` (``"flow"`` when ``name`` is empty). Full-batch training, the same
    data tensor every step, is safe with cached flows: the bijectors' cache only answers
    for tensors the flow itself returned (see :mod:`pyro_genext.transforms.base`).

    Cost: scoring (:meth:`log_prob`, :meth:`model`, :meth:`encode`) runs the flow's inverse
    once; sampling (:meth:`sample`, :meth:`decode`) runs it forward once.

    Args:
        flow: the bijector, forward base -> data; a
            :class:`~pyro_genext.transforms.FlowTransform` or any torch ``Transform``.
        event_shape: the shape of one data point; defaults to the flow's (required for a
            transform without an ``event_shape``).
        levels: the number of levels :math:`L` of discrete data, or ``None`` for continuous
            data.
        base: ``"normal"`` or ``"logistic"``.
        alpha: the margin of the logit pre-processing, :math:`0 < \alpha < 1/2`, or
            ``None`` to scale by :math:`L` only. Ignored for continuous data.
        dequantize: whether :meth:`model` adds uniform noise to discrete data in training
            mode. Ignored for continuous data.
        name: the Pyro name of this module, the prefix of its parameters in the param store.

    Example: a RealNVP on 17-level 4x4 "images"::

        >>> import pyro
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> from pyro_genext import realnvp
        >>> pyro.clear_param_store()
        >>> x = torch.randint(0, 17, (32, 1, 4, 4)).float()
        >>> m = FlowDensity(realnvp((1, 4, 4), hidden_channels=8, num_blocks=1), levels=17)
        >>> m.initialize(x)  # start the 10 actnorm layers from the first batch
        10
        >>> svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        >>> loss = svi.step(x)
        >>> m.log_prob(x).shape, m.sample(3, quantize=True).shape
        (torch.Size([32]), torch.Size([3, 1, 4, 4]))
        >>> z = m.encode(x)
        >>> torch.allclose(m.decode(z), x, atol=1e-3)
        True

    References: Dinh, Krueger, Bengio (2014), NICE, arXiv:1410.8516; Dinh,
    Sohl-Dickstein, Bengio (2016), Density estimation using Real NVP, arXiv:1605.08803;
    Theis, van den Oord, Bethge (2016), A note on the evaluation of generative models,
    arXiv:1511.01844 (dequantization).
    """

    def __init__(
        self,
        flow: Transform,
        event_shape: Sequence[int] | torch.Size | None = None,
        levels: int | None = None,
        base: BaseName = "normal",
        alpha: float | None = 0.05,
        dequantize: bool = True,
        name: str = "",
    ) -> None:
        super().__init__(name)
        if not isinstance(flow, Transform):
            raise TypeError(f"expected flow a torch Transform (bijector), got {type(flow).__name__}")
        if base not in ("normal", "logistic"):
            raise ValueError(f"expected base in ['normal', 'logistic'], got {base!r}")
        flow_shape = getattr(flow, "event_shape", None)
        if flow_shape is None and event_shape is None:
            raise ValueError(f"{type(flow).__name__} has no event_shape: pass event_shape")
        source = flow_shape if flow_shape is not None else event_shape
        assert source is not None
        latent = tuple(int(s) for s in source)
        data = latent
        if isinstance(flow, FlowTransform):
            data = flow.codomain_event_shape
        if event_shape is not None and tuple(event_shape) != data:
            raise ValueError(
                f"expected event_shape {data} (the flow's), got {tuple(event_shape)}"
            )
        if len(data) == 0:
            raise ValueError("expected an event shape with at least one dimension, got ()")
        self.flow = flow
        self.event_shape: tuple[int, ...] = data
        self.latent_shape: tuple[int, ...] = latent
        self.base = base
        self.dequantize = bool(dequantize)
        self.levels: int | None = None
        self.alpha: float | None = None
        self.preprocess: Transform | None = None
        if levels is not None:
            pre: FlowTransform
            if alpha is None:
                pre = LevelScaling(data, levels)
            else:
                pre = LogitPreprocess(data, levels, alpha)
                self.alpha = pre.alpha
            self.preprocess = pre
            self.levels = pre.levels
        self.register_buffer("base_loc", torch.zeros(latent))
        self.register_buffer("base_scale", torch.ones(latent))

    # ------------------------------------------------------------------ density
    @property
    def distribution(self) -> dist.TransformedDistribution:
        """The density as a Pyro ``TransformedDistribution(base, [flow, pre])`` (a
        :class:`~pyro_genext.distributions.FlowDistribution`, which scores in one fused pass,
        compiled or not), built afresh from the current parameters (cheap: no network
        runs)."""
        k = len(self.latent_shape)
        loc, scale = self.base_loc, self.base_scale
        base_dist = dist.Normal(loc, scale) if self.base == "normal" else dist.Logistic(loc, scale)
        transforms = [self.flow] if self.preprocess is None else [self.flow, self.preprocess]
        return FlowDistribution(base_dist.to_event(k), transforms)

    def log_prob(self, x: torch.Tensor, dequantize: bool = False) -> torch.Tensor:
        """The log-density of data ``x`` of shape ``(*batch, *event_shape)`` on the data
        scale, every Jacobian included; with ``dequantize=True`` (discrete data only) of
        ``x + u`` for one draw of uniform noise ``u``. Returns shape ``batch``.

        ``x`` must be finite and in the support of the density (with ``dequantize=True``:
        integer levels in :math:`[0, L-1]`); otherwise ``ValueError`` (value checks can be
        switched off where data were validated once: :func:`pyro_genext.checks.data_checks`)."""
        x = self._check_data(x, "levels" if dequantize else "support")
        if dequantize:
            x = x + torch.rand_like(x)
        return self.distribution.log_prob(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`log_prob` without dequantization."""
        return self.log_prob(x)

    def bits_per_dim(self, x: torch.Tensor, dequantize: bool = False) -> torch.Tensor:
        """:func:`~pyro_genext.metrics.bits_per_dim` of :meth:`log_prob`; pass
        ``dequantize=True`` for the number papers report on discrete data."""
        return bits_per_dim(self.log_prob(x, dequantize), self.event_shape)

    # ------------------------------------------------------------------ pyro
    def model(self, x: torch.Tensor) -> None:
        """Observe data ``x`` of shape ``(N, *event_shape)`` under the flow density in a
        ``pyro.plate("data", N)``, at the site ``"x"``. Discrete data are dequantized in
        training mode if ``dequantize`` was set at construction."""
        noise = self.levels is not None and self.dequantize and self.training
        x = self._check_data(x, "levels" if noise else "range", batched=True)
        self._register_flow()
        # a new tensor every call: a flow with torch's identity-keyed cache (Pyro's own
        # transforms) would otherwise serve the previous step's graph in full-batch training
        x = x + torch.rand_like(x) if noise else x.view_as(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.distribution, obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """Empty: the model has no latent sites, so SVI maximises the likelihood."""

    def check_data(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` (shape ``(N, *event_shape)``) is data that
        :meth:`model` trains on: finite, and integer levels in :math:`[0, L-1]` (or values
        in the data range when the model does not dequantize). Runs even inside
        :func:`~pyro_genext.checks.data_checks` ``(False)``: call it once on a data set,
        then train without per-step checks."""
        noise = self.levels is not None and self.dequantize
        self._check_data(x, "levels" if noise else "range", batched=True, force=True)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> int:
        """Start the flow's :class:`~pyro_genext.transforms.ActNorm` layers from a batch
        of training data ``x`` (shape ``(N, *event_shape)``), prepared as :meth:`model`
        prepares it (dequantized when the model dequantizes); layers already started (a
        loaded checkpoint) are left alone. Returns the number of layers started. See
        :func:`~pyro_genext.transforms.initialize`."""
        noise = self.levels is not None and self.dequantize
        x = self._check_data(x, "levels" if noise else "range", batched=True)
        if noise:
            x = x + torch.rand_like(x)
        h = x if self.preprocess is None else self.preprocess.inv(x)
        return initialize(self.flow, h)

    def _register_flow(self) -> None:
        if not isinstance(self.flow, nn.Module):
            return
        prefix = f"{self._pyro_name}.flow" if self._pyro_name else "flow"
        pyro.module(prefix, self.flow)
        # pyro.module leaves a clashing parameter of another model in the store silently
        # (SVI would then train that one): refuse instead
        store = pyro.get_param_store()
        for pname, p in self.flow.named_parameters():
            full = param_with_module_name(prefix, pname)
            if p.requires_grad and store[full] is not p:
                raise RuntimeError(
                    f"Pyro's param store holds a parameter {full!r} that is not this model's: "
                    f"call pyro.clear_param_store() or give each FlowDensity its own name"
                )

    # ------------------------------------------------------------------ sampling
    def sample(
        self, n: int | Sequence[int] | torch.Size = (), quantize: bool = False
    ) -> torch.Tensor:
        r"""Draw ``n`` data points (an int or a sample shape), shape ``(*n, *event_shape)``,
        without gradients. Discrete data: values on the data scale, clamped into
        :math:`[0, L)`; ``quantize=True`` returns the integer levels
        :math:`\lfloor x \rfloor \in \{0, \dots, L-1\}` (as floats)."""
        shape = torch.Size((n,) if isinstance(n, int) else tuple(n))
        x = self.distribution.sample(shape)
        return self._to_levels(x, quantize)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        r"""The latent :math:`z = f^{-1}(\mathrm{pre}^{-1}(x))` of data ``x``, exactly (no
        dequantization noise). ``x`` may be anywhere in the support of the density."""
        x = self._check_data(x, "support")
        h = x if self.preprocess is None else self.preprocess.inv(x)
        return self.flow.inv(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        r"""The data point :math:`x = \mathrm{pre}(f(z))` of latent ``z``: the exact inverse
        of :meth:`encode` (no clamping or quantization)."""
        check_event_shape(z, self.latent_shape, "latent")
        h = self.flow(z)
        return h if self.preprocess is None else self.preprocess(h)

    def _to_levels(self, x: torch.Tensor, quantize: bool) -> torch.Tensor:
        if self.levels is None:
            return x
        top = torch.nextafter(x.new_tensor(float(self.levels)), x.new_tensor(0.0))
        x = torch.minimum(x.clamp_min(0.0), top)
        return torch.floor(x) if quantize else x

    # ------------------------------------------------------------------ checks
    def _check_data(
        self, x: torch.Tensor, check: Check, batched: bool = False, force: bool = False
    ) -> torch.Tensor:
        """Validate data before any computation; data of another real dtype (integers,
        booleans, other floats) become the model's dtype; an empty batch is refused.

        ``check``: ``"levels"``, integer levels in :math:`[0, L-1]` (before dequantization);
        ``"range"``, the data range :math:`[0, L)`; ``"support"``, the support of the
        density, which with the logit pre-processing is slightly wider than the data range.
        Continuous data are only checked to be finite.
        """
        x = as_model_dtype(x, self.base_loc.dtype)
        check_event_shape(x, self.event_shape, "data")
        if x.numel() == 0:
            raise ValueError(f"expected at least one example, got an empty batch of shape {tuple(x.shape)}")
        if batched and x.dim() != len(self.event_shape) + 1:
            raise ValueError(
                f"expected data of shape (N, *{self.event_shape}), got {tuple(x.shape)}"
            )
        if check == "levels" and self.levels is None:
            raise ValueError("dequantization needs discrete data: construct with levels=L")
        if not (force or data_checks_enabled()):  # validated once, where it was loaded
            return x
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"expected finite data, got {bad} NaN or infinite values")
        if self.levels is None or x.numel() == 0:
            return x
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if check == "levels" and (lo < 0 or hi > self.levels - 1 or bool((x != x.floor()).any())):
            raise ValueError(
                f"expected integer levels in [0, {self.levels - 1}] (levels={self.levels}), "
                f"got values in [{lo:g}, {hi:g}]"
                + ("" if bool((x == x.floor()).all()) else " that are not all integers")
            )
        if check == "range" and (lo < 0 or hi >= self.levels):
            raise ValueError(
                f"expected data in [0, {self.levels}) (levels={self.levels}), "
                f"got values in [{lo:g}, {hi:g}]"
            )
        if check == "support" and not bool(self.distribution.support.check(x).all()):
            raise ValueError(
                f"expected data in the support of the density, {self.distribution.support} "
                f"(data range [0, {self.levels})), got values in [{lo:g}, {hi:g}]"
            )
        return x

    def extra_repr(self) -> str:
        parts = [f"event_shape={self.event_shape}", f"base={self.base!r}"]
        if self.levels is not None:
            parts += [f"levels={self.levels}", f"alpha={self.alpha}", f"dequantize={self.dequantize}"]
        return ", ".join(parts)
