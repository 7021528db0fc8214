"""The bijector base: torch's ``Transform`` contract, whole, with a cache that is safe to
train with and to take anywhere.

Direction, once for the whole package: **forward is base -> data**, as in
:class:`~torch.distributions.TransformedDistribution`. Sampling calls ``_call``;
scoring (``log_prob``) calls ``_inverse`` and then :meth:`log_abs_det_jacobian`.

Every bijector here implements two methods that return the output *and* the
forward log-determinant together, so one pass of a conditioner network serves both:

* ``_forward_and_ladj(x) -> (y, log|det dy/dx|)``
* ``_inverse_and_ladj(y) -> (x, log|det dy/dx|)``

**How the cache works.** With ``cache_size=1`` (what the recipes, ``condition(context)``
and everything that samples then scores return) a transform remembers one thing: the
pair its last call *produced*, keyed on the very tensor it returned. After ``y = t(x)``,
``t.inv(y)`` returns ``x`` itself and ``t.log_abs_det_jacobian(x, y)`` is served without
running a network; after ``x = t.inv(y)`` (scoring), ``log_abs_det_jacobian(x, y)`` is
served the same way. So a guide's ``rsample`` then ``log_prob``, and a density's
``log_prob``, run each conditioner once. A tensor the transform did not return (the
observed data, a tensor made under another parameter set, a copy) is never looked up:
it is always computed afresh. The remembered pair is also dropped or ignored when it
could be wrong:

* the returned tensor or its input was changed in place (their version counters moved);
* any parameter or buffer was changed in place (an optimiser step) or swapped for
  another tensor (``torch.func.functional_call``);
* the pair was computed without gradients and gradients are now wanted;
* the returned tensor was garbage-collected: the entry goes with it, so nothing the
  user dropped (an input, a log-determinant's autograd graph) is kept alive;
* inference tensors (``torch.inference_mode``) are never cached.

Inside code being compiled (``torch.compile``), where weak references and version
counters do not trace, the pair a call produced is kept in a plain attribute only until
``log_abs_det_jacobian`` takes it back, within the same traced function: a compiled
``log_prob`` runs each network once, as an eager one does.

With ``cache_size=0`` nothing is remembered, as torch's contract says:
``log_abs_det_jacobian`` then runs the network again.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Transform, constraints

__all__ = ["FlowTransform", "Bijector", "check_event_shape", "sum_rightmost"]


def sum_rightmost(value: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum out the ``dim`` rightmost dimensions of ``value`` (half-precision values are
    summed in float32, so log-determinants keep their precision under autocast)."""
    if dim == 0:
        return value
    flat = value.reshape(value.shape[:-dim] + (-1,))
    if value.dtype in (torch.bfloat16, torch.float16):
        return flat.sum(-1, dtype=torch.float32)
    return flat.sum(-1)


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


def _module_tensors(roots: Iterable[nn.Module]) -> Iterator[torch.Tensor]:
    """Every parameter and buffer under ``roots``, read from the modules' own dicts (so a
    tensor swapped in by ``functional_call`` is the one seen), without the cost of
    ``named_parameters``' prefixes and de-duplication."""
    stack = list(roots)
    while stack:
        m = stack.pop()
        for p in m._parameters.values():
            if p is not None:
                yield p
        for b in m._buffers.values():
            if b is not None:
                yield b
        stack.extend(c for c in m._modules.values() if c is not None)


class _Entry:
    """What one call produced: ``out`` (held weakly) from ``inp``, with the log-det."""

    __slots__ = ("out", "out_version", "inp", "inp_version", "ladj", "forward", "grad",
                 "state", "state_ids", "state_versions", "__weakref__")
    out: weakref.ref[torch.Tensor]
    out_version: int
    inp: torch.Tensor
    inp_version: int
    ladj: torch.Tensor
    forward: bool
    grad: bool
    state: list[torch.Tensor]
    state_ids: tuple[int, ...]
    state_versions: tuple[int, ...]

    def matches(self, owner: FlowTransform) -> bool:
        out = self.out()
        if out is None:
            return False
        try:
            if out._version != self.out_version or self.inp._version != self.inp_version:
                return False
        except RuntimeError:  # pragma: no cover - an inference tensor slipped in
            return False
        if not self.grad and torch.is_grad_enabled():
            return False
        state = list(owner._state_tensors())
        return (tuple(map(id, state)) == self.state_ids
                and tuple(t._version for t in state) == self.state_versions)


