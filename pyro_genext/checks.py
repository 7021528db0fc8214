"""Switching off the value checks of data for code that has validated its data already.

Every model checks its data before any computation: shapes always, and values (NaN or
infinite entries, integer levels, the data range, the support) by default. A value check
reads the data on the host: on a GPU that is a synchronisation, a stall of the training
step. The training engine therefore validates each data set once, when it is loaded, and
runs its steps inside ``data_checks(False)``; so can any loop that has done the same.
Inside it Pyro's and torch's distribution argument and support checks are off too
(``pyro.validation_enabled(False)``), for the same reason.

>>> import torch
>>> from pyro_genext.models import FlowDensity
>>> from pyro_genext import realnvp
>>> m = FlowDensity(realnvp(2, num_layers=2, hidden_dims=(8,)))
>>> bad = torch.tensor([[float("nan"), 0.0]])
>>> with data_checks(False):
...     m.log_prob(bad).isnan().all().item()    # no check: the NaN goes through
True
>>> data_checks_enabled()
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["data_checks", "data_checks_enabled"]

_ENABLED = [True]


def as_model_dtype(x: Any, dtype: torch.dtype) -> torch.Tensor:
    """Data ``x`` as a real tensor of the model's ``dtype``: integers, booleans and other
    floats are converted; a non-tensor is a ``TypeError``, complex data a ``ValueError``.
    (Shapes and values are each model's own checks.)"""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected data as a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ValueError(f"expected real data, got dtype {x.dtype}")
    return x if x.dtype == dtype else x.to(dtype)


def data_checks_enabled() -> bool:
    """Whether models check the values of their data (the default)."""
    return _ENABLED[0]


@contextmanager
def data_checks(enabled: bool) -> Iterator[None]:
    """Within the block, models check the values of their data only if ``enabled``
    (shapes are always checked). Restores the previous setting on exit."""
    import pyro

    old = _ENABLED[0]
    _ENABLED[0] = bool(enabled)
    try:
        if enabled:
            yield
        else:
            with pyro.validation_enabled(False):
                yield
    finally:
        _ENABLED[0] = old
