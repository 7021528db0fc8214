"""Which model kinds there are: the built-in ones (a tuple, :data:`pyro_genext.kinds.BUILTIN`)
and those a user adds with :func:`register`. Plain data: nothing is registered by
importing a module.

The built-in kinds import the engine's core (:mod:`~pyro_genext.engine.kind`,
:mod:`~pyro_genext.engine.settings`, :mod:`~pyro_genext.engine.validation`); the core never
imports them. This module looks them up when a name is asked for, which is the one place
the engine refers to :mod:`pyro_genext.kinds`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import settings
from .checkpoint import data_stub, load_model_state
from .kind import ModelKind

__all__ = ["register", "unregister", "kinds", "get_kind", "default_settings",
           "module_from_checkpoint"]

_REGISTERED: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> None:
    """Add a model kind (a name taken by a built-in kind is replaced by it); the command line's
    ``train MODEL`` choices, :func:`get_kind` and ``fit(name, ...)`` then know it."""
    if not isinstance(kind, ModelKind):
        raise TypeError(f"expected a ModelKind, got {type(kind).__name__}")
    if not kind.name or kind.name.startswith("-"):
        raise ValueError(f"expected a model name usable on the command line, got {kind.name!r}")
    _REGISTERED[kind.name] = kind


def unregister(name: str) -> None:
    """Remove a kind added with :func:`register`."""
    if name not in _REGISTERED:
        raise ValueError(f"no registered kind {name!r}; registered: {', '.join(_REGISTERED) or 'none'}")
    del _REGISTERED[name]


def kinds() -> dict[str, ModelKind]:
    """Every kind by name: the built-in ones, then the registered ones."""
    from ..kinds import BUILTIN  # looked up when asked: the kinds import the engine's core

    return {**{k.name: k for k in BUILTIN}, **_REGISTERED}


def get_kind(name: str | ModelKind) -> ModelKind:
    """The kind called ``name`` (a :class:`ModelKind` is returned as it is)."""
    if isinstance(name, ModelKind):
        return name
    known = kinds()
    if name not in known:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(sorted(known))}")
    return known[name]


def module_from_checkpoint(state: Mapping[str, Any]) -> tuple[Any, ModelKind, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode: ``(module, kind, settings)``."""
    kind = get_kind(state["kind"])
    settings = dict(state["settings"])
    module = kind.build(settings, data_stub(state))
    load_model_state(module, state)
    module.eval()
    return module, kind, settings


def default_settings(kind: str | ModelKind) -> dict[str, Any]:
    """Every setting of ``kind`` (a name or a :class:`ModelKind`) with its default: the
    engine's common settings and the kind's own (``data`` is ``None``: it must be given).

    >>> s = default_settings("realnvp")
    >>> s["batch_size"], s["lr"], s["warmup"], s["num_layers"], s["data"]
    (64, 0.001, 50, 8, None)
    """
    return settings.default_settings(get_kind(kind))
