r"""NICE's diagonal scaling layer."""

from __future__ import annotations

import torch
from torch import nn

from .base import Bijector

__all__ = ["DiagonalScaling"]


class DiagonalScaling(Bijector):
    r"""NICE's diagonal scaling layer :math:`y = \exp(s) \odot x` with a learnable
    :math:`s` of the event shape, :math:`\log|\det J| = \sum_i s_i`.

    Additive couplings preserve volume; this layer is what lets a NICE flow
    contract or expand each dimension. Sampling and scoring are both one element-wise
    product; the log-determinant does not depend on the input.

    Args:
        event_shape: the shape of one event, e.g. ``(784,)`` or ``(1, 28, 28)``.

    Example::

        >>> t = DiagonalScaling((3,))
        >>> t(torch.ones(2, 3))
        tensor([[1., 1., 1.],
                [1., 1., 1.]], grad_fn=<MulBackward0>)

    Reference: Dinh, Krueger, Bengio (2014), NICE, arXiv:1410.8516, section 3.3.
    """

    def __init__(self, event_shape: int | tuple[int, ...], cache_size: int = 0) -> None:
        if isinstance(event_shape, int):
            event_shape = (event_shape,)
        if len(event_shape) == 0 or any(int(s) < 1 for s in event_shape):
            raise ValueError(f"expected a non-empty event shape of sizes >= 1, got {event_shape}")
        super().__init__(tuple(event_shape), cache_size=cache_size)
        self.log_scale = nn.Parameter(torch.zeros(self.event_shape))

    def _ladj(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.event_shape)
        return self.log_scale.sum().expand(x.shape[: x.dim() - k])

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * torch.exp(self.log_scale), self._ladj(x)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y * torch.exp(-self.log_scale), self._ladj(y)
