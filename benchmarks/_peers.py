"""Contenders of the throughput benchmark, one builder per implementation.

Every builder takes a :class:`Config` and returns a :class:`Contender` holding two
closures, one training step and one sampled batch, or raises :class:`Unavailable`
with the reason it cannot run (library missing, no such layer in that library).

The architectures are made equal wherever the library allows:

* RealNVP: ``8`` affine couplings, NICE: ``4`` additive couplings and a per-dimension
  scaling; each coupling alternates which half of the vector it transforms;
* every conditioner is an MLP ``half -> width -> width -> (1 or 2) * half`` with ReLU;
* the last layer of every conditioner is zero-initialised (ours and normflows'
  ``init_zeros`` do that already), so every flow starts at the identity and no
  implementation meets an inf or a NaN while it is timed.

What stays different is each library's own design (how it splits and joins the halves,
its scale parameterisation, its base distribution); that is what is being compared.
The notes returned with each contender say where the parameter counts cannot match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
from torch import nn

__all__ = ["Config", "Contender", "Unavailable", "BUILDERS", "library_versions"]


class Unavailable(Exception):
    """This implementation cannot run this configuration; the message says why."""


@dataclass(frozen=True)
class Config:
    flow: str  # "realnvp" or "nice"
    dim: int
    width: int
    batch: int = 256
    # ours only: the recipe's ``norm``. None (couplings only) is the peers' architecture,
    # which the throughput benchmark compares; "default" is the recipe's own default
    # (actnorm after every RealNVP coupling), which the quality benchmark also reports
    norm: str | None = None

    @property
    def layers(self) -> int:
        return 8 if self.flow == "realnvp" else 4

    @property
    def affine(self) -> bool:
        return self.flow == "realnvp"

    @property
    def halves(self) -> tuple[int, int]:
        """Sizes of the first and second half of the vector."""
        return (self.dim + 1) // 2, self.dim // 2

    def label(self) -> str:
        return f"{self.flow} D={self.dim} width={self.width}"


@dataclass
class Contender:
    name: str
    module: nn.Module  # holds every trainable parameter
    train_step: Callable[[torch.Tensor], None]
    sample_batch: Callable[[], None]
    note: str = ""

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)


def _density(
    name: str,
    module: nn.Module,
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    sample: Callable[[int], Any],
    batch: int,
    note: str = "",
) -> Contender:
    """A contender whose step is ``-log_prob(x).mean()``, backward, ``zero_grad``."""

    def train_step(x: torch.Tensor) -> None:
        loss = -log_prob(x).mean()
        loss.backward()
        module.zero_grad(set_to_none=True)

    def sample_batch() -> None:
        with torch.no_grad():
            sample(batch)

    return Contender(name, module, train_step, sample_batch, note)


def _mlp(n_in: int, n_out: int, width: int) -> nn.Sequential:
    net = nn.Sequential(
        nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, n_out),
    )
    _zero_last_linear(net)
    return net


def _zero_last_linear(net: nn.Module) -> None:
    """Zero the weight and bias of the last dense layer (torch's or a library's own)."""
    dense = [
        m for m in net.modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() == 2
    ]
    nn.init.zeros_(dense[-1].weight)
    if dense[-1].bias is not None:
        nn.init.zeros_(dense[-1].bias)


def _conditioner_sizes(cfg: Config) -> list[tuple[int, int]]:
    """(input, output) features of the conditioner of coupling ``k`` (the part seen
    alternates between the two halves)."""
    h1, h2 = cfg.halves
    mult = 2 if cfg.affine else 1
    return [(h1, mult * h2) if k % 2 == 0 else (h2, mult * h1) for k in range(cfg.layers)]


def _import(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise Unavailable(f"{name} is not installed ({err})") from err


# ---------------------------------------------------------------------------- floor
def build_floor(cfg: Config) -> Contender:
    """The conditioner networks alone: each MLP applied to its own ``(batch, half)``
    input, outputs summed, backward, ``zero_grad``. The inputs of every network but the
    first require a gradient, as inside a flow, where each coupling's input depends on
    the parameters of the couplings before it (in scoring order)."""
    sizes = _conditioner_sizes(cfg)
    nets = nn.ModuleList([_mlp(i, o, cfg.width) for i, o in sizes])
    inputs = [torch.randn(cfg.batch, i) for i, _ in sizes]
    # d(sum of outputs)/d(output) is all ones. Feeding it as a dense tensor rather than
    # calling .sum().backward() matters: sum's backward hands an expanded (stride-0)
    # gradient to the last layer, which then copies it to a dense one, twice per network
    # (about 7 % of the step at D=784, width 256) -- a cost no flow pays.
    ones = [torch.ones(cfg.batch, o) for _, o in sizes]

    def train_step(x: torch.Tensor) -> None:
        outs = [net(h.detach().requires_grad_(k > 0)) for k, (net, h) in enumerate(zip(nets, inputs))]
        torch.autograd.backward(outs, ones)
        nets.zero_grad(set_to_none=True)

    def sample_batch() -> None:
        with torch.no_grad():
            for net, h in zip(nets, inputs):
                net(h)

    return Contender("floor (conditioners alone)", nets, train_step, sample_batch)


# ---------------------------------------------------------------------------- ours
def _our_flow(cfg: Config) -> tuple[nn.Module, Any]:
    """Our recipe at the peers' architecture, and its distribution."""
    import pyro.distributions as dist

    import pyro_genext

    hidden = (cfg.width, cfg.width)
    if cfg.affine:
        flow = pyro_genext.realnvp(cfg.dim, num_layers=cfg.layers, hidden_dims=hidden, norm=cfg.norm)
    else:
        flow = pyro_genext.nice(cfg.dim, num_layers=cfg.layers, hidden_dims=hidden)
    from pyro_genext.distributions import FlowDistribution

    base = dist.Normal(torch.zeros(cfg.dim), torch.ones(cfg.dim)).to_event(1)
    # FlowDistribution is Pyro's TransformedDistribution with the fused one-pass log_prob
    # (what FlowDensity uses); in Pyro's own class, scoring costs the cache's bookkeeping
    return flow, FlowDistribution(base, [flow])


