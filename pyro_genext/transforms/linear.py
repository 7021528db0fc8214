r"""An affine map with a diagonal or lower-triangular linear part."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Bijector

__all__ = ["Affine"]


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class Affine(Bijector):
    r"""The affine map :math:`y = \mu + \operatorname{diag}(\sigma)\,T\,x` of a vector,
    with :math:`\sigma = \operatorname{softplus}(\rho) > 0` and :math:`T` unit lower
    triangular (``tril=True``) or the identity (``tril=False``);
    :math:`\log|\det J| = \sum_i \log \sigma_i`.

    This is how Pyro parametrises its Gaussian autoguides: on a standard normal input,
    ``tril=False`` gives ``AutoNormal``'s :math:`\mathcal N(\mu, \operatorname{diag}\sigma^2)`
    and ``tril=True`` gives ``AutoMultivariateNormal``'s
    :math:`\mathcal N(\mu, LL^\top)` with :math:`L = \operatorname{diag}(\sigma)\,T`
    (the same softplus scale and unit lower-triangular factor).

    Cost: sampling is a matrix-vector product, :math:`O(D^2)` per event with ``tril=True``
    and :math:`O(D)` without; scoring is a triangular solve of the same order.

    Args:
        dim: the event size :math:`D`.
        loc: initial :math:`\mu` (default zeros).
        scale: initial :math:`\sigma`, a positive number or a tensor of size ``D``
            (default ones).
        tril: learn the strictly lower triangle of :math:`T` too.

    Example::

        >>> t = Affine(2, loc=torch.tensor([1.0, -1.0]), scale=0.5)
        >>> y = t(torch.ones(2))
        >>> y.detach(), t.log_abs_det_jacobian(torch.ones(2), y).detach()
        (tensor([ 1.5000, -0.5000]), tensor(-1.3863))
    """

    def __init__(
        self,
        dim: int,
        loc: torch.Tensor | None = None,
        scale: float | torch.Tensor = 1.0,
        tril: bool = False,
        cache_size: int = 0,
    ) -> None:
        if int(dim) < 1:
            raise ValueError(f"expected dim >= 1, got {dim}")
        dim = int(dim)
        loc_t = torch.zeros(dim) if loc is None else torch.as_tensor(loc, dtype=torch.get_default_dtype())
        if loc_t.shape != (dim,):
            raise ValueError(f"expected loc of shape ({dim},), got {tuple(loc_t.shape)}")
        scale_t = torch.as_tensor(scale, dtype=loc_t.dtype).expand(dim).clone()
        if not (scale_t > 0).all():
            raise ValueError(f"expected a positive scale, got {scale_t.tolist()}")
        super().__init__((dim,), cache_size=cache_size)
        self.tril = bool(tril)
        self.loc = nn.Parameter(loc_t.detach().clone())
        self.raw_scale = nn.Parameter(_softplus_inverse(scale_t.detach()))
        if self.tril:
            self.raw_tril = nn.Parameter(torch.zeros(dim, dim, dtype=loc_t.dtype))

    @property
    def scale(self) -> torch.Tensor:
        """The positive diagonal :math:`\\sigma`."""
        return F.softplus(self.raw_scale)

    def unit_tril(self) -> torch.Tensor:
        """The unit lower-triangular :math:`T` (``tril=True`` only)."""
        eye = torch.eye(self.event_shape[0], dtype=self.raw_tril.dtype, device=self.raw_tril.device)
        return self.raw_tril.tril(-1) + eye

    def scale_tril(self) -> torch.Tensor:
        """The Cholesky factor :math:`L = \\operatorname{diag}(\\sigma)\\,T` of the covariance
        that a standard normal input gets."""
        if self.tril:
            return self.scale[:, None] * self.unit_tril()
        return torch.diag(self.scale)

    def _ladj(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale.log().sum().expand(x.shape[:-1])

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale
        h = x @ self.unit_tril().T if self.tril else x
        return torch.addcmul(self.loc, scale, h), self._ladj(x, scale)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scale
        h = (y - self.loc) / scale
        if self.tril:
            h = torch.linalg.solve_triangular(
                self.unit_tril(), h.unsqueeze(-1), upper=False, unitriangular=True
            ).squeeze(-1)
        return h, self._ladj(y, scale)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}, tril={self.tril}"
