r"""A fixed permutation of the coordinates of a vector."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Bijector

__all__ = ["Permute"]


class Permute(Bijector):
    r"""The fixed permutation :math:`y_i = x_{\pi(i)}` of a vector event,
    :math:`\log|\det J| = 0`.

    Placed between couplings it changes which coordinates condition which, while each
    coupling keeps the cheap contiguous split of :func:`~pyro_genext.transforms.half_mask`.
    Sampling and scoring are one ``index_select`` each. The sign of the determinant is
    that of the permutation.

    Args:
        permutation: a permutation of ``range(D)``.

    Example::

        >>> t = Permute([2, 0, 1])
        >>> t(torch.tensor([10.0, 20.0, 30.0]))
        tensor([30., 10., 20.])
        >>> t.inv(t(torch.tensor([10.0, 20.0, 30.0])))
        tensor([10., 20., 30.])
    """

    permutation: torch.Tensor
    inverse_permutation: torch.Tensor

    def __init__(self, permutation: Sequence[int] | torch.Tensor, cache_size: int = 0) -> None:
        perm = torch.as_tensor(permutation, dtype=torch.long).reshape(-1)
        d = perm.numel()
        if d == 0 or not torch.equal(torch.sort(perm).values, torch.arange(d)):
            raise ValueError(
                f"expected a permutation of range({d}), got {perm.tolist()}"
            )
        super().__init__((d,), cache_size=cache_size)
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    @property
    def sign(self) -> int:
        # the parity of a permutation is that of D minus its number of cycles
        seen = [False] * len(self.permutation)
        cycles = 0
        for start in range(len(seen)):
            if not seen[start]:
                cycles += 1
                j = start
                while not seen[j]:
                    seen[j] = True
                    j = int(self.permutation[j])
        return -1 if (len(seen) - cycles) % 2 else 1

    def _zeros(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[:-1])

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.index_select(-1, self.permutation), self._zeros(x)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y.index_select(-1, self.inverse_permutation), self._zeros(y)

    def extra_repr(self) -> str:
        return f"permutation={self.permutation.tolist()}"
