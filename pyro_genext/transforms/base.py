"""The bijector base: torch's ``Transform`` contract, whole, with a cache that is safe to train with.

Direction, once for the whole package: **forward is base -> data**, as in
:class:`~torch.distributions.TransformedDistribution`. Sampling calls ``_call``;
scoring (``log_prob``) calls ``_inverse`` and then :meth:`log_abs_det_jacobian`.

Every bijector here implements two methods that return the output *and* the
forward log-determinant together, so one pass of a conditioner network serves both:

* ``_forward_and_ladj(x) -> (y, log|det dy/dx|)``
* ``_inverse_and_ladj(y) -> (x, log|det dy/dx|)``

:class:`FlowTransform` turns them into the torch contract. Two memories are kept:

* the torch cache (``cache_size=1``): ``t.inv(t(x))`` returns ``x`` itself, so a guide
  that samples and then scores runs each network once;
* a one-entry log-det memo (always on): ``log_abs_det_jacobian(x, y)`` for the pair the
  transform has just produced is served without running the network again.

Both are keyed not only on the identity of the tensors (as torch's cache is) but
also on the version counters of the transform's parameters and buffers, of the input
tensor and on the grad mode. An optimiser step changes parameters in place, which bumps
their versions, so a value computed with old parameters is never served. Without that,
the common full-batch training loop (the same data tensor every step) reuses the graph of
the previous step and fails with "Trying to backward through the graph a second time".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import Transform, constraints

__all__ = ["FlowTransform", "Bijector", "check_event_shape", "sum_rightmost"]


def sum_rightmost(value: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum out the ``dim`` rightmost dimensions of ``value``."""
    if dim == 0:
        return value
    return value.reshape(value.shape[:-dim] + (-1,)).sum(-1)


def check_event_shape(
    value: torch.Tensor, event_shape: tuple[int, ...], name: str = "input"
) -> None:
    """Raise ``ValueError`` unless ``value`` ends with ``event_shape``."""
    k = len(event_shape)
    got = tuple(value.shape[value.dim() - k :]) if value.dim() >= k else tuple(value.shape)
    if value.dim() < k or got != tuple(event_shape):
        raise ValueError(
            f"expected {name} with event shape {tuple(event_shape)}, "
            f"got a tensor of shape {tuple(value.shape)}"
        )