def build_ours(cfg: Config) -> Contender:
    flow, d = _our_flow(cfg)
    name = "pyro_genext (ours)" if cfg.norm is None else "ours, recipe default (actnorm)"
    return _density(name, flow, d.log_prob, lambda n: d.sample((n,)), cfg.batch)


def build_ours_default(cfg: Config) -> Contender:
    """Ours as the recipe builds it by default: RealNVP with an actnorm after every
    coupling (not the peers' architecture; 2 D more parameters per coupling). NICE has no
    such default, so there this is ours unchanged."""
    if not cfg.affine:
        raise Unavailable("the NICE recipe has no normalisation layers by default")
    contender = build_ours(dataclasses.replace(cfg, norm="default"))
    # start the actnorms (pyro_genext.transforms.initialize) before timing, as a user does
    # on the first batch; the timed steps then train a started flow
    import pyro_genext

    pyro_genext.transforms.initialize(contender.module, torch.randn(cfg.batch, cfg.dim))
    return contender


def build_ours_compiled(cfg: Config) -> Contender:
    """Ours, the same flow as ``build_ours``, with ``log_prob`` and ``sample`` compiled by
    ``torch.compile(fullgraph=True)`` (inductor): the training step's forward and backward
    graphs and the sampling graph are generated code; compiled once, before timing."""
    flow, d = _our_flow(cfg)
    log_prob = torch.compile(d.log_prob, fullgraph=True)
    sample = torch.compile(lambda: d.sample((cfg.batch,)), fullgraph=True)
    contender = _density("ours, compiled", flow, log_prob, lambda n: sample(), cfg.batch)
    x = torch.randn(cfg.batch, cfg.dim)
    contender.train_step(x)  # compile both graphs now, not in the first timed call
    contender.sample_batch()
    return contender


