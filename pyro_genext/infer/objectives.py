r"""The importance-weighted bound as a Pyro ELBO: :class:`ImportanceWeightedELBO`.

One implementation for every model and guide of the package: the flow autoguides of
:mod:`pyro_genext.infer` (through :func:`~pyro_genext.infer.fit_guide`, ``SVI``, or the
``ELBOModule`` it makes), and the amortised guide of :class:`~pyro_genext.models.VAE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import get_dependent_plate_dims, is_validation_enabled, torch_sum
from pyro.util import check_if_enumerated

__all__ = ["ImportanceWeightedELBO"]

_PARTICLES = "num_particles_vectorized"  # the name of Pyro's plate of vectorised particles


def _scalar(scale: Any) -> float | None:
    """A site's scale as a float, or None for one that varies over its batch."""
    if isinstance(scale, torch.Tensor):
        return float(scale) if scale.numel() == 1 else None
    return float(scale)


def path_only_parameters(guide: Any) -> set[int]:
    """The ids of the guide's parameters whose score term its ``log_prob`` drops: those of
    every module inside the guide (the guide itself, a part of an ``AutoGuideList``, the
    object of a bound method such as ``vae.guide``) with a true ``stl`` attribute, as
    :class:`~pyro_genext.infer.AutoRealNVP` and :class:`~pyro_genext.infer.AutoNICE`
    with ``stl=True``, whose ``log_prob`` holds their parameters fixed."""
    owner = getattr(guide, "__self__", guide)
    if not isinstance(owner, torch.nn.Module):
        return set()
    return {id(p) for m in owner.modules() if getattr(m, "stl", False) is True for p in m.parameters()}