def _versions(tensors: Iterable[torch.Tensor]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


class FlowTransform(Transform):
    """Mixin implementing torch's caching contract on top of ``_forward_and_ladj``.

    Subclasses set :attr:`event_shape` (the shape of one event in the domain) and
    implement ``_forward_and_ladj`` / ``_inverse_and_ladj``. Shape-changing subclasses
    (e.g. :class:`~pyro_genext.transforms.Squeeze`) also set ``codomain_event_shape``.
    """

    bijective = True
    event_shape: tuple[int, ...]

    # ------------------------------------------------------------------ contract
    @property
    def domain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def codomain(self) -> constraints.Constraint:  # type: ignore[override]
        return constraints.independent(constraints.real, len(self.codomain_event_shape))

    @property
    def codomain_event_shape(self) -> tuple[int, ...]:
        return self.event_shape

    @property
    def sign(self) -> int:
        """Sign of det J. Couplings, scalings and normalisations have a positive
        triangular or diagonal Jacobian, so +1 unless a subclass says otherwise."""
        return 1

    def forward_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        return self._map_shape(shape, self.event_shape, self.codomain_event_shape)

    def inverse_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size:
        return self._map_shape(shape, self.codomain_event_shape, self.event_shape)

    @staticmethod
    def _map_shape(shape: Any, src: tuple[int, ...], dst: tuple[int, ...]) -> torch.Size:
        shape = tuple(shape)
        k = len(src)
        if len(shape) < k or shape[len(shape) - k :] != tuple(src):
            raise ValueError(f"expected a shape ending with {tuple(src)}, got {shape}")
        return torch.Size(shape[: len(shape) - k] + tuple(dst))

    # ------------------------------------------------------------------ abstract
    def _forward_and_ladj(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _inverse_and_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _state_tensors(self) -> Iterable[torch.Tensor]:
        """Tensors whose in-place change invalidates the caches (parameters, buffers)."""
        return ()

    # ------------------------------------------------------------------ caching
    def _key(self, value: torch.Tensor) -> tuple[Any, ...]:
        training = getattr(self, "training", None)
        return (torch.is_grad_enabled(), training, value._version, _versions(self._state_tensors()))

    def _remember(self, x: torch.Tensor, y: torch.Tensor, ladj: torch.Tensor, probe: str,
                  key: Any) -> None:
        self.__dict__["_memo"] = (x, y, ladj, probe, key)

    def _lookup(self, x: torch.Tensor | None, y: torch.Tensor | None) -> Any:
        """The memo ``(x, y, ladj, ...)`` if it holds for these tensors now, else None.

        The memo is valid while the tensor it was computed *from* (``x`` forward, ``y``
        inverse) is at the same version, with the same parameter versions, grad mode and
        training mode; every tensor given must be the very object remembered.
        """
        memo = self.__dict__.get("_memo")
        if memo is None:
            return None
        mx, my, _, probe, key = memo
        if (x is not None and x is not mx) or (y is not None and y is not my):
            return None
        if key != self._key(mx if probe == "x" else my):
            return None
        return memo

    def clear_cache(self) -> None:
        """Forget the cached pair and log-determinant (they also expire by themselves)."""
        self.__dict__["_memo"] = None

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        check_event_shape(x, self.event_shape)
        key = self._key(x)
        y, ladj = self._forward_and_ladj(x)
        self._remember(x, y, ladj, "x", key)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_event_shape(y, self.codomain_event_shape)
        key = self._key(y)
        x, ladj = self._inverse_and_ladj(y)
        self._remember(x, y, ladj, "y", key)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache_size == 1:
            memo = self._lookup(x, None)
            if memo is not None:
                return memo[1]
        return self._call(x)

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        if self._cache_size == 1:
            memo = self._lookup(None, y)
            if memo is not None:
                return memo[0]
        return self._inverse(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        memo = self._lookup(x, y)
        if memo is not None:
            return memo[2]
        check_event_shape(x, self.event_shape)
        return self._forward_and_ladj(x)[1]

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # drops the weak inverse
        state["_memo"] = None
        state.pop("_cached_x_y", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        sup = super()
        if hasattr(sup, "__setstate__"):
            sup.__setstate__(state)  # type: ignore[misc]
        else:  # pragma: no cover
            self.__dict__.update(state)
        if self._cache_size == 1:
            self._cached_x_y = None, None


class Bijector(FlowTransform, TransformModule):
    """Base of every learnable bijector: a :class:`FlowTransform` and an ``nn.Module``.

    ``with_cache(k)`` returns a view that shares every parameter and differs only in its
    cache size, as torch's contract asks.
    """

    def __init__(self, event_shape: tuple[int, ...] | torch.Size, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.event_shape = tuple(int(s) for s in event_shape)
        self.__dict__["_memo"] = None

    def _state_tensors(self) -> Iterable[torch.Tensor]:
        # Buffers count only in eval mode: in training mode the running averages of a
        # normalisation layer change during every scoring pass but do not enter its output.
        yield from self.parameters()
        if not self.training:
            yield from self.buffers()

    def with_cache(self, cache_size: int = 1) -> Bijector:
        if cache_size == self._cache_size:
            return self
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size}")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)  # shares _parameters, _modules, _buffers
        other.__dict__["_memo"] = None
        other.__dict__["_inv"] = None
        other._cache_size = cache_size
        if cache_size == 1:
            other._cached_x_y = None, None
        return other

    def __hash__(self) -> int:
        return object.__hash__(self)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"