# ---------------------------------------------------------------------------- nflows
class _DropContext(nn.Module):
    """nflows' couplings call ``net(x, context)``; its plain MLP takes ``x`` only."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.net(x)


def build_nflows(cfg: Config) -> Contender:
    _import("nflows")
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.nn.nets import MLP
    from nflows.transforms import (
        ActNorm,
        AdditiveCouplingTransform,
        AffineCouplingTransform,
        CompositeTransform,
    )

    def make_net(n_in: int, n_out: int) -> nn.Module:
        net = MLP((n_in,), (n_out,), [cfg.width, cfg.width])
        _zero_last_linear(net)
        return _DropContext(net)

    coupling = AffineCouplingTransform if cfg.affine else AdditiveCouplingTransform
    h1, _ = cfg.halves
    steps: list[nn.Module] = []
    # nflows runs data -> noise; its mask marks the *transformed* features (> 0).
    for k in range(cfg.layers):
        second = torch.arange(cfg.dim) >= h1
        mask = (second if k % 2 == 0 else ~second).int()
        steps.append(coupling(mask, make_net))
    note = ""
    if not cfg.affine:
        steps.append(ActNorm(cfg.dim))  # on the noise side, as NICE's scaling
        note = "nflows has no scale-only layer; its ActNorm also learns a shift (+D params)"
    flow = Flow(CompositeTransform(steps), StandardNormal([cfg.dim]))
    return _density("nflows", flow, flow.log_prob, flow.sample, cfg.batch, note)


# ---------------------------------------------------------------------------- normflows
def build_normflows(cfg: Config) -> Contender:
    nf = _import("normflows")
    flows: list[nn.Module] = []
    if not cfg.affine:  # normflows runs base -> data: the scaling sits on the base side
        flows.append(nf.flows.AffineConstFlow((cfg.dim,), scale=True, shift=False))
    for k, (n_in, n_out) in enumerate(_conditioner_sizes(cfg)):
        net = nf.nets.MLP([n_in, cfg.width, cfg.width, n_out], init_zeros=True)
        flows.append(
            nf.flows.AffineCouplingBlock(
                net, scale=cfg.affine, split_mode="channel" if k % 2 == 0 else "channel_inv"
            )
        )
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(cfg.dim, trainable=False), flows)
    return _density("normflows", model, model.log_prob, model.sample, cfg.batch)


# ---------------------------------------------------------------------------- zuko
def build_zuko(cfg: Config) -> Contender:
    zuko = _import("zuko")
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, GeneralCouplingTransform
    from zuko.lazy import UnconditionalDistribution, UnconditionalTransform
    from zuko.transforms import AdditiveTransform, MonotonicAffineTransform

    del zuko
    h1, _ = cfg.halves
    univariate, shapes = (
        (MonotonicAffineTransform, ((), ())) if cfg.affine else (AdditiveTransform, ((),))
    )
    # zuko runs data -> noise; its mask marks the *constant* features (True).
    transforms: list[nn.Module] = []
    for k in range(cfg.layers):
        first = torch.arange(cfg.dim) < h1
        t = GeneralCouplingTransform(
            cfg.dim, 0, mask=first if k % 2 == 0 else ~first, univariate=univariate,
            shapes=shapes, hidden_features=(cfg.width, cfg.width),
        )
        _zero_last_linear(t.hyper)
        transforms.append(t)
    if not cfg.affine:  # NICE's scaling, on the noise side: zuko's affine with zero shift
        transforms.append(
            UnconditionalTransform(_scale_only, torch.zeros(cfg.dim))
        )
    base = UnconditionalDistribution(
        DiagNormal, torch.zeros(cfg.dim), torch.ones(cfg.dim), buffer=True
    )
    flow = Flow(transforms, base)
    # zuko builds the distribution lazily: flow() is part of each step, as in its tutorials
    return _density(
        "zuko", flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)), cfg.batch
    )


def _scale_only(log_scale: torch.Tensor) -> Any:
    from zuko.transforms import MonotonicAffineTransform

    return MonotonicAffineTransform(torch.zeros_like(log_scale), log_scale)


# ---------------------------------------------------------------------------- Pyro
def build_pyro(cfg: Config) -> Contender:
    if not cfg.affine:
        raise Unavailable("Pyro has no additive (NICE) coupling")
    import pyro.distributions as dist
    from pyro.distributions.transforms import AffineCoupling, Permute
    from pyro.nn import DenseNN

    h1, h2 = cfg.halves
    if h1 != h2:
        raise Unavailable("Pyro's AffineCoupling with a half swap needs an even D")
    # AffineCoupling always transforms the part after split_dim: swap the halves
    # between layers so that the stack alternates (a Permute, i.e. an index_select).
    swap = torch.cat([torch.arange(h1, cfg.dim), torch.arange(h1)])
    parts: list[Any] = []
    modules = nn.ModuleList()
    for k in range(cfg.layers):
        if k:
            parts.append(Permute(swap))
        hyper = DenseNN(h1, [cfg.width, cfg.width], param_dims=[h2, h2])
        _zero_last_linear(hyper)
        coupling = AffineCoupling(h1, hyper)
        parts.append(coupling)
        modules.append(coupling)
    base = dist.Normal(torch.zeros(cfg.dim), torch.ones(cfg.dim)).to_event(1)
    d = dist.TransformedDistribution(base, parts)
    return _density(
        "Pyro AffineCoupling", modules, d.log_prob, lambda n: d.sample((n,)), cfg.batch,
        "Pyro alternates through a Permute (index_select) between couplings",
    )


BUILDERS: dict[str, Callable[[Config], Contender]] = {
    "floor": build_floor,
    "ours": build_ours,
    "ours-default": build_ours_default,
    "ours-compiled": build_ours_compiled,
    "nflows": build_nflows,
    "normflows": build_normflows,
    "zuko": build_zuko,
    "pyro": build_pyro,
}


def library_versions() -> dict[str, str]:
    """Installed versions of torch, Pyro and the peers."""
    out = {}
    for name in ("torch", "pyro-ppl", "nflows", "normflows", "zuko"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
