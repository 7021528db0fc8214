r"""Normalisation layers that are exact bijections: actnorm and flow batch norm.

Both normalise per feature (vectors) or per channel (images, statistics pooled over
batch and spatial positions). In the scoring direction (data -> base) they map data to
roughly zero mean and unit variance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.distributions import Transform

from .base import Bijector, FlowTransform, check_event_shape

__all__ = ["ActNorm", "BatchNormFlow", "initialize"]


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


def _pooled(stats: torch.Tensor) -> torch.Tensor:
    """Sums over every process when ``torch.distributed`` is running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
    return stats


class ActNorm(_PerChannel):
    r"""Activation normalisation: :math:`y = x \odot \exp(s) + b` per channel,
    :math:`\log|\det J| = HW \sum_c s_c` (:math:`\sum_i s_i` for vectors).

    **Start-up, by one explicit rule.** A new layer is the identity (:math:`s = b = 0`),
    whatever is called first. :func:`initialize` (which
    :meth:`FlowDensity.initialize <pyro_genext.models.FlowDensity.initialize>` and the
    training engine call on the first training batch) runs the scoring direction once on
    a batch, and every layer not yet started sets :math:`b` and :math:`s` so that its
    output (the latent side) has zero mean and unit variance per channel on that batch;
    afterwards they are ordinary parameters. The buffer ``initialized`` records it and
    travels with ``state_dict``, so a loaded layer is not started again. Under
    ``torch.distributed`` the statistics are pooled over all processes, so every rank
    starts with the same parameters. A guide (nothing to start from) keeps the identity.

    An exact bijection in train and eval mode alike. Cost: one element-wise affine map
    either way.

    Example::

        >>> t = ActNorm((2, 4, 4))
        >>> y = 3 + 2 * torch.randn(64, 2, 4, 4)
        >>> bool(torch.allclose(t.inv(y), y))  # not started: the identity
        True
        >>> initialize(t, y)
        1
        >>> bool(t.inv(y).detach().mean().abs() < 1e-5)
        True

    Reference: Kingma, Dhariwal (2018), Glow, arXiv:1807.03039.
    """

    initialized: torch.Tensor

    def __init__(self, event_shape: int | tuple[int, ...], cache_size: int = 0) -> None:
        super().__init__(event_shape, cache_size=cache_size)
        self.log_scale = nn.Parameter(torch.zeros(self._pshape))
        self.bias = nn.Parameter(torch.zeros(self._pshape))
        self.register_buffer("initialized", torch.tensor(False))
        self._pending = False  # set by initialize() for the length of one scoring pass

    @torch.no_grad()
    def initialize(self, y: torch.Tensor) -> None:
        """Set the parameters from a batch of data ``y`` (this layer's input in the
        scoring direction), pooling the statistics over processes under
        ``torch.distributed``."""
        dims = self._reduce_dims(y)
        yd = y.detach().to(self.bias.dtype)
        s1 = yd.sum(dim=dims)
        n = torch.full_like(s1, yd.numel() // max(s1.numel(), 1))
        n, s1 = _pooled(torch.stack([n, s1]))
        if bool((n < 2).any()):  # fewer than two values per channel: no usable statistics
            self.initialized.fill_(True)
            return
        mean = s1 / n
        centred = yd - mean.reshape(self._pshape)
        (c2,) = _pooled((centred * centred).sum(dim=dims)[None])
        var = (c2 / (n - 1)).clamp_min(1e-12)
        self.bias.copy_(mean.reshape(self._pshape))
        self.log_scale.copy_(0.5 * torch.log(var).reshape(self._pshape).clamp_min(math.log(1e-6)))
        self.initialized.fill_(True)

    def _ladj(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_scale.sum() * self._spatial).expand(self._batch(x))

    def _start(self, y: torch.Tensor) -> None:
        """The start-up :func:`initialize` asked for, on this layer's scoring input."""
        self._pending = False
        self.initialize(y)

    @staticmethod
    def _map(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor, inverse: bool) -> torch.Tensor:
        return (x - b) * torch.exp(-s) if inverse else x * torch.exp(s) + b

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._map(x, self.log_scale, self.bias, False), self._ladj(x)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pending:
            self._start(y)
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
        if inverse and self._pending:
            self._start(torch.cat([lo, hi], dim=axis))
        sizes = (lo.shape[axis], hi.shape[axis])
        s_lo, s_hi = self.log_scale.split(sizes)
        b_lo, b_hi = self.bias.split(sizes)
        return self._map(lo, s_lo, b_lo, inverse), self._map(hi, s_hi, b_hi, inverse), self._ladj(lo)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_pending", False)


def _owned_modules(flow: Any) -> list[nn.Module]:
    if isinstance(flow, FlowTransform):
        return flow._state_modules()
    if isinstance(flow, nn.Module):
        return [flow]
    parts = getattr(flow, "parts", None)  # ComposeTransform
    if isinstance(parts, (list, tuple)):
        return [m for p in parts for m in _owned_modules(p)]
    return []


def initialize(flow: Transform, y: torch.Tensor, force: bool = False) -> int:
    r"""Data-dependent start-up of every :class:`ActNorm` in ``flow`` on a batch ``y`` of
    data (``flow``'s codomain, the data side): one scoring pass (``flow.inv``) without
    gradients, in which each layer not yet started (every layer, with ``force=True``)
    sets its scale and shift from the batch as it reaches it. Returns the number of
    layers started. Call it once, on the first training batch, before training; a loaded
    checkpoint's layers are not started again.

    Example::

        >>> import pyro_genext as pg
        >>> flow = pg.realnvp(4, num_layers=2, hidden_dims=(8,))
        >>> initialize(flow, 10 + torch.randn(256, 4))
        2
        >>> z = flow.inv(10 + torch.randn(256, 4)).detach()
        >>> bool(z.mean().abs() < 0.3)
        True
    """
    layers = [m for root in _owned_modules(flow) for m in root.modules()
              if isinstance(m, ActNorm) and (force or not bool(m.initialized))]
    if not layers:
        return 0
    for m in layers:
        m._pending = True
    try:
        with torch.no_grad():
            if isinstance(flow, FlowTransform):
                check_event_shape(y, flow.codomain_event_shape, "data")
                flow._inverse_and_ladj(y)
            else:
                flow.inv(y)
    finally:
        for m in layers:
            m._pending = False
    return len(layers)


class BatchNormFlow(_PerChannel):
    r"""RealNVP's batch normalisation as a bijector.

    Scoring (data -> base): :math:`x = (y - \mu)/\sqrt{\sigma^2 + \epsilon} \odot
    e^{\gamma} + \beta`. In training mode :math:`\mu, \sigma^2` are the batch's statistics
    (pooled per channel) and the running averages are updated; in eval mode the running
    averages are used and the layer is an exact bijection with
    :math:`\log|\det dy/dx| = \sum (\tfrac12\log(\sigma^2+\epsilon) - \gamma)` (times
    :math:`HW` per channel for images).

    **For density models only.** Sampling can only use the running averages, so in
    training mode it is not the inverse of scoring: a flow that samples then scores (a
    guide, a variational posterior) would get a wrong :math:`\log q` (issue 7 reported
    -7.12 against the true -6.67). Sampling in training mode therefore raises ``ValueError``;
    call ``.eval()`` before sampling, and use :class:`ActNorm` in guides. In training mode
    the log-det of a scored batch comes from the scoring pass itself, so the layer is
    cached (``cache_size=1``) by default. Cost: one element-wise affine map either way.

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
        cache_size: int = 1,
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
        if self.training:
            raise ValueError(
                "BatchNormFlow cannot sample (or recompute a log-det) in training mode: it "
                "scores with the batch's statistics, which sampling cannot know, so a flow "
                "that samples then scores (a guide) would get a wrong log q; call .eval() "
                "before sampling, or use norm='actnorm' in a flow that samples while training"
            )
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
