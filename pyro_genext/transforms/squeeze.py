r"""Squeeze (space-to-depth), RealNVP's way of trading spatial size for channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Bijector

__all__ = ["Squeeze", "squeeze", "unsqueeze"]


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(..., C, H, W) -> (..., 4C, H/2, W/2); output channel ``4c + 2i + j`` holds
    pixel ``(2h + i, 2w + j)`` of input channel ``c``: torch's ``pixel_unshuffle`` by 2."""
    return F.pixel_unshuffle(x, 2)


def unsqueeze(y: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`squeeze`: (..., 4C, H, W) -> (..., C, 2H, 2W), torch's
    ``pixel_shuffle`` by 2."""
    return F.pixel_shuffle(y, 2)


def _permutation_sign(perm: torch.Tensor) -> int:
    seen = torch.zeros(perm.numel(), dtype=torch.bool)
    p = perm.tolist()
    sign = 1
    for start in range(len(p)):
        if seen[start]:
            continue
        length, j = 0, start
        while not seen[j]:
            seen[j] = True
            j = p[j]
            length += 1
        if length % 2 == 0:
            sign = -sign
    return sign


class Squeeze(Bijector):
    r"""Space-to-depth: each 2x2 block of pixels becomes four channels,
    :math:`(C, H, W) \to (4C, H/2, W/2)`. A permutation of the coordinates, so
    :math:`\log|\det J| = 0`; :attr:`sign` is the permutation's parity.

    Forward (base -> data) squeezes; the inverse unsqueezes. Both are a reshape and a
    permute, the same cost either way.

    Args:
        input_shape: ``(C, H, W)`` with H and W even.

    Example::

        >>> t = Squeeze((1, 4, 4))
        >>> t(torch.zeros(2, 1, 4, 4)).shape
        torch.Size([2, 4, 2, 2])

    Reference: Dinh, Sohl-Dickstein, Bengio (2016), arXiv:1605.08803, section 3.6.
    """

    def __init__(self, input_shape: tuple[int, int, int], cache_size: int = 0) -> None:
        if len(input_shape) != 3:
            raise ValueError(f"Squeeze: expected an input shape (C, H, W), got {tuple(input_shape)}")
        c, h, w = (int(s) for s in input_shape)
        if c < 1 or h < 2 or w < 2 or h % 2 or w % 2:
            raise ValueError(
                f"Squeeze: expected an input shape (C, H, W) with H and W even, "
                f"got {tuple(input_shape)}"
            )
        super().__init__((c, h, w), cache_size=cache_size)
        self._out_shape = (4 * c, h // 2, w // 2)
        perm = squeeze(torch.arange(c * h * w).reshape(1, c, h, w)).reshape(-1)
        self._sign = _permutation_sign(perm)

    @property
    def codomain_event_shape(self) -> tuple[int, ...]:
        return self._out_shape

    @property
    def sign(self) -> int:
        return self._sign

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return squeeze(x), x.new_zeros(x.shape[:-3])

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return unsqueeze(y), y.new_zeros(y.shape[:-3])
