r"""``nice`` and ``realnvp``: flow density models (:class:`~pyro_genext.models.FlowDensity`)
as model kinds of the training engine.

Training maximises the likelihood of uniformly dequantized data (``Trace_ELBO`` with the
empty guide: the ELBO is the log-likelihood); validation and ``evaluate`` report bits/dim,

.. math:: \mathrm{bpd}(x) = -\frac{\log p(x + u)}{D \log 2}, \qquad u \sim \mathcal{U}[0, 1)^D,

per image, with one dequantization draw per image from a generator seeded by the run's
seed and the split (:func:`~pyro_genext.engine.split_seed`), so numbers are reproducible.
``sample`` writes a PNG grid of samples (a scatter over the density for 2-D data).

Example::

    >>> from pyro_genext.engine import fit
    >>> result = fit("realnvp", {"data": "moons", "steps": 20, "num_layers": 2, "hidden": 16},
    ...              progress=False, log=lambda line: None)
    >>> result["steps"], result["best"]["bpd_mean"] < 3
    (20, True)
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path
from typing import Any

import torch
from pyro.infer import Trace_ELBO

from ..data import Dataset
from ..engine.kind import ModelKind
from ..engine.settings import nonneg_float, positive_int
from ..engine.validation import module_device, per_example_metrics, summarize
from ..flows import IMAGE_INPUT_BOUND, nice, realnvp
from ..metrics import bits_per_dim
from ..models import FlowDensity
from ..transforms import Bijector
from ..transforms.elementwise import check_bound

__all__ = ["build_density", "NICE", "REALNVP"]


#: learning-rate warm-up steps of the flow kinds (docs/cli.rst, "Outlier images early in a
#: run": without it the full-size image RealNVP's third step scored validation images at
#: up to 63549 bits/dim)
FLOW_WARMUP = 50


def _add_nice(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-layers", type=positive_int, default=4, help="additive couplings")
    p.add_argument("--hidden", type=positive_int, default=256,
                   help="units of each of the conditioner's two hidden layers")
    p.add_argument("--base", choices=("normal", "logistic"), default=None,
                   help="the base density (default: logistic for images, as NICE; normal otherwise)")


def scale_bound_arg(text: str) -> float | tuple[float, float]:
    """An argparse type: ``B`` (log-scales in ``(-B, B)``) or ``LOW,HIGH`` (in
    ``(LOW, HIGH)``, ``LOW < 0 < HIGH``; on the command line ``--scale-bound=-1,2``, with
    the ``=``, since a value starting with ``-`` would read as a flag)."""
    expected = "a number B > 0 or a pair LOW,HIGH with LOW < 0 < HIGH"
    try:
        values = [float(v) for v in text.split(",")]
        bound = check_bound(values[0] if len(values) == 1 else tuple(values))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    assert bound is not None
    return bound


def _add_realnvp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-layers", type=positive_int, default=8,
                   help="affine couplings of a vector flow (images: the multi-scale architecture)")
    p.add_argument("--hidden", type=positive_int, default=None,
                   help="conditioner width (default: 256 dense units for vector data, 64 "
                        "channels for images)")
    p.add_argument("--num-blocks", type=positive_int, default=2,
                   help="ResNet blocks per conditioner (images)")
    p.add_argument("--scale-bound", type=scale_bound_arg, default=2.0,
                   help="bound B of each coupling's log-scale, in (-B, B); or LOW,HIGH for "
                        "(LOW, HIGH), written --scale-bound=-1,2")
    p.add_argument("--input-bound", type=nonneg_float, default=None,
                   help="each conditioner sees its input softly clipped to +-C (unchanged up "
                        "to +-0.75 C); 0 turns it off "
                        f"(default: {IMAGE_INPUT_BOUND:g} for images, off for vectors)")
    p.add_argument("--base", choices=("normal", "logistic"), default="normal",
                   help="the base density")


def _input_bound(s: dict[str, Any]) -> float | str | None:
    """The ``input_bound`` of :func:`~pyro_genext.realnvp` a run's settings ask for: the
    recipe's default where the setting is ``None``, off where it is 0, and off for
    settings without it (checkpoints from before it existed were trained without it)."""
    if "input_bound" not in s:
        return None
    value = s["input_bound"]
    if value is None:
        return "default"
    return float(value) or None


def build_density(model: str, s: dict[str, Any], data: Dataset) -> FlowDensity:
    """The flow density a kind's settings describe, for this data's shape and levels."""
    shape = tuple(data.event_shape)
    flat = (math.prod(shape),)
    flow: Bijector
    event_shape: tuple[int, ...]
    base: Any
    if model == "nice":
        flow = nice(flat[0], num_layers=s.get("num_layers") or 4,
                    hidden_dims=(s.get("hidden") or 256,) * 2)
        event_shape = flat
        base = s.get("base") or ("logistic" if data.levels else "normal")
    elif len(shape) == 3:
        flow = realnvp(shape, hidden_channels=s.get("hidden") or 64,
                       num_blocks=s.get("num_blocks") or 2, scale_bound=s.get("scale_bound", 2.0),
                       input_bound=_input_bound(s))
        event_shape = shape
        base = s.get("base") or "normal"
    else:
        flow = realnvp(flat, num_layers=s.get("num_layers") or 8,
                       hidden_dims=(s.get("hidden") or 256,) * 2,
                       scale_bound=s.get("scale_bound", 2.0), input_bound=_input_bound(s))
        event_shape = flat
        base = s.get("base") or "normal"
    return FlowDensity(flow, event_shape=event_shape, levels=data.levels, base=base)


def prepare(m: Any, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reshape to the model's event shape; in eval mode (validation, test) add one uniform
    dequantization draw from ``generator`` (in training, ``model`` dequantizes itself)."""
    x = x.reshape((x.shape[0],) + tuple(m.event_shape))
    if m.levels is not None and not m.training:
        x = x + torch.rand(x.shape, generator=generator, device=x.device).to(x.dtype)
    return x


