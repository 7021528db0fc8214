r"""One training step: the loss of a batch, its gradient, clipping, the warm-up schedule and
the update.

The loss is Pyro's own: ``elbo(model, guide)`` is an ``nn.Module``
(``pyro.infer.elbo.ELBOModule``) whose ``forward(x)`` is
``elbo.differentiable_loss(model, guide, x)``; :class:`Objective` is that module on a
model's ``model`` and ``guide`` methods, per example (divided by the batch size) and
holding the model as a submodule, so that its parameters are the step's and a
data-parallel wrapper (``DistributedDataParallel(Objective(...))``) averages their
gradients. The update is Adam's on those parameters, after each parameter tensor's
gradient is clipped to norm ``clip_norm`` (what Pyro's ``clip_args`` does), at the
learning rate :func:`learning_rate` of the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.infer.elbo import ELBOModule

__all__ = ["Objective", "clip_per_tensor", "learning_rate", "update"]


class Objective(ELBOModule):
    """The training step's module: ``forward(x)`` is the kind's ELBO loss per example,
    ``elbo.differentiable_loss(module.model, module.guide, x) / x.shape[0]``.

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
        return super().forward(x) / x.shape[0]


def clip_per_tensor(params: Sequence[torch.Tensor], clip_norm: float) -> None:
    """Scale the gradient of each tensor in ``params`` down to norm ``clip_norm`` where it
    is larger (each tensor on its own, as ``torch.nn.utils.clip_grad_norm_([p], c)`` for
    every ``p``, which is what Pyro's ``clip_args`` does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [(clip_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


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
