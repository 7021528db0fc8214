r"""Pre-processing bijectors between a flow's real-valued output and discrete-level data.

Data with :math:`L` levels per dimension (256 for 8-bit images, 17 for scikit-learn
digits) are modelled on the *data scale* :math:`[0, L)^D`: integer levels plus uniform
dequantization noise (added by the model, see :class:`~pyro_genext.models.FlowDensity`;
it is stochastic, so it is not a bijector). The bijectors here connect that scale to the
real line on which a flow works. As everywhere in the package, forward is base -> data
(sampling) and scoring runs the inverse.

* :class:`LevelScaling`: :math:`y = L x`, from the unit scale to the data scale.
* :class:`AlphaSigmoid`: :math:`u = (\sigma(z) - \alpha) / (1 - 2\alpha)`, whose inverse is
  RealNVP's logit pre-processing :math:`z = \operatorname{logit}(\alpha + (1 - 2\alpha) u)`.
* :class:`LogitPreprocess`: the two together, :math:`y = L (\sigma(z) - \alpha)/(1 - 2\alpha)`,
  real -> data scale in one step.

All three are parameter-free, element-wise and increasing (``sign = +1``); sampling and
scoring are both one element-wise pass.

A note on :math:`\alpha > 0`: the image of the real line under :class:`AlphaSigmoid` is
the open interval :math:`(-\alpha/(1-2\alpha),\ (1-\alpha)/(1-2\alpha))`, a little wider
than :math:`[0, 1)`, and the constraints say so. A density pushed through it keeps a
little mass outside the data range, so its log-likelihood of data in :math:`[0, 1)`
is a lower bound on that of the density renormalised to the data range (RealNVP reports
the same quantity).

Reference: Dinh, Sohl-Dickstein, Bengio (2016), Density estimation using Real NVP,
arXiv:1605.08803, section 4.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from .base import Bijector, sum_rightmost

__all__ = ["LevelScaling", "AlphaSigmoid", "LogitPreprocess"]


class _OpenInterval(constraints.Constraint):
    """The open interval ``(lower, upper)`` (torch ships closed and half-open ones)."""

    def __init__(self, lower: float, upper: float) -> None:
        self.lower_bound = lower
        self.upper_bound = upper
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return (self.lower_bound < value) & (value < self.upper_bound)

    def __repr__(self) -> str:
        return f"{type(self).__name__[1:]}(lower_bound={self.lower_bound}, upper_bound={self.upper_bound})"


def _event_shape(event_shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    shape = (event_shape,) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"expected an event shape of sizes >= 1, got {shape}")
    return shape


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or int(levels) != levels or levels < 2:
        raise ValueError(f"expected levels an integer >= 2, got {levels!r}")
    return int(levels)


def _check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) < 0.5:
        raise ValueError(f"expected 0 < alpha < 0.5, got {alpha!r}")
    return float(alpha)


def squash(z: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`u = (\sigma(z) - \alpha)/(1 - 2\alpha)` and the element-wise
    :math:`\log \frac{du}{dz} = -\operatorname{softplus}(z) - \operatorname{softplus}(-z)
    - \log(1 - 2\alpha)` (as :math:`\log\sigma(z) + \log\sigma(-z)`, stable for large
    :math:`|z|`)."""
    u = (torch.sigmoid(z) - alpha) / (1.0 - 2.0 * alpha)
    ladj = -F.softplus(z) - F.softplus(-z) - math.log1p(-2.0 * alpha)
    return u, ladj


