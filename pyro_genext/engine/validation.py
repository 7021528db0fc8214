"""Validation: the one scoring loop. Every number the engine, the command line and the
benchmarks report of a split comes from :func:`per_example_metrics`: the kind's
per-example metrics in eval mode, without gradients, each batch prepared with a
generator seeded by :func:`split_seed` (so validation and test numbers are reproducible),
and with torch's global random stream forked and seeded (so whatever a kind's metrics
draw neither disturbs the training stream, which a bit-exact resume replays, nor varies
from one validation to the next).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..data import SPLITS
from .kind import ModelKind

__all__ = ["split_seed", "generator", "per_example_metrics", "summarize", "module_device"]


def split_seed(seed: int, split: str) -> int:
    """The seed of the generator ``prepare`` gets for a pass over ``split`` of a run seeded
    with ``seed``: ``1234 + 3 seed + index of split`` (train 0, val 1, test 2).

    >>> split_seed(0, "train"), split_seed(0, "val"), split_seed(1, "test")
    (1234, 1235, 1239)
    """
    return 1234 + 3 * seed + SPLITS.index(split)


def generator(device: str | torch.device, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``: every random draw the engine
    makes on a batch (dequantization, binarisation) uses one on the batch's device, since a
    draw on a GPU tensor refuses a CPU generator. On the CPU this is the generator the
    engine always used, so CPU runs draw the same numbers as before.

    >>> generator("cpu", 0).device, torch.equal(torch.rand(3, generator=generator("cpu", 0)),
    ...                                         torch.rand(3, generator=torch.Generator().manual_seed(0)))
    (device(type='cpu'), True)
    """
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU if it has none)."""
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def per_example_metrics(
    kind: ModelKind, module: Any, x: torch.Tensor, seed: int, split: str,
    batch_size: int = 500, *, generator_seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """The kind's metrics of every example of ``x`` (a split's raw data), in eval mode and
    without gradients, prepared with a generator seeded by :func:`split_seed` ``(seed,
    split)`` (or ``generator_seed``) on the module's device; returns ``{name: tensor of
    shape (N,)}`` on the CPU, read back once. The module's mode is restored."""
    fixed = split_seed(seed, split) if generator_seed is None else generator_seed
    was_training = module.training
    module.eval()
    device = module_device(module)
    gen = generator(device, fixed)  # draws on the module's device
    parts: dict[str, list[torch.Tensor]] = {}
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(fixed)
            for i in range(0, x.shape[0], batch_size):
                xb = kind.prepare(module, x[i : i + batch_size].to(device), gen)
                for name, v in kind.metrics(module, xb).items():
                    parts.setdefault(name, []).append(v.detach().reshape(-1))
    finally:
        module.train(was_training)
    return {name: torch.cat(v).cpu() for name, v in parts.items()}  # one read at the end


def summarize(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{name_mean, name_median, name_worst}`` of per-example metrics (worst = largest).

    >>> summarize({"bpd": torch.tensor([1.0, 2.0, 6.0])})
    {'bpd_mean': 3.0, 'bpd_median': 2.0, 'bpd_worst': 6.0}
    """
    out: dict[str, float] = {}
    for name, values_ in values.items():
        v = values_.detach().double()
        out[f"{name}_mean"] = float(v.mean())
        out[f"{name}_median"] = float(v.median())
        out[f"{name}_worst"] = float(v.max())
    return out