def train_loss(m: Any, x: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """The training loss per example without Pyro's tracing (``--compile``): minus the
    log-likelihood of the batch, dequantized as :meth:`FlowDensity.model
    <pyro_genext.models.FlowDensity.model>` dequantizes it, summed and divided by the
    batch size, as ``Trace_ELBO`` with the empty guide computes it."""
    noise = m.levels is not None and m.dequantize and m.training
    return -m.log_prob(x, dequantize=noise).sum() / x.shape[0]


def metrics(m: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bits/dim of each (prepared, dequantized) example."""
    return {"bpd": bits_per_dim(m.log_prob(x, dequantize=False), m.event_shape)}


def initialize(m: Any, x: torch.Tensor) -> None:
    """``FlowDensity.initialize(x)`` where it exists (actnorm's start-up on the first
    batch); otherwise the actnorms start up on the first training step."""
    start = getattr(m, "initialize", None)
    if start is not None:
        start(x)


def check_data(m: Any, x: torch.Tensor) -> None:
    """The whole split, once: integer levels in range (discrete data) or finite values."""
    m.check_data(x.reshape((x.shape[0],) + tuple(m.event_shape)))


def progress(m: Any, loss: float) -> tuple[str, float]:
    """The progress bar shows the training loss in bits/dim."""
    return "bpd", loss / (math.prod(m.event_shape) * math.log(2))


def evaluate(m: Any, data: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """Bits/dim of a split: mean, median and worst image."""
    kind = NICE if args.kind == "nice" else REALNVP  # the same prepare and metrics
    values = per_example_metrics(kind, m, data.x, args.settings["seed"], data.split or "test")
    summary = summarize(values)
    return {"bits_per_dim": summary["bpd_mean"], "bits_per_dim_median": summary["bpd_median"],
            "bits_per_dim_worst": summary["bpd_worst"]}


def sample(m: Any, data: Dataset, args: argparse.Namespace) -> list[Path]:
    """A PNG of ``args.num`` samples at ``args.out``."""
    from ..plots import save_samples

    torch.manual_seed(args.seed)
    if len(data.event_shape) != 3 and module_device(m).type != "cpu":
        m = copy.deepcopy(m).cpu()  # the scatter scores a grid of host points under the density
    save_samples(m, data, args.num, args.out)
    return [Path(args.out)]


def _kind(name: str, summary: str, add: Any) -> ModelKind:
    return ModelKind(
        name=name, summary=summary, add_arguments=add,
        build=lambda s, data: build_density(name, s, data),
        loss=lambda s: Trace_ELBO(), metrics=metrics, evaluate=evaluate, sample=sample,
        prepare=prepare, initialize=initialize, default_threads=1, progress=progress,
        default_warmup=FLOW_WARMUP,
        check_data=check_data, train_loss=train_loss,
    )


NICE = _kind("nice", "NICE: additive couplings and a diagonal scaling (Dinh et al. 2014)", _add_nice)
REALNVP = _kind("realnvp", "RealNVP: affine couplings, multi-scale for images (Dinh et al. 2016)",
                _add_realnvp)