class FlowTransform(Transform):
    """Mixin implementing torch's caching contract on top of ``_forward_and_ladj``.

    Subclasses set :attr:`event_shape` (the shape of one event in the domain) and
    implement ``_forward_and_ladj`` / ``_inverse_and_ladj``. Shape-changing subclasses
    (e.g. :class:`~pyro_genext.transforms.Squeeze`) also set ``codomain_event_shape``.
    See the module docstring for how the cache works.
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

    def _state_modules(self) -> list[nn.Module]:
        """The modules that hold this transform's parameters and buffers."""
        return [self] if isinstance(self, nn.Module) else []

    def _extra_state(self) -> tuple[torch.Tensor, ...]:
        """Tensors the map depends on that no module holds (a conditioning context)."""
        return ()

    def _state_tensors(self) -> Iterable[torch.Tensor]:
        """Tensors whose change invalidates the cache: every parameter and buffer of
        :meth:`_state_modules`, and :meth:`_extra_state`."""
        yield from _module_tensors(self._state_modules())
        yield from self._extra_state()

    # ------------------------------------------------------------------ caching
    def _remember(self, inp: torch.Tensor, out: torch.Tensor, ladj: torch.Tensor,
                  forward: bool) -> None:
        if torch.compiler.is_compiling():
            # inside a compiled function: the pair is remembered for the length of the
            # trace only (no weak references or version counters, which do not trace);
            # log_abs_det_jacobian takes it back out, so nothing outlives the call
            self._traced: tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None = (
                inp, out, ladj, forward)
            return
        if inp.is_inference() or out.is_inference():
            return
        try:
            state = list(self._state_tensors())
            e = _Entry()
            e.out_version, e.inp_version = out._version, inp._version
            e.state_versions = tuple(t._version for t in state)
        except RuntimeError:  # inference tensors (no version counter) or functorch wrappers
            return
        e.inp, e.ladj, e.forward, e.grad = inp, ladj, forward, torch.is_grad_enabled()
        e.state, e.state_ids = state, tuple(map(id, state))  # held: ids cannot be reused
        owner = weakref.ref(self)
        entry = weakref.ref(e)

        def forget(_: Any) -> None:  # the returned tensor died: drop what it pinned
            o = owner()
            if o is not None and o.__dict__.get("_entry") is entry():
                o.__dict__["_entry"] = None

        e.out = weakref.ref(out, forget)
        self.__dict__["_entry"] = e

    def _served(self, value: torch.Tensor, forward_entry: bool) -> _Entry | None:
        """The entry whose returned tensor is ``value``, from a forward call
        (``forward_entry``) or an inverse call, if it is still right."""
        e = self.__dict__.get("_entry")
        if e is None or e.forward != forward_entry or e.out() is not value:
            return None
        if torch.compiler.is_compiling() or not e.matches(self):
            return None
        return e

    def clear_cache(self) -> None:
        """Forget the remembered pair (it also expires by itself, see the module doc)."""
        self.__dict__["_entry"] = None

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        check_event_shape(x, self.event_shape)
        y, ladj = self._forward_and_ladj(x)
        if self._cache_size == 1:
            self._remember(x, y, ladj, forward=True)
        return y

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        check_event_shape(y, self.codomain_event_shape)
        x, ladj = self._inverse_and_ladj(y)
        if self._cache_size == 1:
            self._remember(y, x, ladj, forward=False)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache_size == 1:
            e = self._served(x, forward_entry=False)  # x = t.inv(y) returned earlier
            if e is not None:
                return e.inp
        return self._call(x)

    def _inv_call(self, y: torch.Tensor) -> torch.Tensor:
        if self._cache_size == 1:
            e = self._served(y, forward_entry=True)  # y = t(x) returned earlier
            if e is not None:
                return e.inp
        return self._inverse(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            traced = getattr(self, "_traced", None)
            if traced is not None:
                self._traced = None
                inp, out, ladj, forward = traced
                if (forward and inp is x and out is y) or (not forward and inp is y and out is x):
                    return ladj
        if self._cache_size == 1:
            e = self._served(y, forward_entry=True)
            if e is not None and e.inp is x:
                return e.ladj
            e = self._served(x, forward_entry=False)
            if e is not None and e.inp is y:
                return e.ladj
        check_event_shape(x, self.event_shape)
        return self._forward_and_ladj(x)[1]

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # drops the weak inverse
        state["_entry"] = None  # weak references cannot be copied; a copy starts empty
        state.pop("_traced", None)
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

    ``with_cache(k)`` returns a view that shares every parameter, buffer and the
    training flag, and differs only in its cache size, as torch's contract asks.
    """

    def __init__(self, event_shape: tuple[int, ...] | torch.Size, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.event_shape = tuple(int(s) for s in event_shape)
        self.__dict__["_entry"] = None

    # The training flag lives in a cell that with_cache views share, so that
    # ``original.eval()`` also switches every view (nn.Module keeps it per object).
    @property  # type: ignore[override]
    def training(self) -> bool:
        return self.__dict__.get("_mode", [True])[0]

    @training.setter
    def training(self, mode: bool) -> None:
        cell = self.__dict__.get("_mode")
        if cell is None:
            self.__dict__["_mode"] = [bool(mode)]
        else:
            cell[0] = bool(mode)

    def with_cache(self, cache_size: int = 1) -> Bijector:
        if cache_size == self._cache_size:
            return self
        if cache_size not in (0, 1):
            raise ValueError(f"cache_size must be 0 or 1, got {cache_size}")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)  # shares _parameters, _modules, _buffers, _mode
        other.__dict__["_entry"] = None
        other.__dict__["_inv"] = None
        other._cache_size = cache_size
        if cache_size == 1:
            other._cached_x_y = None, None
        return other

    def __hash__(self) -> int:
        return object.__hash__(self)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"
