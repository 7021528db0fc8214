r"""Normalisation layers that are exact bijections: actnorm and flow batch norm.

Both normalise per feature (vectors) or per channel (images, statistics pooled over
batch and spatial positions). In the scoring direction (data -> base) they map data to
roughly zero mean and unit variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .base import Bijector

__all__ = ["ActNorm", "BatchNormFlow"]


def _as_shape(event_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    shape = (event_shape,) if isinstance(event_shape, int) else tuple(int(s) for s in event_shape)
    if len(shape) not in (1, 3) or any(s < 1 for s in shape):
        raise ValueError(f"expected an event shape (D,) or (C, H, W), got {shape}")
    return shape


class _PerChannel(Bijector):
    def __init__(self, event_shape: int | tuple[int, ...], cache_size: int = 0) -> None:
        shape = _as_shape(event_shape)
        super().__init__(shape, cache_size=cache_size)
        # parameters broadcast over the event: (D,) or (C, 1, 1)
        self._pshape = shape if len(shape) == 1 else (shape[0], 1, 1)
        self._spatial = 1 if len(shape) == 1 else shape[1] * shape[2]

    def _reduce_dims(self, y: torch.Tensor) -> list[int]:
        ed = len(self.event_shape)
        dims = list(range(y.dim() - ed))  # batch dims
        if ed == 3:
            dims += [y.dim() - 2, y.dim() - 1]
        return dims

    def _batch(self, x: torch.Tensor) -> torch.Size:
        return x.shape[: x.dim() - len(self.event_shape)]


class ActNorm(_PerChannel):
    r"""Activation normalisation: :math:`y = x \odot \exp(s) + b` per channel,
    :math:`\log|\det J| = HW \sum_c s_c` (:math:`\sum_i s_i` for vectors).

    Data-dependent initialisation: the first scoring call (``inv``) in training mode sets
    :math:`b` and :math:`s` so that the latent has zero mean and unit variance per channel
    on that batch; afterwards they are ordinary parameters. If the first call samples
    instead, the layer keeps its identity initialisation. An exact bijection in both train
    and eval mode. Cost: one element-wise affine map either way.

    Example::

        >>> t = ActNorm((2, 4, 4))
        >>> z = t.inv(3 + 2 * torch.randn(64, 2, 4, 4))
        >>> bool(z.detach().mean().abs() < 1e-5)
        True

    Reference: Kingma, Dhariwal (2018), Glow, arXiv:1807.03039.
    """

    initialized: torch.Tensor

    def __init__(self, event_shape: int | tuple[int, ...], cache_size: int = 0) -> None:
        super().__init__(event_shape, cache_size=cache_size)
        self.log_scale = nn.Parameter(torch.zeros(self._pshape))
        self.bias = nn.Parameter(torch.zeros(self._pshape))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, y: torch.Tensor) -> None:
        """Set the parameters from a batch of data ``y`` (scoring direction)."""
        dims = self._reduce_dims(y)
        events = y.numel() // math.prod(self.event_shape)
        if events < 2:
            self.initialized.fill_(True)  # a single event gives no usable statistics
            return
        mean = y.mean(dim=dims).reshape(self._pshape)
        std = y.std(dim=dims).reshape(self._pshape).clamp_min(1e-6)
        self.bias.copy_(mean)
        self.log_scale.copy_(torch.log(std))
        self.initialized.fill_(True)

    def _ladj(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_scale.sum() * self._spatial).expand(self._batch(x))

    def _start(self, inverse: bool, data: Callable[[], torch.Tensor]) -> None:
        """Before the first call: the first scoring call in training mode initialises
        from its ``data()``; a first sampling call keeps the identity initialisation."""
        if not self.initialized:
            if not inverse:
                self.initialized.fill_(True)
            elif self.training:
                self.initialize(data().detach())

    @staticmethod
    def _map(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor, inverse: bool) -> torch.Tensor:
        return (x - b) * torch.exp(-s) if inverse else x * torch.exp(s) + b

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._start(False, lambda: x)
        return self._map(x, self.log_scale, self.bias, False), self._ladj(x)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._start(True, lambda: y)
        return self._map(y, self.log_scale, self.bias, True), self._ladj(y)

    # A Chain runs consecutive couplings on the two halves of a split input (see
    # Chain._make_plan); this layer acts coordinate by coordinate (channel by channel), so
    # it can join such a run instead of forcing a join and a new split around itself.
    splittable = True

    def _halves_and_ladj(
        self, lo: torch.Tensor, hi: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The map on an input already split into ``lo`` and ``hi`` along the first
        parameter axis (features, or channels for images); same result as on the whole."""
        axis = -len(self.event_shape)
        self._start(inverse, lambda: torch.cat([lo, hi], dim=axis))
        sizes = (lo.shape[axis], hi.shape[axis])
        s_lo, s_hi = self.log_scale.split(sizes)
        b_lo, b_hi = self.bias.split(sizes)
        return self._map(lo, s_lo, b_lo, inverse), self._map(hi, s_hi, b_hi, inverse), self._ladj(lo)