class ImportanceWeightedELBO(ELBO):
    r"""The importance-weighted bound :math:`\mathcal L_K = \mathbb E\,\log\frac1K
    \sum_{k=1}^K w_k`, :math:`w_k = p(x, z_k)/q(z_k)`, :math:`z_k \sim q` (Burda,
    Grosse, Salakhutdinov 2015, arXiv:1509.00519), as a Pyro ELBO whose loss is
    :math:`-\mathcal L_K`. :math:`\mathcal L_1` is the ELBO and :math:`\mathcal L_K` rises
    to :math:`\log p(x)` as :math:`K` grows. It means the same through every door:
    ``SVI(model, guide, optim, ImportanceWeightedELBO(K))`` (``step`` calls
    :meth:`loss_and_grads`, ``evaluate_loss`` calls :meth:`loss`), the ``ELBOModule``
    ``ImportanceWeightedELBO(K)(model, guide)`` (its forward is :meth:`differentiable_loss`),
    and :func:`~pyro_genext.infer.fit_guide` with ``objective="iwae"``.

    **Weights per example.** Where every site of model and guide lies in one plate (the
    data plate of an amortised model such as :class:`~pyro_genext.models.VAE`), the
    weights are combined per example and the plate's minibatch scale :math:`s`
    (``size / N``) is applied outside:
    :math:`-\text{loss} = s \sum_n \log \frac1K \sum_k w_{nk}`, unbiased for a minibatch.
    Pyro's ``RenyiELBO(alpha=0)`` weights the *scaled* log-densities,
    :math:`\log \frac1K \sum_k w_{nk}^s`, which equals this for full batches only; sites of
    such a model under different scales (e.g. a KL weight) are refused. Otherwise (global
    latents, as in a hierarchical model) there is one weight per particle, the sum of
    every site's scaled log-densities, as in ``RenyiELBO``.

    **Gradient.** Through reparametrised draws (a guide site without ``rsample`` is
    refused). A parameter gets the IWAE gradient
    :math:`\sum_k \tilde w_k \nabla \log w_k` (:math:`\tilde w` the normalised weights),
    except the parameters of a guide that holds them fixed in its ``log_prob``
    (``AutoRealNVP(stl=True)``, the default, also inside an ``AutoGuideList``), which get
    the doubly reparametrised gradient, DReG (Tucker, Lawson, Gu, Maddison 2018,
    arXiv:1810.04152), :math:`\sum_k \tilde w_k^2\, \partial_z \log w_k\, \partial_\phi z_k`:
    unbiased like IWAE's, and with a variance that goes to zero at the exact posterior.
    The IWAE gradient with the path derivative alone would be biased; DReG's for a
    parameter with a score term (a model's ``pyro.param``, an ``AutoNormal`` in the same
    ``AutoGuideList``) would be too. The guide's modules are found through
    ``guide.modules()`` (of the guide, or of the object of a bound method): wrap a guide
    written as a plain function around an ``stl`` guide in a module, or use
    ``stl=False``. Where both kinds of parameter are present the other parameters'
    correction costs one more backward pass through the parts of the graph that reach
    them.

    Args:
        num_particles: :math:`K`, an integer >= 1.
        max_plate_nesting: as in Pyro's ELBOs; ``inf`` (the default) guesses it.
        vectorize_particles: draw the :math:`K` particles as one batch (the model must
            then run under an extra outer plate, as for ``Trace_ELBO``), or one run of
            model and guide per particle.

    Example::

        >>> import pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> pyro.clear_param_store()
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0.0, 1.0))
        >>> guide = AutoNormal(model, init_scale=1.0)
        >>> abs(ImportanceWeightedELBO(10).loss(model, guide)) < 1e-5  # q = p: log p(x) = 0
        True
    """

    def __init__(self, num_particles: int = 10, max_plate_nesting: float = float("inf"),
                 vectorize_particles: bool = True) -> None:
        name = type(self).__name__
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ValueError(f"{name}: expected num_particles an integer >= 1, got {num_particles!r}")
        if not (max_plate_nesting == float("inf") or (
                isinstance(max_plate_nesting, int) and not isinstance(max_plate_nesting, bool)
                and max_plate_nesting >= 0)):
            raise ValueError(f"{name}: expected max_plate_nesting an integer >= 0 or inf, "
                             f"got {max_plate_nesting!r}")
        if not isinstance(vectorize_particles, bool):
            raise ValueError(f"{name}: expected vectorize_particles True or False, "
                             f"got {vectorize_particles!r}")
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=vectorize_particles)

    def _get_trace(self, model: Any, guide: Any, args: Any, kwargs: Any) -> Any:
        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide,
                                                        args, kwargs)
        if is_validation_enabled():
            check_if_enumerated(guide_trace)
        return model_trace, guide_trace

    def log_weights(self, model: Callable[..., Any], guide: Callable[..., Any],
                    *args: Any, **kwargs: Any) -> tuple[torch.Tensor, float]:
        r"""The log-weights :math:`\log w`, particles on dim 0 (then one dim per example
        where the weights are per example), and the scale applied to the bound."""
        particles, per_example, scale = [], False, 1.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sites = [s for t in (model_trace, guide_trace) for s in t.nodes.values() if s["type"] == "sample"]
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["is_observed"] and not site["fn"].has_rsample:
                    raise NotImplementedError(f"ImportanceWeightedELBO needs reparameterised guide sites; "
                                              f"site {site['name']!r} has no rsample")
            common = set.intersection(*(set(s["cond_indep_stack"]) for s in sites)) if sites else set()
            per_example = any(f.name != _PARTICLES and f.dim is not None for f in common)
            scales = {_scalar(s["scale"]) for s in sites}
            key = "log_prob"
            if per_example:
                if len(scales) != 1 or None in scales:
                    raise NotImplementedError(
                        "ImportanceWeightedELBO needs every site under one data-plate scale, got "
                        f"{sorted(str(s) for s in scales)}")
                key, scale = "unscaled_log_prob", float(scales.pop())  # type: ignore[arg-type]
            sum_dims = get_dependent_plate_dims(sites)
            log_w: Any = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        log_w = log_w + sign * torch_sum(site[key], sum_dims)
            particles.append(log_w)
        if self.vectorize_particles and self.num_particles > 1:
            log_w = particles[0]
        else:
            log_w = torch.stack([torch.as_tensor(p) for p in particles])
        if not per_example:  # one weight per particle: sum the dims of size 1 left by the plates
            log_w = log_w.reshape(log_w.shape[0], -1).sum(-1)
        return log_w, scale

    def differentiable_loss(self, model: Callable[..., Any], guide: Callable[..., Any],
                            *args: Any, **kwargs: Any) -> torch.Tensor:
        """Minus the importance-weighted bound, as a tensor whose gradient is the estimator
        described above (its value is the loss)."""
        with poutine.trace(param_only=True) as capture:
            lw, scale = self.log_weights(model, guide, *args, **kwargs)
        bound = torch.logsumexp(lw, 0) - math.log(lw.shape[0])
        if not (torch.is_grad_enabled() and lw.requires_grad):
            return -scale * bound.sum()
        found = (s["value"].unconstrained() for s in capture.trace.nodes.values())  # type: ignore[union-attr]
        params = [p for p in {id(p): p for p in found}.values() if p.requires_grad]
        # from the guide, not from the parameters this call registered: fit_guide's loop
        # does not register a flow guide's parameters at every step
        path_only = path_only_parameters(guide)
        if not path_only:  # IWAE for every parameter
            return -scale * bound.sum()
        w = torch.softmax(lw.detach(), 0)
        loss = -(scale * (bound.detach().sum() + (w**2 * (lw - lw.detach())).sum()))  # DReG
        others = [p for p in params if id(p) not in path_only]
        if others:  # their IWAE gradient: DReG's plus that of sum (w - w^2) log w
            extra = -(scale * ((w - w**2) * lw).sum())
            grads = torch.autograd.grad(extra, others, retain_graph=True, allow_unused=True)
            for p, g in zip(others, grads):
                if g is not None:
                    term = (g * p).sum()
                    loss = loss + (term - term.detach())  # adds 0 to the value, g to the gradient
        return loss

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any],  # type: ignore[override]
             *args: Any, **kwargs: Any) -> float:
        """Minus the importance-weighted bound, as a float (what ``SVI.evaluate_loss`` calls)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any],  # type: ignore[override]
                       *args: Any, **kwargs: Any) -> float:
        """The loss, after back-propagating its estimator into every parameter (what
        ``SVI.step`` calls)."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())
