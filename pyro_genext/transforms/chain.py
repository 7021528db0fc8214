r"""Composition: :class:`Chain` of bijectors and RealNVP's :class:`MultiScale`
architecture with factor-out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.distributions import constraints

from .base import Bijector, FlowTransform
from .coupling import MaskedCoupling
from .squeeze import squeeze, unsqueeze

__all__ = ["Chain", "MultiScale"]


class _Run(list):
    """Consecutive parts of a :class:`Chain` run on the two halves of one split."""

    def __init__(self, halves: tuple[int, int], parts: list[Any]) -> None:
        super().__init__(parts)
        self.halves = halves


class Chain(Bijector):
    r"""The composition :math:`f_n \circ \dots \circ f_1` of bijectors (``parts[0]`` acts
    first in the forward, base -> data, direction),
    :math:`\log|\det J| = \sum_k \log|\det J_{f_k}|`.

    Unlike a ``ComposeTransform`` of separately cached parts, the chain calls each part's
    fused pass directly, so every network runs once per direction and the only cache is
    the chain's own.

    Example::

        >>> from pyro_genext.transforms import DiagonalScaling
        >>> t = Chain([DiagonalScaling(3), DiagonalScaling(3)])
        >>> t(torch.ones(3)).shape
        torch.Size([3])
    """

    def __init__(self, parts: Sequence[FlowTransform], cache_size: int = 0) -> None:
        parts = list(parts)
        if not parts:
            raise ValueError("Chain: expected at least one part")
        for i, p in enumerate(parts):
            if not isinstance(p, FlowTransform):
                raise TypeError(f"Chain: part {i} is a {type(p).__name__}, expected a FlowTransform")
        for i in range(1, len(parts)):
            if parts[i].event_shape != parts[i - 1].codomain_event_shape:
                raise ValueError(
                    f"Chain: part {i} expects event shape {parts[i].event_shape}, but part "
                    f"{i - 1} produces {parts[i - 1].codomain_event_shape}"
                )
        super().__init__(parts[0].event_shape, cache_size=cache_size)
        # every module a part keeps its parameters in, the cores of conditioned parts too,
        # so that .parameters() and pyro.module see the whole flow
        self.parts = nn.ModuleList([m for p in parts for m in p._state_modules()])
        self._parts = parts
        self._extra = tuple(t for p in parts for t in p._extra_state())
        self._out_shape = parts[-1].codomain_event_shape
        self._plan = self._make_plan(parts)

    @staticmethod
    def _make_plan(parts: list[FlowTransform]) -> list[Any]:
        """Group consecutive slice-mode couplings that split at the same point into runs:
        a run splits its input once, passes the two halves from coupling to coupling and
        joins them once, instead of a split and a cat per coupling. Parts that act
        coordinate by coordinate (``splittable``, e.g. :class:`ActNorm`) join the run they
        follow."""
        plan: list[Any] = []
        for p in parts:
            halves = getattr(p, "halves", None) if isinstance(p, MaskedCoupling) else None
            last = plan[-1] if plan and isinstance(plan[-1], _Run) else None
            if halves is not None and last is not None and last.halves == halves:
                last.append(p)
            elif halves is not None:
                plan.append(_Run(halves, [p]))
            elif getattr(p, "splittable", False) and last is not None:
                last.append(p)
            else:
                plan.append(p)
        return [run[0] if isinstance(run, _Run) and len(run) == 1 else run for run in plan]

    @staticmethod
    def _run(run: _Run, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        axis, at = run.halves
        lo, hi = x.split((at, x.shape[axis] - at), dim=axis)
        total: torch.Tensor | None = None
        ladj: torch.Tensor | None
        for c in reversed(run) if inverse else run:
            if isinstance(c, MaskedCoupling):
                lo, hi, ladj = c._couple_halves(lo, hi, inverse)
            else:
                lo, hi, ladj = c._halves_and_ladj(lo, hi, inverse)
            if ladj is not None:
                total = ladj if total is None else total + ladj
        return torch.cat([lo, hi], dim=axis), total

    def _apply_plan(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        total: torch.Tensor | None = None
        for step in reversed(self._plan) if inverse else self._plan:
            if isinstance(step, _Run):
                x, ladj = self._run(step, x, inverse)
            elif inverse:
                x, ladj = step._inverse_and_ladj(x)
            else:
                x, ladj = step._forward_and_ladj(x)
            if ladj is not None:
                total = ladj if total is None else total + ladj
        if total is None:
            total = x.new_zeros(x.shape[: x.dim() - len(self._out_shape if not inverse else
                                                          self.event_shape)])
        return x, total

    @property
    def codomain_event_shape(self) -> tuple[int, ...]:
        return self._out_shape

    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return self._parts[0].domain

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return self._parts[-1].codomain

    @property
    def sign(self) -> int:
        s = 1
        for p in self._parts:
            s *= int(p.sign)
        return s

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._apply_plan(x, inverse=False)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._apply_plan(y, inverse=True)

    def _extra_state(self) -> tuple[torch.Tensor, ...]:
        return self._extra

    def __len__(self) -> int:
        return len(self._parts)

    def __getitem__(self, i: int) -> FlowTransform:
        return self._parts[i]


class MultiScale(Bijector):
    r"""One scale of RealNVP's multi-scale architecture, with the next scales inside.

    In the scoring direction (data -> base) on an event :math:`(C, H, W)`:
    ``checkerboard`` (acting at :math:`(C,H,W)`), squeeze to :math:`(4C,H/2,W/2)`,
    ``channelwise`` (acting at that shape), then factor out: the first :math:`2C`
    channels are final latents and pass through everything that follows unchanged, the
    other :math:`2C` go through ``inner`` (the next scale). The latents are reassembled and
    unsqueezed, so the event shape stays :math:`(C, H, W)` and the whole architecture is
    one bijector. Forward (sampling, base -> data) runs the same steps backwards.

    :math:`\log|\det J|` is the sum over the parts; the squeezes are permutations and
    the factor-out an identity, so they add nothing.

    Args:
        checkerboard: bijector on :math:`(C,H,W)`, listed in forward (base -> data) order.
        channelwise: bijector on :math:`(4C, H/2, W/2)`.
        inner: bijector on :math:`(2C, H/2, W/2)`, or ``None`` to factor out every
            channel at this scale.

    Cost: one pass through every coupling in either direction.

    Example (what :func:`~pyro_genext.realnvp` builds for two scales)::

        >>> from pyro_genext.transforms import RealNVPCoupling, checkerboard_mask, channel_mask
        >>> kw = dict(hidden_channels=8, num_blocks=1)
        >>> cb = Chain([RealNVPCoupling(checkerboard_mask((1, 4, 4), k), **kw) for k in range(3)])
        >>> ch = Chain([RealNVPCoupling(channel_mask((4, 2, 2), k), **kw) for k in range(3)])
        >>> last = Chain([RealNVPCoupling(checkerboard_mask((2, 2, 2), k), **kw) for k in range(4)])
        >>> flow = MultiScale(cb, ch, last)
        >>> flow.inv(torch.rand(5, 1, 4, 4)).shape
        torch.Size([5, 1, 4, 4])

    Reference: Dinh, Sohl-Dickstein, Bengio (2016), arXiv:1605.08803, section 3.6.
    """

    def __init__(
        self,
        checkerboard: FlowTransform,
        channelwise: FlowTransform,
        inner: FlowTransform | None,
        cache_size: int = 0,
    ) -> None:
        shape = checkerboard.event_shape
        if len(shape) != 3 or shape[1] % 2 or shape[2] % 2:
            raise ValueError(f"MultiScale: expected an event shape (C, H, W) with even H, W, got {shape}")
        c, h, w = shape
        sq = (4 * c, h // 2, w // 2)
        if checkerboard.codomain_event_shape != shape:
            raise ValueError(f"MultiScale: checkerboard part must keep shape {shape}")
        if channelwise.event_shape != sq or channelwise.codomain_event_shape != sq:
            raise ValueError(
                f"MultiScale: expected the channel-wise part on event shape {sq}, "
                f"got {channelwise.event_shape}"
            )
        half = (2 * c, h // 2, w // 2)
        if inner is not None and (inner.event_shape != half or inner.codomain_event_shape != half):
            raise ValueError(
                f"MultiScale: expected the inner part on event shape {half}, got {inner.event_shape}"
            )
        super().__init__(shape, cache_size=cache_size)
        self.checkerboard = checkerboard
        self.channelwise = channelwise
        self.inner = inner
        self._factor = 2 * c

    def _forward_and_ladj(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = squeeze(z)
        ladj = None
        if self.inner is not None:
            keep, rest = h.split([self._factor, self._factor], dim=-3)
            rest, ladj = self.inner._forward_and_ladj(rest)
            h = torch.cat([keep, rest], dim=-3)
        h, l2 = self.channelwise._forward_and_ladj(h)
        x, l3 = self.checkerboard._forward_and_ladj(unsqueeze(h))
        total = l2 + l3
        return x, total if ladj is None else total + ladj

    def _inverse_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, l3 = self.checkerboard._inverse_and_ladj(x)
        h, l2 = self.channelwise._inverse_and_ladj(squeeze(h))
        total = l2 + l3
        if self.inner is not None:
            keep, rest = h.split([self._factor, self._factor], dim=-3)
            rest, l1 = self.inner._inverse_and_ladj(rest)
            h = torch.cat([keep, rest], dim=-3)
            total = total + l1
        return unsqueeze(h), total
