"""Stateless element-wise maps used inside couplings.

Each map takes the transformed part ``x_B``, the conditioner's parameters (already split)
and a direction, and returns the mapped part and the element-wise log-scale (``None`` for
volume-preserving maps). The log-scale is that of the *forward* map in both directions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import sum_rightmost

__all__ = [
    "Bound", "check_bound", "soft_clamp", "soft_clip", "additive", "affine", "affine_no_grad",
    "NUM_PARAMS",
]

NUM_PARAMS = {"additive": 1, "affine": 2}

#: a log-scale bound: ``b`` for ``(-b, b)``, ``(low, high)``, or ``None`` (unbounded)
Bound = float | tuple[float, float] | None


def soft_clamp(s: torch.Tensor, bound: Bound, negate: bool = False) -> torch.Tensor:
    """``b tanh(s / b)``: the identity near zero, smooth, bounded (with ``negate``, its
    negative, computed as such: scoring uses ``-s`` and so saves a negation kernel and its
    backward).

    ``bound`` is ``b`` (the range ``(-b, b)``), a pair ``(low, high)`` with
    ``low < 0 < high`` (the range ``(low, high)``: ``b = high`` for ``s >= 0`` and
    ``b = -low`` below, so the map keeps slope 1 and curvature 0 at zero), or ``None``
    (``s`` unbounded)."""
    if bound is None:
        return -s if negate else s
    if isinstance(bound, tuple):
        low, high = bound
        b = torch.where(s >= 0, high, -low).to(s.dtype)
        twice = torch.sigmoid(s * 2.0 / b).mul(2.0 * b)
        return b - twice if negate else twice.sub(b)
    # the same function as bound * tanh(s / bound), since tanh(z) = 2 sigmoid(2z) - 1;
    # sigmoid is several times faster than tanh on the CPU builds of torch we measured.
    # rsub(z, c, alpha=a) = c - a z in one kernel (and one backward node): 2b z - b, or
    # b - 2b z for the negative. At the default bound 2 the scale 2 / b is 1: no kernel
    # (and no backward node) is spent multiplying by it
    z = torch.sigmoid(s if bound == 2.0 else s * (2.0 / bound))
    if negate:
        return torch.rsub(z, bound, alpha=2.0 * bound)
    return torch.rsub(z, -bound, alpha=-2.0 * bound)


#: where :func:`soft_clip` leaves the identity, as a fraction of its bound
KNEE = 0.75


def soft_clip(x: torch.Tensor, bound: float) -> torch.Tensor:
    """The identity on ``[-k, k]``, ``k = KNEE * bound``, and beyond it a smooth
    saturation towards ``+-bound``: ``sign(x) (k + w tanh((|x| - k) / w))`` with
    ``w = bound - k``. Slope 1 and curvature 0 at the knee, bounded in
    ``(-bound, bound)``; values inside the knee pass unchanged."""
    k = KNEE * bound
    w = bound - k
    over = (x.abs() - k).clamp_min(0.0)
    return x - x.sign() * (over - w * torch.tanh(over / w))


def check_bound(bound: object, name: str = "scale_bound") -> Bound:
    """``bound`` as :func:`soft_clamp` takes it, or a ``ValueError`` naming what was
    expected: a number ``> 0``, a pair ``(low, high)`` with ``low < 0 < high``, or
    ``None``."""
    if bound is None:
        return None
    if isinstance(bound, (tuple, list)):
        if len(bound) == 2 and all(isinstance(v, (int, float)) for v in bound):
            low, high = float(bound[0]), float(bound[1])
            if math.isfinite(low) and math.isfinite(high) and low < 0 < high:
                return (low, high)
        raise ValueError(
            f"expected {name} a pair (low, high) with low < 0 < high, got {tuple(bound)!r}"
        )
    if isinstance(bound, (int, float)) and not isinstance(bound, bool):
        if math.isfinite(bound) and bound > 0:
            return float(bound)
    raise ValueError(
        f"expected {name} > 0, a pair (low, high) with low < 0 < high, or None, got {bound!r}"
    )


def additive(
    x: torch.Tensor, params: Sequence[torch.Tensor], inverse: bool, bound: Bound = None
) -> tuple[torch.Tensor, None]:
    """NICE's additive map ``y = x + t`` (inverse ``x = y - t``); log|det J| = 0."""
    (t,) = params
    return (x - t if inverse else x + t), None


def affine(
    x: torch.Tensor, params: Sequence[torch.Tensor], inverse: bool, bound: Bound = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """RealNVP's affine map, scale then shift in the scoring direction as in the paper:
    ``x = y * exp(-s) + t`` (inverse, data -> base) and ``y = (x - t) * exp(s)`` (forward,
    base -> data), with ``s = soft_clamp(s_raw, bound)``. Returns the output and the
    element-wise log|det| of the direction it ran: ``s`` forward (log|dy/dx|), ``-s``
    inverse (log|dx/dy|), each computed directly, so neither direction spends a
    negation kernel (like every map here: the caller sums and, scoring, negates the sum).

    Scoring never multiplies the shift by ``exp(-s)``. With the other order,
    ``(y - t) * exp(-s)``, a shift that a conditioner extrapolates on an unusual input is
    magnified by the layers after it: measured on Fashion-MNIST, a multi-scale RealNVP
    scored one test image at 147621 bits/dim that way (docs/benchmarks.rst, "The affine
    order and the scale bound")."""
    s_raw, t = params
    if inverse:
        neg_s = soft_clamp(s_raw, bound, negate=True)
        return torch.addcmul(t, x, torch.exp(neg_s)), neg_s  # t + x exp(-s), one kernel
    s = soft_clamp(s_raw, bound)
    return (x - t) * torch.exp(s), s


def affine_no_grad(
    x: torch.Tensor, params: Sequence[torch.Tensor], inverse: bool, bound: float | tuple[float, float],
    event_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`affine` for code that records no gradients (sampling), with a bounded scale:
    the same kernels on the same values, so the same bits, but written into the tensors
    this function has just made instead of new ones (two allocations and passes over
    fresh memory fewer per call). Returns the output and the log|det| of the direction it
    ran, already summed over the ``event_dim`` rightmost dimensions (the element-wise
    log-scale is overwritten). Never writes to ``x`` or ``params``, which may be the
    caller's tensors."""
    s_raw, t = params
    s = soft_clamp(s_raw, bound, negate=inverse)  # a new tensor: the bound is not None
    total = sum_rightmost(s, event_dim)
    e = s.exp_()
    if inverse:
        return torch.addcmul(t, x, e, out=e), total  # t + x exp(-s)
    y = torch.sub(x, t)
    return y.mul_(e), total  # (x - t) exp(s)


MAPS = {"additive": additive, "affine": affine}