class BatchNormFlow(_PerChannel):
    r"""RealNVP's batch normalisation as a bijector.

    Scoring (data -> base): :math:`x = (y - \mu)/\sqrt{\sigma^2 + \epsilon} \odot
    e^{\gamma} + \beta`. In training mode :math:`\mu, \sigma^2` are the batch's statistics
    (pooled per channel) and the running averages are updated; in eval mode the running
    averages are used and the layer is an exact bijection with
    :math:`\log|\det dy/dx| = \sum (\tfrac12\log(\sigma^2+\epsilon) - \gamma)` (times
    :math:`HW` per channel for images). Sampling always uses the running averages, so in
    training mode sampling is not the exact inverse of scoring: call ``.eval()`` before
    sampling or checking. Cost: one element-wise affine map either way.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``.
        momentum: weight of the newest batch in the running averages.
        eps: added to the variance.

    Example::

        >>> t = BatchNormFlow((3,))
        >>> _ = t.inv(torch.randn(100, 3) * 5)  # training mode: batch statistics
        >>> t = t.eval()  # now an exact bijection
        >>> x = torch.randn(4, 3)
        >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
        True

    Reference: Dinh, Sohl-Dickstein, Bengio (2016), arXiv:1605.08803, section 3.7.
    """

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self,
        event_shape: int | tuple[int, ...],
        momentum: float = 0.05,
        eps: float = 1e-5,
        cache_size: int = 0,
    ) -> None:
        super().__init__(event_shape, cache_size=cache_size)
        if not 0 < momentum <= 1:
            raise ValueError(f"expected 0 < momentum <= 1, got {momentum}")
        self.momentum = momentum
        self.eps = eps
        self.log_gamma = nn.Parameter(torch.zeros(self._pshape))
        self.beta = nn.Parameter(torch.zeros(self._pshape))
        self.register_buffer("running_mean", torch.zeros(self._pshape))
        self.register_buffer("running_var", torch.ones(self._pshape))

    def _ladj_from(self, var: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        per = 0.5 * torch.log(var + self.eps) - self.log_gamma
        return (per.sum() * self._spatial).expand(self._batch(x))

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.running_mean, self.running_var
        y = (x - self.beta) * torch.exp(-self.log_gamma) * torch.sqrt(var + self.eps) + mean
        return y, self._ladj_from(var, x)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            dims = self._reduce_dims(y)
            mean = y.mean(dim=dims).reshape(self._pshape)
            var = y.var(dim=dims, unbiased=False).reshape(self._pshape)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        x = (y - mean) / torch.sqrt(var + self.eps) * torch.exp(self.log_gamma) + self.beta
        return x, self._ladj_from(var, y)
