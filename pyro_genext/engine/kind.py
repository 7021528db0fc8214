"""What a model kind tells the engine: :class:`ModelKind`.

The engine's core knows no concrete kind; the built-in kinds (:mod:`pyro_genext.kinds`)
and any kind a user writes fill in this record and import the core, never the other way.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import Dataset

if TYPE_CHECKING:  # pragma: no cover
    from pyro.infer import ELBO
    from pyro.nn import PyroModule

__all__ = ["ModelKind"]


def _identity(module: Any, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """How one kind of model is built, trained, validated, evaluated and sampled.

    Fields: ``name`` (the command-line name), ``summary`` (one line for ``--help``),
    ``add_arguments`` (a function that adds the model's own ``train`` flags to an
    ``argparse`` parser; each ``dest`` is a key of the settings), ``build(settings,
    train_data)`` (a ``PyroModule`` with ``model(x)`` and ``guide(x)`` whose parameters
    live in the module), ``loss(settings)`` (a Pyro ELBO), ``metrics(module, x)``,
    ``evaluate(module, data, args)`` (a JSON-able dict for ``pyro-genext evaluate``; a kind
    that scores part of the split says how many examples under ``num_examples``),
    ``sample(module, data, args)`` (writes pictures, returns their paths), and optionally
    ``prepare``, ``initialize`` (data-dependent start-up on the first prepared training
    batch, before step 1, not on resume), ``on_step``, ``add_evaluate_arguments``,
    ``add_sample_arguments``, ``default_threads`` (CPU threads without ``--threads``),
    ``default_warmup`` (learning-rate warm-up steps without ``--warmup``), ``progress``,
    ``check_data``, ``check_settings`` and ``train_loss``.

    ``evaluate`` and ``sample`` get the checkpoint's data set (the split asked for, the test
    split for ``sample``) and the parsed flags, with ``args.kind`` (the kind's name) and
    ``args.settings`` (the run's settings) added; the command line runs them without
    gradients. ``metrics`` returns per-example values, lower is better; the first key's
    mean selects the best checkpoint. ``prepare`` is called with the module in training
    mode for training batches (with the engine's training generator, each step) and in
    eval mode for validation and test batches (with a generator seeded from the run's
    seed and the split, so validation numbers are reproducible). ``on_step(module, step,
    settings)`` is called right before each training step's loss, where ``step`` is the
    number of optimiser steps already taken (0 for the first; exact on resume): a
    schedule that is a function of the step (a KL warm-up) needs no state of its own.
    ``progress`` turns the training loss per example into the progress bar's figure, e.g.
    ``("bpd", loss / (D log 2))``. ``check_data`` raises ``ValueError`` for a split the
    model cannot take (NaN, values out of range); the engine calls it once per split when
    the data are loaded and then trains inside
    :func:`~pyro_genext.checks.data_checks` ``(False)``, so no step reads values back to
    the host. ``check_settings(settings)`` raises ``ValueError`` for a combination of the
    kind's settings that it cannot train (each flag is already checked on its own); the
    engine calls it with the common checks, before any work, and the command line turns it
    into a usage error (exit status 2). ``train_loss(module, x, settings)``, for
    ``--compile``: the training loss per example of a prepared batch, the same objective as
    ``loss(settings)`` (the same estimator, in expectation), computed by the model's own
    tensors without Pyro's tracing (which the compiler cannot follow): the engine compiles
    it with its backward pass and the update into one step. A kind without it trains
    eagerly under ``--compile``, and says so.
    """

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    build: Callable[[dict[str, Any], Dataset], PyroModule]
    loss: Callable[[dict[str, Any]], ELBO]
    metrics: Callable[[PyroModule, torch.Tensor], dict[str, torch.Tensor]]
    evaluate: Callable[[PyroModule, Dataset, argparse.Namespace], dict[str, Any]]
    sample: Callable[[PyroModule, Dataset, argparse.Namespace], list[Path]]
    prepare: Callable[[PyroModule, torch.Tensor, torch.Generator], torch.Tensor] = _identity
    initialize: Callable[[PyroModule, torch.Tensor], None] | None = None
    add_evaluate_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    add_sample_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    default_threads: int = 1
    default_warmup: int = 0
    progress: Callable[[PyroModule, float], tuple[str, float]] | None = None
    check_data: Callable[[PyroModule, torch.Tensor], None] | None = None
    on_step: Callable[[Any, int, dict], None] | None = None
    check_settings: Callable[[Mapping[str, Any]], None] | None = None
    train_loss: Callable[[Any, torch.Tensor, dict], torch.Tensor] | None = None
