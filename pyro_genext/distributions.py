r"""A ``TransformedDistribution`` that scores a flow in one fused pass, compiled or not.

:math:`\log p(y) = \log p_0(f^{-1}(y)) - \log|\det J_f(f^{-1}(y))|`. Pyro's (torch's)
``TransformedDistribution.log_prob`` asks each transform for ``t.inv(y)`` and then, in a
second call, for ``t.log_abs_det_jacobian(x, y)``; our bijectors answer the second call
from their cache, but inside ``torch.compile`` they keep no cache (see
:mod:`pyro_genext.transforms.base`), so the networks would run twice there.
:class:`FlowDistribution` asks a :class:`~pyro_genext.transforms.FlowTransform` for both
at once (``_inverse_and_ladj``), so scoring runs every network once and remembers
nothing; a sample the flow has just returned is still served from its cache (a guide's
``rsample`` then ``log_prob`` runs the networks once).
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch

from .transforms.base import FlowTransform, sum_rightmost

__all__ = ["FlowDistribution"]


class FlowDistribution(dist.TransformedDistribution):
    r"""Pyro's ``TransformedDistribution`` with a fused ``log_prob`` for our bijectors
    (other transforms are scored as Pyro scores them). Sampling, ``expand``, ``support``
    and everything else are Pyro's.

    Cost of ``log_prob``: one pass of every network, eager or compiled; nothing is
    remembered.

    Example::

        >>> import pyro_genext as pg
        >>> flow = pg.realnvp(3, num_layers=2, hidden_dims=(8,))
        >>> base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        >>> d = FlowDistribution(base, [flow])
        >>> y = torch.randn(5, 3)
        >>> bool(torch.allclose(d.log_prob(y),
        ...                     dist.TransformedDistribution(base, [flow]).log_prob(y)))
        True
    """

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Pyro's ``sample``: a base draw pushed through every transform without
        gradients. A normal base (``Normal``, or ``Normal`` under ``Independent``, torch's
        or Pyro's classes exactly) is drawn as ``torch.normal`` draws it, standard normal
        values then ``* scale + loc`` in place, which gives the same bits from the same
        random stream, without ``torch.normal``'s scan of ``scale`` for a negative value
        (the distribution's own validation checks ``scale``; on a GPU that scan waits
        for the device)."""
        with torch.no_grad():
            x = _normal_draw(self.base_dist, sample_shape)
            if x is None:
                x = self.base_dist.sample(sample_shape)
            for t in self.transforms:
                x = t(x)
            return x

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        event_dim = len(self.event_shape)
        log_prob: torch.Tensor | float = 0.0
        y = value
        for t in reversed(self.transforms):
            if isinstance(t, FlowTransform):
                x, ladj = t._inverse_with_ladj(y)
            else:
                x = t.inv(y)
                ladj = t.log_abs_det_jacobian(x, y)
            event_dim += t.domain.event_dim - t.codomain.event_dim
            log_prob = log_prob - sum_rightmost(ladj, event_dim - t.domain.event_dim)
            y = x
        base = sum_rightmost(self.base_dist.log_prob(y), event_dim - len(self.base_dist.event_shape))
        return log_prob + base


_NORMALS = (torch.distributions.Normal, dist.Normal)
_INDEPENDENTS = (torch.distributions.Independent, dist.Independent)


def _normal_draw(d: torch.distributions.Distribution, sample_shape: Any) -> torch.Tensor | None:
    """``d.sample(sample_shape)`` for a normal ``d`` (``None`` for any other), as
    ``torch.normal(loc, scale)`` computes it: ``normal_(0, 1)``, ``mul_(scale)``,
    ``add_(loc)``."""
    inner = d
    while type(inner) in _INDEPENDENTS:
        inner = inner.base_dist  # type: ignore[attr-defined]
    if type(inner) not in _NORMALS:
        return None
    loc, scale = inner.loc, inner.scale  # type: ignore[attr-defined]
    shape = d._extended_shape(torch.Size(sample_shape))
    return torch.randn(shape, dtype=loc.dtype, device=loc.device).mul_(scale).add_(loc)
