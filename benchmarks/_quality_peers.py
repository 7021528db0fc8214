"""Contenders of the quality benchmark: the throughput benchmark's builders, made trainable.

Every model is built by :data:`_peers.BUILDERS`, so both benchmarks compare the same
architectures (8 affine couplings or NICE's 4 additive couplings and a scaling, MLP
conditioners ``half -> width -> width -> out``, halves alternating). What the quality
benchmark needs on top is each model's log-density on flow-space vectors, to train it with
an optimiser and to score it; :func:`build` returns it with the module holding the
parameters.

``init`` chooses the last layer of every conditioner:

* ``"zero"`` (equal architecture): zero weights and bias, as ``_peers`` builds them, so
  every flow starts at the identity, as ours does by design;
* ``"library"``: the peers' own default, the ``reset_parameters`` of that layer (torch's
  ``nn.Linear`` initialisation in nflows' ``MLP``, normflows' ``MLP(init_zeros=False)``
  and Pyro's ``DenseNN``; zuko's own ``Linear``, the same uniform bound). Ours has no
  such option: it always starts at the identity.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from _peers import BUILDERS, Config, Unavailable
from torch import nn

__all__ = ["IMPLEMENTATIONS", "INITS", "Model", "Unavailable", "build"]

#: name -> (builder in ``_peers.BUILDERS``, flow of its :class:`~_peers.Config`, ``norm``
#: of ours). ``ours-realnvp`` is the recipe as a user gets it (actnorm after every
#: coupling); ``ours-plain`` is couplings only, the peers' architecture exactly.
IMPLEMENTATIONS: dict[str, tuple[str, str, str | None]] = {
    "ours-realnvp": ("ours", "realnvp", "default"),
    "ours-plain": ("ours", "realnvp", None),
    "ours-nice": ("ours", "nice", None),
    "nflows": ("nflows", "realnvp", None),
    "normflows": ("normflows", "realnvp", None),
    "zuko": ("zuko", "realnvp", None),
    "pyro": ("pyro", "realnvp", None),
}
INITS = ("zero", "library")

# the attribute under which each library's coupling holds its conditioner network
_CONDITIONER_ATTRS = ("transform_net", "param_map", "hyper", "nn")


@dataclass
class Model:
    name: str
    module: nn.Module  # holds every trainable parameter
    log_prob: Callable[[torch.Tensor], torch.Tensor]  # (N, D) flow-space vectors -> (N,)
    layers: int
    note: str = ""

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


def build(name: str, dim: int, width: int, init: str = "zero") -> Model:
    """The model ``name`` (a key of :data:`IMPLEMENTATIONS`) on ``dim``-vectors with
    conditioners of ``width``; raises :class:`Unavailable` if it cannot be built."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"expected an implementation in {sorted(IMPLEMENTATIONS)}, got {name!r}")
    if init not in INITS:
        raise ValueError(f"expected init in {list(INITS)}, got {init!r}")
    builder, flow, norm = IMPLEMENTATIONS[name]
    cfg = Config(flow, dim, width, norm=norm)
    contender = BUILDERS[builder](cfg)
    # _peers hands out closures; the log-density each builder wrapped is the one the
    # training-step closure calls (see _peers._density).
    log_prob = inspect.getclosurevars(contender.train_step).nonlocals.get("log_prob")
    if not callable(log_prob):
        raise RuntimeError("_peers._density no longer closes over `log_prob`: update build()")
    if init == "library" and builder != "ours":
        _library_init(contender.module)
    return Model(name, contender.module, log_prob, cfg.layers, contender.note)


def _library_init(module: nn.Module) -> None:
    """Give the last dense layer of every conditioner its library's default initialisation."""
    nets = [
        net for m in module.modules() for attr in _CONDITIONER_ATTRS
        if isinstance(net := getattr(m, attr, None), nn.Module) and net is not m
    ]
    if not nets:
        raise RuntimeError(f"no conditioner found in {type(module).__name__}")
    for net in nets:
        dense = [  # torch's nn.Linear or a library's own (zuko's)
            m for m in net.modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2
        ]
        dense[-1].reset_parameters()
