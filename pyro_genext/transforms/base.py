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
* any parameter or buffer was changed in place (its version counter moved), swapped for
  another tensor (``torch.func.functional_call``, ``load_state_dict(assign=True)``) or
  given new storage (``p.data = ...``, as ``torch.nn.utils.vector_to_parameters`` does);
* any torch optimiser took a step since (Pyro's optimisers wrap torch's): a global
  ``register_optimizer_step_post_hook`` counts steps, which also covers optimisers that
  write through ``p.data`` (Pyro's ``ClippedAdam``), invisible to version counters;
* a module of the transform was switched between training and evaluation mode;
* the pair was computed without gradients and gradients are now wanted, or its input or
  a parameter, buffer or context tensor was frozen or unfrozen (``requires_grad_``) since;
* the returned tensor was garbage-collected: the entry goes with it, so nothing the
  user dropped (an input, a log-determinant's autograd graph) is kept alive. That
  clean-up runs no Python code (see :class:`_Ref`), so a Ctrl-C cannot be lost in it;
* inference tensors (``torch.inference_mode``) are never cached.

What no check can see: a write through ``p.data`` *outside* an optimiser's ``step``,
e.g. ``p.data.copy_(other)``, which moves neither the version counter nor the storage;
a write through ``.data`` of the returned tensor or its input; a change to a plain
attribute the maths reads (``scale_bound``); a submodule without tensors inserted by
``Sequential.insert`` / ``ModuleList.insert`` (no registration hook fires). Call
:func:`invalidate_caches` after such a change. Nor a write by another process to
parameters in shared memory (Hogwild): counters are per process; use ``with_cache(0)``.

Inside code being compiled (``torch.compile``) nothing is remembered and nothing is
served: state kept on a module there would outlive the traced call (the compiler
replays attribute writes after the graph, with the tensors), so a compiled
``TransformedDistribution.log_prob`` runs each network twice (the inverse, then the
forward pass again for the log-det). :class:`~pyro_genext.distributions.FlowDistribution`
scores with the fused pass ``_inverse_and_ladj`` instead: one pass, compiled or not.

With ``cache_size=0`` nothing is remembered, as torch's contract says:
``log_abs_det_jacobian`` then runs the network again.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from operator import attrgetter
from typing import Any

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Transform, constraints
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["FlowTransform", "Bijector", "check_event_shape", "invalidate_caches", "sum_rightmost"]


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


# ------------------------------------------------------------------ the cache's clock
class _Clock:
    """Two global counters the cache reads instead of walking what they count.

    ``epoch`` is bumped after every ``step()`` of every torch optimiser (Pyro's wrap
    torch's, ``ClippedAdam`` included), so a step that changes parameters through
    ``.data`` (invisible to their version counters) still invalidates every remembered
    pair. ``layout`` is bumped whenever any module is given a submodule, a parameter or a
    buffer (torch's global registration hooks), so each transform can keep the flat list
    of modules and tensor dicts it reads, and rebuild it only after such a change."""

    epoch = 0
    layout = 0


def _tick(*_: Any) -> None:
    _Clock.epoch += 1


def _relayout(*_: Any) -> None:
    _Clock.layout += 1


register_optimizer_step_post_hook(_tick)
register_module_module_registration_hook(_relayout)
register_module_parameter_registration_hook(_relayout)
register_module_buffer_registration_hook(_relayout)


def invalidate_caches() -> None:
    """Make every bijector's remembered pair stale, for changes that nothing else can
    see: a write through ``p.data`` outside a torch optimiser's ``step``, e.g.
    ``p.data.copy_(other)`` or a hand-written ``p.data -= lr * p.grad``, and the others
    the module docstring lists.

    Example::

        >>> import pyro_genext as pg
        >>> flow = pg.realnvp(2, num_layers=2, hidden_dims=(8,))
        >>> y = flow(torch.randn(3, 2))
        >>> for p in flow.parameters():
        ...     _ = p.data.add_(0.1)
        >>> invalidate_caches()
        >>> torch.allclose(flow.inv(y), flow.with_cache(0).inv(y.clone()))
        True
    """
    _tick()


def _layout(roots: Iterable[nn.Module]) -> tuple[int, tuple[nn.Module, ...], tuple[dict, ...]]:
    """Every module under ``roots`` and their non-empty parameter and buffer dicts (the
    dicts themselves: a tensor that ``functional_call`` swaps in is read from them)."""
    mods: list[nn.Module] = []
    stack = list(roots)
    while stack:
        m = stack.pop()
        mods.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    dicts = tuple(d for m in mods for d in (m._parameters, m._buffers) if d)
    return _Clock.layout, tuple(mods), dicts


def _signature(mods: tuple[nn.Module, ...], dicts: tuple[dict, ...],
               extra: Iterable[torch.Tensor], keep: list[Any] | None = None) -> tuple[Any, ...]:
    """Everything a remembered pair depends on besides its own tensors, as one flat tuple
    of ints and bools: the optimiser epoch, each module's training flag, and the identity,
    version, storage address and ``requires_grad`` flag of every parameter, buffer and
    extra tensor. With ``keep``, the tensors and their storages are appended to it, so
    that holding ``keep`` stops any id or address in the signature from being reused."""
    tensors = [t for d in dicts for t in d.values() if t is not None]
    tensors += extra
    if keep is not None:
        keep += tensors
        keep += [t.untyped_storage() for t in tensors]
    # map with C getters: about half the time of a Python loop over the tensors
    return (_Clock.epoch, *map(_training, mods), *map(id, tensors), *map(_version, tensors),
            *map(_data_ptr, tensors), *map(_requires_grad, tensors))


_training, _version, _requires_grad = (attrgetter("training"), attrgetter("_version"),
                                       attrgetter("requires_grad"))
_data_ptr = torch.Tensor.data_ptr


class _Entry:
    """What one call produced from ``inp``: the log-det, and what it was computed under
    (the input's version and ``requires_grad``, the gradient mode, the :func:`_signature`
    of the state)."""

    __slots__ = ("inp", "inp_version", "inp_grad", "out_version", "ladj", "forward", "grad",
                 "sig", "keep")
    inp: torch.Tensor
    inp_version: int
    inp_grad: bool
    out_version: int
    ladj: torch.Tensor
    forward: bool
    grad: bool
    sig: tuple[Any, ...]
    keep: list[Any]


class _Ref(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to the tensor a call returned, carrying that call's entry.

    The transform holds it in a set, and its callback is that set's ``discard``: when the
    tensor dies, C code drops the reference and the entry with it (and so the input and
    the log-det's graph). No Python function runs on that path, so a ``KeyboardInterrupt``
    can never land inside it and be swallowed as an "exception ignored" in a callback."""

    __slots__ = ("entry",)
    entry: _Entry


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

    # ------------------------------------------------------------------ caching
    def _signature(self, keep: list[Any] | None = None) -> tuple[Any, ...]:
        layout = self.__dict__.get("_layout")
        if layout is None or layout[0] != _Clock.layout:
            layout = self.__dict__["_layout"] = _layout(self._state_modules())
        return _signature(layout[1], layout[2], self._extra_state(), keep)

    def _remember(self, inp: torch.Tensor, out: torch.Tensor, ladj: torch.Tensor,
                  forward: bool) -> None:
        if torch.compiler.is_compiling():
            return  # compiled code keeps no state at all: nothing outlives a traced call
        held = self.__dict__.get("_held")
        if held is None:
            held = self.__dict__["_held"] = set()
        held.clear()  # one entry per transform: the previous one goes now
        if inp.is_inference() or out.is_inference():
            return
        e = _Entry()
        e.keep = []
        try:
            e.out_version, e.inp_version = out._version, inp._version
            e.sig = self._signature(e.keep)  # keep: ids and addresses cannot be reused
        except RuntimeError:  # inference tensors (no version counter) or functorch wrappers
            return
        e.inp, e.ladj, e.forward, e.grad = inp, ladj, forward, torch.is_grad_enabled()
        e.inp_grad = inp.requires_grad
        ref = _Ref(out, held.discard)  # the callback is C code: see _Ref
        ref.entry = e
        held.add(ref)

    def _served(self, value: torch.Tensor, forward_entry: bool) -> _Entry | None:
        """The entry whose returned tensor is ``value``, from a forward call
        (``forward_entry``) or an inverse call, if it is still right."""
        held = self.__dict__.get("_held")
        if not held or torch.compiler.is_compiling():
            return None
        for ref in held:
            if ref() is not value:
                return None
            e = ref.entry
            if e.forward != forward_entry or (not e.grad and torch.is_grad_enabled()):
                return None
            try:
                if (value._version != e.out_version or e.inp._version != e.inp_version
                        or e.inp.requires_grad != e.inp_grad):
                    return None
                return e if self._signature() == e.sig else None
            except RuntimeError:  # pragma: no cover - a functorch wrapper in the state
                return None
        return None

    def clear_cache(self) -> None:
        """Forget the remembered pair (it also expires by itself, see the module doc)."""
        held = self.__dict__.get("_held")
        if held:
            held.clear()

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
        if self._cache_size == 1:
            e = self._served(y, forward_entry=True)
            if e is not None and e.inp is x:
                return e.ladj
            e = self._served(x, forward_entry=False)
            if e is not None and e.inp is y:
                return e.ladj
        check_event_shape(x, self.event_shape)
        return self._forward_and_ladj(x)[1]

    def _inverse_with_ladj(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t.inv(y), log|det J|)`` in one pass, or from the pair a call of ``t(x)``
        returned as ``y`` (see :class:`~pyro_genext.distributions.FlowDistribution`);
        remembers nothing."""
        if self._cache_size == 1:
            e = self._served(y, forward_entry=True)
            if e is not None:
                return e.inp, e.ladj
        check_event_shape(y, self.codomain_event_shape)
        return self._inverse_and_ladj(y)

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # drops the weak inverse
        state.pop("_held", None)  # weak references cannot be copied; a copy starts empty
        state.pop("_layout", None)
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
        other.__dict__.pop("_held", None)  # a view starts with an empty cache of its own
        other.__dict__["_inv"] = None
        other._cache_size = cache_size
        if cache_size == 1:
            other._cached_x_y = None, None
        return other

    def __hash__(self) -> int:
        return object.__hash__(self)

    def extra_repr(self) -> str:
        return f"event_shape={self.event_shape}"