def unsquash(u: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The inverse of :func:`squash`: :math:`s = \alpha + (1 - 2\alpha) u`,
    :math:`z = \log s - \log(1 - s)`, with the *forward* element-wise log-derivative
    :math:`\log s + \log(1 - s) - \log(1 - 2\alpha)` (as :math:`\sigma(z) = s`)."""
    s = alpha + (1.0 - 2.0 * alpha) * u
    log_s, log_1ms = torch.log(s), torch.log1p(-s)
    return log_s - log_1ms, log_s + log_1ms - math.log1p(-2.0 * alpha)


class LevelScaling(Bijector):
    r"""From the unit scale to the data scale of :math:`L` levels: :math:`y = L x`,
    :math:`\log|\det J| = D \log L` with :math:`D` the number of elements of one event.

    Maps :math:`[0, 1)^D` onto the data scale :math:`[0, L)^D` (as a linear map it is
    defined on all of :math:`\mathbb{R}^D`, and its constraints are real on both sides).
    Use it alone when the flow works on the unit scale, as NICE did; after a sigmoid use
    :class:`LogitPreprocess`, whose constraints track the interval.

    Args:
        event_shape: the shape of one event, e.g. ``64`` or ``(1, 8, 8)``.
        levels: the number of levels :math:`L`, e.g. 256 for 8-bit images.

    Example::

        >>> t = LevelScaling(3, levels=256)
        >>> t(torch.tensor([0.0, 0.5, 0.99]))
        tensor([  0.0000, 128.0000, 253.4400])
        >>> round(float(t.log_abs_det_jacobian(torch.zeros(3), t(torch.zeros(3)))), 4)
        16.6355

    Reference: Dinh, Krueger, Bengio (2014), NICE, arXiv:1410.8516, section 5.1.
    """

    def __init__(
        self, event_shape: int | Sequence[int] | torch.Size, levels: int, cache_size: int = 0
    ) -> None:
        super().__init__(_event_shape(event_shape), cache_size=cache_size)
        self.levels = _check_levels(levels)
        self._log_det = math.prod(self.event_shape) * math.log(self.levels)

    def _const(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_full(x.shape[: x.dim() - len(self.event_shape)], self._log_det)

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.levels, self._const(x)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y / self.levels, self._const(y)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, levels={self.levels}"


class AlphaSigmoid(Bijector):
    r"""RealNVP's logit pre-processing as a bijector, real -> unit scale.

    Forward (base -> data): :math:`u = (\sigma(z) - \alpha)/(1 - 2\alpha)`. Inverse
    (scoring): :math:`z = \operatorname{logit}(\alpha + (1 - 2\alpha)u)`, the paper's
    transform of data :math:`u \in [0, 1)`; the :math:`\alpha` margin keeps :math:`z`
    finite at the ends of the data range, :math:`|z| \le \operatorname{logit}(1-\alpha)`.

    .. math::

        \log\left|\det \frac{\partial u}{\partial z}\right|
        = \sum_i \bigl[\log\sigma(z_i) + \log\sigma(-z_i)\bigr] - D\log(1 - 2\alpha)
        = -\sum_i \bigl[\operatorname{softplus}(z_i) + \operatorname{softplus}(-z_i)\bigr]
          - D\log(1 - 2\alpha).

    The domain is real; the codomain is the open interval
    :math:`(-\alpha/(1-2\alpha),\ (1-\alpha)/(1-2\alpha))^D`, the exact image, which
    contains :math:`[0, 1)^D` (see the module notes on the mass outside it).

    Args:
        event_shape: the shape of one event.
        alpha: the margin :math:`0 < \alpha < 1/2`; RealNVP uses 0.05.

    Example::

        >>> t = AlphaSigmoid(2, alpha=0.05)
        >>> u = torch.tensor([[0.0, 0.5]])
        >>> t.inv(u)
        tensor([[-2.9444,  0.0000]])
        >>> torch.allclose(t(t.inv(u)), u)
        True

    Reference: Dinh, Sohl-Dickstein, Bengio (2016), Density estimation using Real NVP,
    arXiv:1605.08803, section 4.1.
    """

    def __init__(
        self, event_shape: int | Sequence[int] | torch.Size, alpha: float = 0.05,
        cache_size: int = 0,
    ) -> None:
        super().__init__(_event_shape(event_shape), cache_size=cache_size)
        self.alpha = _check_alpha(alpha)

    @property
    def _scale(self) -> float:
        return 1.0

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        a, c = self.alpha, self._scale
        interval = _OpenInterval(-c * a / (1 - 2 * a), c * (1 - a) / (1 - 2 * a))
        return constraints.independent(interval, len(self.event_shape))

    def _forward_and_ladj(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, ladj = squash(z, self.alpha)
        return u, sum_rightmost(ladj, len(self.event_shape))

    def _inverse_and_ladj(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, ladj = unsquash(u, self.alpha)
        return z, sum_rightmost(ladj, len(self.event_shape))

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, alpha={self.alpha}"


class LogitPreprocess(AlphaSigmoid):
    r"""RealNVP's pre-processing for data of :math:`L` levels, real -> data scale:
    :class:`AlphaSigmoid` followed by :class:`LevelScaling`.

    Forward (base -> data): :math:`y = L\,(\sigma(z) - \alpha)/(1 - 2\alpha)`. Inverse
    (scoring): :math:`z = \operatorname{logit}(\alpha + (1 - 2\alpha)\,y/L)` for data
    :math:`y \in [0, L)^D` (integer levels plus dequantization noise).

    .. math::

        \log\left|\det \frac{\partial y}{\partial z}\right|
        = -\sum_i \bigl[\operatorname{softplus}(z_i) + \operatorname{softplus}(-z_i)\bigr]
          + D\log L - D\log(1 - 2\alpha).

    A density pushed through it is a density on the data scale with unit-width bins, so
    :func:`~pyro_genext.metrics.bits_per_dim` applies to its ``log_prob`` directly. The
    codomain is the open interval :math:`L\,(-\alpha/(1-2\alpha),\ (1-\alpha)/(1-2\alpha))`
    per element, which contains the data range :math:`[0, L)`.

    Args:
        event_shape: the shape of one event, e.g. ``(1, 8, 8)``.
        levels: the number of levels :math:`L` (256 for 8-bit images, 17 for digits).
        alpha: the margin :math:`0 < \alpha < 1/2`; RealNVP uses 0.05.

    Example::

        >>> t = LogitPreprocess((1, 2, 2), levels=256)
        >>> y = torch.tensor([[[[0.0, 255.5], [128.0, 17.25]]]])
        >>> z = t.inv(y)
        >>> torch.allclose(t(z), y)
        True
        >>> t.log_abs_det_jacobian(z, y).shape
        torch.Size([1])

    Reference: Dinh, Sohl-Dickstein, Bengio (2016), Density estimation using Real NVP,
    arXiv:1605.08803, section 4.1.
    """

    def __init__(
        self, event_shape: int | Sequence[int] | torch.Size, levels: int, alpha: float = 0.05,
        cache_size: int = 0,
    ) -> None:
        super().__init__(event_shape, alpha, cache_size=cache_size)
        self.scaling = LevelScaling(self.event_shape, levels)
        self.levels = self.scaling.levels

    @property
    def _scale(self) -> float:
        return float(self.levels)

    def _forward_and_ladj(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, l1 = super()._forward_and_ladj(z)
        y, l2 = self.scaling._forward_and_ladj(u)
        return y, l1 + l2

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, l2 = self.scaling._inverse_and_ladj(y)
        z, l1 = super()._inverse_and_ladj(u)
        return z, l1 + l2

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, levels={self.levels}, alpha={self.alpha}"
