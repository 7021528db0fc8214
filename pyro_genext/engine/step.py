r"""One training step: the loss of a batch, its gradient, clipping, the warm-up schedule and
the update.

The loss is Pyro's own: ``elbo(model, guide)`` is an ``nn.Module``
(``pyro.infer.elbo.ELBOModule``) whose ``forward(x)`` is
``elbo.differentiable_loss(model, guide, x)``; :class:`Objective` is that module on a
model's ``model`` and ``guide`` methods, per example (divided by the batch size) and
holding the model as a submodule, so that its parameters are the step's and a
data-parallel wrapper (``DistributedDataParallel(Objective(...))``) averages their
gradients. The update is Adam's on those parameters (fused into one kernel on a GPU),
after each parameter tensor's gradient is clipped to norm ``clip_norm`` (what Pyro's
``clip_args`` does), at the learning rate :func:`learning_rate` of the step.

Nothing in a step reads a value back to the host (on a GPU such a read waits for every
kernel queued before it): Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` read each
particle's ELBO with ``.item()`` and test the loss for NaN on the host, so for them
:func:`differentiable_loss` forms the same differentiable loss from Pyro's own traces
without those reads (the gradient is Pyro's bit for bit), the clipping is ``foreach``
arithmetic on the device, and the random draws come from a generator on the data's
device (:func:`~pyro_genext.engine.validation.generator`). The engine checks the losses
when it reads them back, every few steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.infer.util import is_identically_zero
from torch.distributions import kl_divergence

__all__ = ["Objective", "clip_per_tensor", "differentiable_loss", "learning_rate",
           "make_optimizer", "update"]


def _particle_surrogate(elbo: Any, model_trace: Any, guide_trace: Any) -> torch.Tensor:
    """Minus the surrogate ELBO of one particle, the sums of Pyro's
    ``_differentiable_loss_particle`` in its order, without its host reads; Pyro's own for a
    guide site that needs a score-function term (not reparameterised)."""
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and not is_identically_zero(site["score_parts"].score_function):
            return elbo._differentiable_loss_particle(model_trace, guide_trace)[1]
    surrogate: Any = 0
    if type(elbo) is Trace_ELBO:
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not is_identically_zero(site["score_parts"].entropy_term):
                surrogate = surrogate - site["score_parts"].entropy_term.sum()
        return -surrogate
    for name, site in model_trace.nodes.items():  # TraceMeanField_ELBO: closed-form KLs
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            surrogate = surrogate + site["log_prob_sum"]
            continue
        q = guide_trace.nodes[name]
        try:
            kl = scale_and_mask(kl_divergence(q["fn"], site["fn"]), scale=q["scale"], mask=q["mask"])
            kl_sum = kl.sum() if torch.is_tensor(kl) else kl * torch.Size(q["fn"].batch_shape).numel()
            surrogate = surrogate - kl_sum
        except NotImplementedError:
            surrogate = surrogate + site["log_prob_sum"] - q["score_parts"].entropy_term.sum()
    for name, site in guide_trace.nodes.items():  # auxiliary guide sites
        if site["type"] == "sample" and name not in model_trace.nodes:
            surrogate = surrogate - site["score_parts"].entropy_term.sum()
    return -surrogate


def differentiable_loss(elbo: Any, model: Callable[..., Any], guide: Callable[..., Any],
                        *args: Any, **kwargs: Any) -> torch.Tensor:
    """``elbo.differentiable_loss(model, guide, *args, **kwargs)`` without a host read.

    For Pyro's ``Trace_ELBO`` and ``TraceMeanField_ELBO`` (exactly those classes): the mean
    over particles of each particle's surrogate loss, formed from Pyro's traces by the sums
    Pyro forms, so the gradient is Pyro's bit for bit; the value is the surrogate's, which
    Pyro returns rounded from a double-precision sum of host reads (the same number in
    float32 for one site, within rounding otherwise). Pyro's NaN warning, another host read,
    is left to the caller. Any other ELBO: its own ``differentiable_loss``.

    >>> import pyro, pyro.distributions as dist
    >>> def model(x):
    ...     loc = pyro.param("loc", torch.zeros(()))
    ...     z = pyro.sample("z", dist.Normal(loc, 1.0))
    ...     pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    >>> def guide(x):
    ...     pyro.sample("z", dist.Normal(pyro.param("q", torch.tensor(0.5)), 1.0))
    >>> pyro.set_rng_seed(0); a = differentiable_loss(Trace_ELBO(), model, guide, torch.tensor(1.0))
    >>> pyro.set_rng_seed(0); b = Trace_ELBO().differentiable_loss(model, guide, torch.tensor(1.0))
    >>> torch.allclose(a, b)
    True
    """
    if type(elbo) not in (Trace_ELBO, TraceMeanField_ELBO):
        return elbo.differentiable_loss(model, guide, *args, **kwargs)
    loss: Any = 0.0
    for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
        loss = loss + _particle_surrogate(elbo, model_trace, guide_trace) / elbo.num_particles
    return loss


class Objective(ELBOModule):
    """The training step's module: ``forward(x)`` is the kind's ELBO loss per example,
    ``elbo.differentiable_loss(module.model, module.guide, x) / x.shape[0]`` (by
    :func:`differentiable_loss`: no host read).

    Example:
        >>> import torch
        >>> from pyro.infer import Trace_ELBO
        >>> from pyro_genext import realnvp
        >>> from pyro_genext.models import FlowDensity
        >>> m = FlowDensity(realnvp(2, num_layers=2, hidden_dims=(8,)))
        >>> x = torch.randn(16, 2)
        >>> loss = Objective(m, Trace_ELBO())(x)
        >>> torch.allclose(loss, -m.log_prob(x).mean())
        True
    """

    def __init__(self, module: torch.nn.Module, elbo: Any) -> None:
        m: Any = module
        super().__init__(m.model, m.guide, elbo)
        self.module = module  # a submodule: the parameters are the objective's

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return differentiable_loss(self.elbo, self.model, self.guide, x) / x.shape[0]


def clip_per_tensor(params: Sequence[torch.Tensor], clip_norm: float) -> None:
    """Scale the gradient of each tensor in ``params`` down to norm ``clip_norm`` where it
    is larger (each tensor on its own, as ``torch.nn.utils.clip_grad_norm_([p], c)`` for
    every ``p``, which is what Pyro's ``clip_args`` does). All on the device, a fixed
    handful of ``foreach`` kernels whatever the number of tensors; nothing is read back."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coefs.unbind())


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """The step's Adam: on a GPU fused into one kernel per step (its step counts stay on the
    device); elsewhere torch's default implementation, whose numbers the CPU runs have
    always had."""
    fused = device.type == "cuda"
    return torch.optim.Adam(params, lr=lr, fused=True) if fused else torch.optim.Adam(params, lr=lr)


def learning_rate(lr: float, step: int, warmup: int) -> float:
    """The rate of the update that follows ``step`` updates: ``lr * min(1, (step + 1) /
    warmup)``, a linear warm-up over ``warmup`` steps (none for 0). A function of the step
    alone, so a resumed run needs no state for it.

    >>> [learning_rate(0.01, k, 4) for k in range(5)]
    [0.0025, 0.005, 0.0075, 0.01, 0.01]
    """
    return lr * min(1.0, (step + 1) / warmup) if warmup else lr


def update(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], loss: torch.Tensor,
           clip_norm: float, lr: float) -> None:
    """Back-propagate ``loss``, clip each gradient to ``clip_norm`` and take an optimiser
    step at rate ``lr``."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_per_tensor(params, clip_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
