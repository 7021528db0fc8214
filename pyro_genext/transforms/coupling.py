r"""Coupling layers: NICE's additive coupling and RealNVP's affine coupling, with their
conditional twins.

One class, :class:`MaskedCoupling`, takes a binary mask (``1`` = conditioning part A,
``0`` = transformed part B) and an element-wise map; the named classes fix the map.
The hot path depends on the mask, decided once at construction:

* vector masks and channel-wise image masks whose two parts are contiguous ranges are
  split by slicing (``x[..., :d]``) and joined by ``torch.cat``: no zeros enter the
  conditioner and no gather/scatter is paid;
* other vector and channel masks use a fixed index split;
* spatial image masks (checkerboards) use mask arithmetic: the conditioner sees ``x * m``.

Forward is base -> data (sampling); scoring runs the inverse. Both cost one conditioner
pass, so sampling and scoring cost the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from torch import nn

from ..nn import MLP, ConvResNet
from .base import Bijector, FlowTransform, sum_rightmost
from .elementwise import MAPS, NUM_PARAMS, Bound, affine_no_grad, check_bound, soft_clip

__all__ = [
    "MaskedCoupling",
    "AdditiveCoupling",
    "RealNVPCoupling",
    "ConditionalMaskedCoupling",
    "ConditionalAdditiveCoupling",
    "ConditionalRealNVPCoupling",
]


def _contiguous(idx: torch.Tensor) -> bool:
    return bool(idx.numel() > 0 and (idx == torch.arange(int(idx[0]), int(idx[0]) + idx.numel())).all())


def _forward_ladj(ld: torch.Tensor | None, event_dim: int, inverse: bool) -> torch.Tensor | None:
    """The forward log|det J| per event from an element-wise map's log-det of the
    direction it ran (negated after summing when that was the inverse: one small vector
    instead of a full-size tensor)."""
    if ld is None:
        return None
    total = sum_rightmost(ld, event_dim)
    return -total if inverse else total


class MaskedCoupling(Bijector):
    r"""A coupling layer ``y_A = x_A``, ``y_B = g(x_B; θ(x_A))`` chosen by a binary mask.

    With ``elementwise="additive"`` (NICE) :math:`y_B = x_B + t(x_A)` and
    :math:`\log|\det J| = 0`; with ``elementwise="affine"`` (RealNVP)
    :math:`y_B = (x_B - t(x_A)) \odot \exp(s(x_A))` and
    :math:`\log|\det J| = \sum_B s(x_A)`. Scoring (data -> base) then computes
    :math:`x_B = y_B \odot \exp(-s(y_A)) + t(y_A)`: the paper's coupling, a scale then a
    shift, in the data -> latent direction the paper writes it in. The other order
    (:math:`y_B = x_B \odot e^{s} + t`, scoring :math:`(y_B - t)\,e^{-s}`) magnifies a shift
    that a conditioner extrapolates on an unusual input; measured in docs/benchmarks.rst.

    The affine log-scale is bounded, :math:`s = b \tanh(\tilde s / b)` with
    ``scale_bound`` :math:`b` (default 2): near zero it is the identity, so training
    starts as with an unbounded scale, but no single layer can scale by more than
    :math:`e^{b}`. With an unbounded ``exp``, one large conditioner output can scale a
    coordinate by an arbitrary factor, and its Jacobian with it. Measured on
    Fashion-MNIST (docs/benchmarks.rst): a multi-scale RealNVP blew up in its first 25
    steps with bound 3 and trained steadily with 2. A guide needs range, though: a flow
    whose couplings transform each coordinate k times can shrink it by at most
    :math:`e^{-kb}` (the actnorm layers that :func:`~pyro_genext.realnvp` adds by default
    have unbounded scales). ``scale_bound=None`` removes the bound; a pair ``(low, high)``,
    ``low < 0 < high``, bounds the two sides apart (:math:`s \in (\text{low},
    \text{high})`, so scoring multiplies by at most :math:`e^{-\text{low}}`).

    ``input_bound`` :math:`c` (default ``None``, off) feeds the conditioner
    :math:`x_A` softly clipped to :math:`\pm c` (unchanged up to :math:`\pm 0.75c`,
    :func:`~pyro_genext.transforms.elementwise.soft_clip`) instead of :math:`x_A`. A
    conditioner of ReLU layers extrapolates linearly on a far-out input; in a stack of
    couplings its output then expands the coordinates the next coupling conditions on,
    which extrapolates further. Bounding what each conditioner sees breaks that loop:
    early in a Fashion-MNIST run of the multi-scale RealNVP the worst validation image
    scored 22077 bits/dim without it and 21.5 with the bound 8 (docs/cli.rst, "Outlier
    images early in a run"). The coupling stays a bijection with
    a triangular Jacobian and the same log-det, :math:`\sum_B s` (the conditioner may be
    any function of :math:`x_A`); the image recipe :func:`~pyro_genext.realnvp` turns it on.

    Args:
        mask: binary tensor of the event shape, ``(D,)`` for vectors or ``(C, H, W)`` for
            images; ``1`` marks the conditioning coordinates.
        conditioner: a module mapping the conditioning part (and a context, for the
            conditional twin) to the map's parameters, stacked along the last axis for
            vectors or the channel axis for images. Its output must have
            ``num_params * |B|`` features (vector or channel masks) or
            ``num_params * C`` channels (spatial masks). If ``None``, an :class:`MLP`
            (vectors) or :class:`ConvResNet` (images) of the right size is built.
        elementwise: ``"affine"`` or ``"additive"``.
        scale_bound: bound of the affine log-scale: ``b``, ``(low, high)`` or ``None``.
        input_bound: bound :math:`c` of what the conditioner sees, or ``None``.
        context_dim: size of the context vector of a conditional coupling (0: none).
        hidden_dims, hidden_channels, num_blocks: size of the default conditioner.

    Cost: one conditioner evaluation for sampling (``_call``) and one for scoring
    (``_inverse``); the log-determinant comes from the same pass.

    Example::

        >>> from pyro_genext.transforms import half_mask
        >>> t = RealNVPCoupling(half_mask(4), hidden_dims=(16,))
        >>> x = torch.randn(10, 4)
        >>> torch.allclose(t.inv(t(x)), x)
        True

    References: Dinh, Krueger, Bengio (2014), NICE, arXiv:1410.8516; Dinh,
    Sohl-Dickstein, Bengio (2016), Density estimation using Real NVP, arXiv:1605.08803.
    """

    mask: torch.Tensor
    a_idx: torch.Tensor
    b_idx: torch.Tensor
    perm: torch.Tensor

    def __init__(
        self,
        mask: torch.Tensor,
        conditioner: nn.Module | None = None,
        elementwise: str = "affine",
        scale_bound: Bound = 2.0,
        context_dim: int = 0,
        hidden_dims: Sequence[int] = (256, 256),
        hidden_channels: int = 64,
        num_blocks: int = 2,
        cache_size: int = 0,
        input_bound: float | None = None,
    ) -> None:
        mask = torch.as_tensor(mask, dtype=torch.get_default_dtype())
        if mask.dim() not in (1, 3):
            raise ValueError(
                f"expected a mask of shape (D,) or (C, H, W), got shape {tuple(mask.shape)}"
            )
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("expected a binary mask of 0s and 1s")
        if mask.all() or not mask.any():
            raise ValueError("expected a mask with both 0s (transformed) and 1s (conditioning)")
        if elementwise not in MAPS:
            raise ValueError(f"expected elementwise in {sorted(MAPS)}, got {elementwise!r}")
        scale_bound = check_bound(scale_bound)
        super().__init__(tuple(mask.shape), cache_size=cache_size)
        self.elementwise = elementwise
        self.scale_bound = scale_bound
        checked = None if input_bound is None else check_bound(input_bound, "input_bound")
        if isinstance(checked, tuple):
            raise ValueError(f"expected input_bound > 0 or None, got {input_bound!r}")
        self.input_bound: float | None = checked
        self.context_dim = int(context_dim)
        self.num_params = NUM_PARAMS[elementwise]
        self.register_buffer("mask", mask)
        ed = mask.dim()
        self._event_dim = ed
        if ed == 1:
            line: torch.Tensor | None = mask
        elif (mask == mask[:, :1, :1]).all():
            line = mask[:, 0, 0]
        else:
            line = None
        self.mode = "mask"
        self._axis = -1 if ed == 1 else -3
        self.halves: tuple[int, int] | None = None
        if line is not None:
            a_idx = torch.nonzero(line, as_tuple=True)[0]
            b_idx = torch.nonzero(line == 0, as_tuple=True)[0]
            self._na, self._nb = a_idx.numel(), b_idx.numel()
            if _contiguous(a_idx) and _contiguous(b_idx):
                self.mode = "slice"
                self._a_first = bool(a_idx[0] == 0)
                # (axis, size of the leading block): couplings that share it can be run on
                # the two halves directly, see Chain
                self.halves = (self._axis, self._na if self._a_first else self._nb)
            else:
                self.mode = "index"
                self.register_buffer("a_idx", a_idx, persistent=False)
                self.register_buffer("b_idx", b_idx, persistent=False)
                self.register_buffer(
                    "perm", torch.argsort(torch.cat([a_idx, b_idx])), persistent=False
                )
        if conditioner is None:
            conditioner = self._default_conditioner(hidden_dims, hidden_channels, num_blocks)
        self.conditioner = conditioner

    def _default_conditioner(
        self, hidden_dims: Sequence[int], hidden_channels: int, num_blocks: int
    ) -> nn.Module:
        p = self.num_params
        if self._event_dim == 1:
            return MLP(self._na, p * self._nb, hidden_dims, context_features=self.context_dim)
        c = self.event_shape[0]
        if self.mode == "mask":
            cin, cout = c, p * c
        else:
            cin, cout = self._na, p * self._nb
        return ConvResNet(cin, cout, hidden_channels, num_blocks, self.context_dim)

    # ---------------------------------------------------------------- hot path
    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ax = self._axis
        if self.mode == "slice":  # split's backward is one cat, two narrows' are two scatters
            if self._a_first:
                xa, xb = x.split((self._na, self._nb), dim=ax)
                return xa, xb
            xb, xa = x.split((self._nb, self._na), dim=ax)
            return xa, xb
        return x.index_select(ax, self.a_idx), x.index_select(ax, self.b_idx)

    def _join(self, xa: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        ed = self._event_dim
        if xa.shape[:-ed] != yb.shape[:-ed]:  # a context broadcast the batch
            xa = xa.expand(yb.shape[:-ed] + xa.shape[-ed:])
        if self.mode == "slice":
            parts = [xa, yb] if self._a_first else [yb, xa]
            return torch.cat(parts, dim=self._axis)
        return torch.cat([xa, yb], dim=self._axis).index_select(self._axis, self.perm)

    def _params(self, h: torch.Tensor, context: torch.Tensor | None, nout: int) -> Any:
        if self.input_bound is not None:  # the conditioner sees x_A clipped softly to c
            h = soft_clip(h, self.input_bound)
        out = self.conditioner(h) if context is None else self.conditioner(h, context)
        # under autocast the network computes in bf16/fp16; the element-wise map and its
        # log-det run in the data's precision (a no-op otherwise)
        out = out.to(h.dtype)
        ed = self._event_dim
        expected = nout * self.num_params
        if out.dim() < ed or out.shape[-ed] != expected:
            raise ValueError(
                f"conditioner returned shape {tuple(out.shape)}, expected "
                f"{expected} {'features' if ed == 1 else 'channels'} along dim {-ed}"
            )
        return out.chunk(self.num_params, dim=-ed)

    def _couple(
        self, x: torch.Tensor, context: torch.Tensor | None, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ed = self._event_dim
        fn = MAPS[self.elementwise]
        if self.mode == "mask":
            m = self.mask
            xa = x * m
            params = self._params(xa, context, self.event_shape[0])
            yb, ld = fn(x, params, inverse, self.scale_bound)
            y = xa + (1 - m) * yb
            ladj = _forward_ladj(None if ld is None else ld * (1 - m), ed, inverse)
        else:
            xa, xb = self._split(x)
            params = self._params(xa, context, self._nb)
            yb, ladj = self._map(xb, params, inverse)
            y = self._join(xa, yb)
        if ladj is None:
            ladj = y.new_zeros(y.shape[: y.dim() - ed])
        return y, ladj

    def _couple_halves(
        self, lo: torch.Tensor, hi: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The coupling on an input already split at :attr:`halves` (slice mode, no
        context): returns the two output halves and the log-det (``None`` if zero)."""
        a, b = (lo, hi) if self._a_first else (hi, lo)
        params = self._params(a, None, self._nb)
        yb, ladj = self._map(b, params, inverse)
        return (lo, yb, ladj) if self._a_first else (yb, hi, ladj)

    def _map(
        self, xb: torch.Tensor, params: Any, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The element-wise map on the transformed part and its forward log-det, summed
        over the event (``None`` if zero). Without gradients (sampling, evaluation) a
        bounded affine map writes into its own fresh tensors (:func:`affine_no_grad`,
        the same bits in fewer passes over new memory)."""
        if (self.elementwise == "affine" and self.scale_bound is not None
                and not torch.is_grad_enabled()):
            yb, total = affine_no_grad(xb, params, inverse, self.scale_bound, self._event_dim)
            return yb, (-total if inverse else total)
        yb, ld = MAPS[self.elementwise](xb, params, inverse, self.scale_bound)
        return yb, _forward_ladj(ld, self._event_dim, inverse)

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(x, None, inverse=False)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._couple(y, None, inverse=True)

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, elementwise={self.elementwise!r}, "
            f"mode={self.mode!r}, scale_bound={self.scale_bound}"
            + (f", input_bound={self.input_bound}" if self.input_bound is not None else "")
        )


class AdditiveCoupling(MaskedCoupling):
    r"""NICE's additive coupling: :math:`y_A = x_A`, :math:`y_B = x_B + m(x_A)`,
    :math:`\log|\det J| = 0`. Volume preserving; pair it with
    :class:`~pyro_genext.transforms.DiagonalScaling`.

    See :class:`MaskedCoupling` for the arguments, masks and cost.

    Example::

        >>> from pyro_genext.transforms import alternating_mask
        >>> t = AdditiveCoupling(alternating_mask(6), hidden_dims=(32,))
        >>> t.log_abs_det_jacobian(x := torch.randn(2, 6), t(x))
        tensor([0., 0.])

    Reference: Dinh, Krueger, Bengio (2014), NICE, arXiv:1410.8516.
    """

    def __init__(self, mask: torch.Tensor, conditioner: nn.Module | None = None, **kwargs: Any):
        kwargs.pop("elementwise", None)
        super().__init__(mask, conditioner, elementwise="additive", **kwargs)


class RealNVPCoupling(MaskedCoupling):
    r"""RealNVP's affine coupling: :math:`y_A = x_A`,
    :math:`y_B = (x_B - t(x_A)) \odot \exp(s(x_A))`, so that scoring computes the paper's
    :math:`x_B = y_B \odot \exp(-s(y_A)) + t(y_A)`;
    :math:`\log|\det J| = \sum_B s(x_A)`, with the bounded log-scale
    :math:`s = b\tanh(\tilde s/b)` described in :class:`MaskedCoupling`.

    Masks: :func:`half_mask` / :func:`alternating_mask` for vectors,
    :func:`checkerboard_mask` / :func:`channel_mask` for images.

    Example::

        >>> from pyro_genext.transforms import checkerboard_mask
        >>> t = RealNVPCoupling(checkerboard_mask((1, 8, 8)), hidden_channels=8)
        >>> t(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 1, 8, 8])

    Reference: Dinh, Sohl-Dickstein, Bengio (2016), Density estimation using Real NVP,
    arXiv:1605.08803.
    """

    def __init__(self, mask: torch.Tensor, conditioner: nn.Module | None = None, **kwargs: Any):
        kwargs.pop("elementwise", None)
        super().__init__(mask, conditioner, elementwise="affine", **kwargs)


class _ConditionedCoupling(FlowTransform):
    """A conditional coupling with its context fixed. It holds no state of its own beyond
    the context and its cache, so several can coexist."""

    def __init__(self, core: MaskedCoupling, context: torch.Tensor, cache_size: int = 1):
        super().__init__(cache_size=cache_size)
        self.core = core
        self.context = context
        self.event_shape = core.event_shape

    @property
    def training(self) -> bool:
        return self.core.training

    def _state_modules(self) -> list[nn.Module]:
        return [self.core]

    def _extra_state(self) -> tuple[torch.Tensor, ...]:
        return (self.context,)

    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.core._couple(x, self.context, inverse=False)

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.core._couple(y, self.context, inverse=True)

    def with_cache(self, cache_size: int = 1) -> _ConditionedCoupling:
        if cache_size == self._cache_size:
            return self
        return _ConditionedCoupling(self.core, self.context, cache_size)


class ConditionalMaskedCoupling(ConditionalTransformModule):
    r"""The conditional twin of :class:`MaskedCoupling`: the conditioner also sees a
    context vector, :math:`y_B = g(x_B; \theta(x_A, c))`.

    ``condition(context)`` returns a transform for one context ``(context_dim,)`` or one
    context per batch row ``(*batch, context_dim)``, with ``cache_size=1`` (a guide samples
    then scores with one conditioner pass); it does not mutate this module, so transforms
    conditioned on different contexts coexist.

    Cost: conditioning only stores the context; sampling and scoring then cost one
    conditioner pass each, as for :class:`MaskedCoupling`.

    Example::

        >>> from pyro_genext.transforms import half_mask
        >>> t = ConditionalRealNVPCoupling(half_mask(4), context_dim=3, hidden_dims=(16,))
        >>> t.condition(torch.randn(10, 3))(torch.randn(10, 4)).shape
        torch.Size([10, 4])

    References: Dinh, Krueger, Bengio (2014), arXiv:1410.8516; Dinh, Sohl-Dickstein,
    Bengio (2016), arXiv:1605.08803; conditioning as in Winkler et al. (2019), Learning
    likelihoods with conditional normalizing flows, arXiv:1912.00042.
    """

    elementwise = "affine"

    def __init__(
        self,
        mask: torch.Tensor,
        context_dim: int,
        conditioner: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if int(context_dim) < 1:
            raise ValueError(f"expected context_dim >= 1, got {context_dim}")
        kwargs.setdefault("elementwise", self.elementwise)
        self.context_dim = int(context_dim)
        self.coupling = MaskedCoupling(mask, conditioner, context_dim=context_dim, **kwargs)
        self.event_shape = self.coupling.event_shape
        self.domain = self.coupling.domain
        self.codomain = self.coupling.codomain
        self.bijective = True

    def condition(self, context: torch.Tensor) -> _ConditionedCoupling:
        if context.dim() < 1 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"expected a context of shape (..., {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )
        return _ConditionedCoupling(self.coupling, context)


class ConditionalAdditiveCoupling(ConditionalMaskedCoupling):
    r"""Conditional NICE coupling :math:`y_B = x_B + m(x_A, c)`; see
    :class:`ConditionalMaskedCoupling`."""

    elementwise = "additive"


class ConditionalRealNVPCoupling(ConditionalMaskedCoupling):
    r"""Conditional RealNVP coupling :math:`y_B = (x_B - t(x_A, c)) \odot \exp(s(x_A, c))`;
    see :class:`ConditionalMaskedCoupling`."""

    elementwise = "affine"
