"""The bijector checker that pyro_genext's own suite runs over every bijector.

It is public so that users can check their own bijectors the same way::

    >>> from functools import partial
    >>> from pyro_genext import realnvp
    >>> from pyro_genext.testing import check_bijector
    >>> check_bijector(partial(realnvp, 4, num_layers=2, hidden_dims=(8,)))

:func:`check_bijector` takes a *factory* (a callable returning a fresh bijector, or a
conditional bijector together with ``context_dim``) and checks, in float64 and after
moving every parameter away from its initialisation:

* round trip ``inv(f(x)) == x`` and ``f(inv(y)) == y``, uncached (``cache_size=0`` and a
  cloned ``y`` so no cache can answer) and cached (``with_cache(1)`` returns ``x`` itself);
* ``log|det J|`` against :func:`torch.autograd.functional.jacobian` + ``slogdet``, the
  sign of ``det J`` against :attr:`sign`, and ``inv``'s log-det equal to minus forward's;
* output and log-det shapes for batch shapes ``()``, ``(3,)``, ``(2, 3)``;
* ``TransformedDistribution.log_prob`` equal to the change of variables, ``rsample`` shape;
* ``state_dict``, pickle and ``copy.deepcopy`` round trips, also right after a forward
  pass (the cache must not break copying);
* gradients reach every parameter;
* a wrong event shape raises ``ValueError`` before any computation.

Each check raises ``AssertionError`` with a message naming the check.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.distributions import Normal, TransformedDistribution
from torch.distributions import Transform

__all__ = [
    "check_bijector",
    "check_round_trip",
    "check_log_det",
    "check_batch_shapes",
    "check_distribution",
    "check_serialization",
    "check_gradients",
    "check_bad_input",
    "perturb_parameters",
]

BATCH_SHAPES: tuple[tuple[int, ...], ...] = ((), (3,), (2, 3))


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float, rtol: float = 1e-6) -> None:
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if not torch.allclose(a, b, atol=atol, rtol=rtol):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{what}: max abs error {err:.3g} > atol {atol:g}")


def perturb_parameters(module: Any, scale: float = 0.05, seed: int = 0) -> None:
    """Move every floating-point parameter away from its initialisation (zero output
    layers make a fresh coupling the identity, which would hide bugs)."""
    if not isinstance(module, torch.nn.Module):
        return
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_(scale * noise.to(p))
        for name, b in module.named_buffers():
            if name.endswith("initialized"):
                b.fill_(True)  # keep data-dependent initialisation from resetting them


def _event_shapes(t: Transform) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ev = tuple(t.event_shape)  # type: ignore[attr-defined]
    out = tuple(getattr(t, "codomain_event_shape", ev))
    return ev, out


def check_round_trip(t: Transform, x: torch.Tensor, atol: float = 1e-8) -> None:
    """Uncached and cached round trips in both directions."""
    uncached = t.with_cache(0)
    y = uncached(x)
    _close(uncached.inv(y.clone()), x, "round trip inv(f(x)) uncached", atol)
    _close(uncached._inverse(y.clone()), x, "round trip _inverse(f(x))", atol)
    x2 = uncached.inv(y.clone())
    _close(uncached(x2.clone()), y, "round trip f(inv(y)) uncached", atol * 10)
    cached = t.with_cache(1)
    if cached._cache_size != 1:
        raise AssertionError("with_cache(1) did not return a transform with cache_size 1")
    if isinstance(t, torch.nn.Module) and isinstance(cached, torch.nn.Module):
        if any(a is not b for a, b in zip(t.parameters(), cached.parameters())):
            raise AssertionError("with_cache(1) must share the parameters of the original")
    yc = cached(x)
    if cached.inv(yc) is not x:
        raise AssertionError("cached inverse of f(x) must return x itself")
    _close(cached.inv(yc.clone()), x, "round trip with cache_size=1 but a cloned y", atol)
    if cached.with_cache(0)._cache_size != 0:
        raise AssertionError("with_cache(0) did not return an uncached transform")


def check_log_det(t: Transform, x: torch.Tensor, atol: float = 1e-7) -> None:
    """log|det J| of one event against the autograd Jacobian (float64 recommended)."""
    ev, out = _event_shapes(t)
    t0 = t.with_cache(0)

    def flat(v: torch.Tensor) -> torch.Tensor:
        return t0(v.reshape(ev)).reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, x.reshape(-1).clone())
    if jac.shape[0] != jac.shape[1]:
        raise AssertionError(f"Jacobian is not square: {tuple(jac.shape)}")
    sign, logabsdet = torch.linalg.slogdet(jac)
    xc = x.clone()
    y = t0(xc)
    ladj = t0.log_abs_det_jacobian(xc, y)
    _close(ladj, logabsdet.to(ladj), "log|det J| vs autograd Jacobian", atol, rtol=1e-6)
    # an uncached evaluation (fresh tensors, nothing remembered) must agree
    _close(t0.log_abs_det_jacobian(x.clone(), y.clone()), ladj, "log|det J| uncached", atol)
    inv_ladj = t0.inv.log_abs_det_jacobian(y, xc)
    _close(inv_ladj, -ladj, "inverse log|det J| = -forward", atol)
    s = getattr(t, "sign", None)
    if isinstance(s, int) and int(sign.item()) != s:
        raise AssertionError(f"sign is {s}, but det J has sign {int(sign.item())}")


def check_batch_shapes(
    t: Transform, batch_shapes: Sequence[tuple[int, ...]] = BATCH_SHAPES, seed: int = 0
) -> None:
    """Output and log-det shapes over several batch shapes; shape maps agree."""
    ev, out = _event_shapes(t)
    if t.domain.event_dim != len(ev) or t.codomain.event_dim != len(out):
        raise AssertionError("domain/codomain event_dim do not match the event shapes")
    gen = torch.Generator().manual_seed(seed)
    dtype = _dtype(t)
    for b in batch_shapes:
        x = torch.randn(b + ev, generator=gen, dtype=torch.float64).to(dtype)
        y = t.with_cache(0)(x)
        if tuple(y.shape) != b + out:
            raise AssertionError(f"batch {b}: output shape {tuple(y.shape)}, expected {b + out}")
        if tuple(t.forward_shape(x.shape)) != b + out or tuple(t.inverse_shape(y.shape)) != b + ev:
            raise AssertionError(f"batch {b}: forward_shape/inverse_shape disagree with the output")
        ladj = t.log_abs_det_jacobian(x, y)
        if tuple(ladj.shape) != b:
            raise AssertionError(f"batch {b}: log-det shape {tuple(ladj.shape)}, expected {b}")
        # each event must be mapped independently of the others in the batch
        if len(b) > 0:
            first = t.with_cache(0)(x[(0,) * len(b)].clone())
            _close(first, y[(0,) * len(b)], f"batch {b}: event 0 alone vs in the batch", 1e-6)


def _dtype(t: Transform) -> torch.dtype:
    if isinstance(t, torch.nn.Module):
        for p in t.parameters():
            return p.dtype
    core = getattr(t, "core", None)
    if isinstance(core, torch.nn.Module):
        for p in core.parameters():
            return p.dtype
    return torch.get_default_dtype()


def check_distribution(t: Transform, x: torch.Tensor, atol: float = 1e-7) -> None:
    """``TransformedDistribution`` scores by the change of variables and samples with the
    right shape."""
    ev, out = _event_shapes(t)
    base = Normal(x.new_zeros(ev), x.new_ones(ev)).to_event(len(ev))
    d = TransformedDistribution(base, [t])
    y = t.with_cache(0)(x).detach()
    lp = d.log_prob(y.clone())
    z = t.with_cache(0).inv(y.clone())
    expected = base.log_prob(z) - t.log_abs_det_jacobian(z, y)
    _close(lp, expected, "TransformedDistribution.log_prob", atol)
    s = d.rsample((4,))
    if tuple(s.shape) != (4,) + out:
        raise AssertionError(f"rsample shape {tuple(s.shape)}, expected {(4,) + out}")
    if not torch.isfinite(d.log_prob(s)).all():
        raise AssertionError("log_prob of rsample is not finite")


def check_serialization(
    owner: Any, factory: Callable[[], Any], x: torch.Tensor, condition: Callable[[Any], Any]
) -> None:
    """state_dict, pickle and deepcopy round trips of ``owner`` (the module), right after
    a forward pass that leaves a tensor with a graph in the cache."""
    if not isinstance(owner, torch.nn.Module):
        return
    with torch.enable_grad():
        t = condition(owner).with_cache(1)
        t(x.clone().requires_grad_())
        owner_t = condition(owner)
        owner_t(x.clone().requires_grad_())
    ref = condition(owner).with_cache(0)(x)
    fresh = factory()
    fresh.load_state_dict(owner.state_dict())
    fresh.train(owner.training)
    _close(condition(fresh).with_cache(0)(x), ref, "state_dict round trip", 1e-10)
    loaded = pickle.loads(pickle.dumps(owner))
    _close(condition(loaded).with_cache(0)(x), ref, "pickle round trip", 1e-10)
    dup = copy.deepcopy(owner)
    _close(condition(dup).with_cache(0)(x), ref, "deepcopy round trip", 1e-10)
    buf = io.BytesIO()
    torch.save(owner, buf)
    buf.seek(0)
    reloaded = torch.load(buf, weights_only=False)
    _close(condition(reloaded).with_cache(0)(x), ref, "torch.save round trip", 1e-10)


def check_gradients(t: Transform, owner: Any, x: torch.Tensor) -> None:
    """Scoring and sampling gradients reach every parameter."""
    if not isinstance(owner, torch.nn.Module) or not any(True for _ in owner.parameters()):
        return
    owner.zero_grad()
    ev, out = _event_shapes(t)
    base = Normal(x.new_zeros(ev), x.new_ones(ev)).to_event(len(ev))
    d = TransformedDistribution(base, [t])
    y = t.with_cache(0)(x).detach()
    loss = -d.log_prob(y).sum() + t(x).pow(2).sum()
    loss.backward()
    missing = [
        n for n, p in owner.named_parameters()
        if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all()
                                or p.grad.abs().sum() == 0)
    ]
    if missing:
        raise AssertionError(f"no (finite, nonzero) gradient reached: {missing}")
    owner.zero_grad()


def check_bad_input(t: Transform, x: torch.Tensor) -> None:
    """A wrong event shape raises ValueError naming the expected shape."""
    ev, out = _event_shapes(t)
    t0 = t.with_cache(0)
    for call, expected in ((t0, ev), (t0.inv, out)):
        bad = torch.cat([x, x], dim=-1)  # last dim doubled: a wrong event shape
        try:
            call(bad)
        except ValueError as e:
            if str(tuple(expected)) not in str(e):
                raise AssertionError(f"ValueError does not name the expected shape: {e}") from e
        else:
            raise AssertionError(f"shape {tuple(bad.shape)} was accepted by {call}")


def check_bijector(
    factory: Callable[[], Any],
    context_dim: int | None = None,
    batch_shapes: Sequence[tuple[int, ...]] = BATCH_SHAPES,
    perturb: float = 0.05,
    atol: float = 1e-7,
    seed: int = 0,
) -> None:
    """Run every check on ``factory()`` in float64, in eval mode after perturbing the
    parameters (and gradients in training mode). For a conditional bijector pass its
    ``context_dim``: the checks run on ``condition(context)`` with one context, and with
    one context per batch row, and two conditioned transforms must coexist."""
    torch.manual_seed(seed)
    owner = factory()
    if isinstance(owner, torch.nn.Module):
        owner = owner.double()
        perturb_parameters(owner, perturb, seed)
        owner.eval()
    gen = torch.Generator().manual_seed(seed + 1)

    if context_dim is None:
        def condition(o: Any) -> Any:
            return o
    else:
        ctx = torch.randn(context_dim, generator=gen, dtype=torch.float64)

        def condition(o: Any) -> Any:
            return o.condition(ctx)

    t = condition(owner)
    if not getattr(t, "bijective", False):
        raise AssertionError("bijective must be True")
    ev, _ = _event_shapes(t)
    x = torch.randn((2,) + ev, generator=gen, dtype=torch.float64)
    check_round_trip(t, x)
    check_log_det(t, x[0], atol=atol)
    check_batch_shapes(t, batch_shapes, seed)
    check_distribution(t, x, atol=atol)
    check_bad_input(t, x)
    check_serialization(owner, lambda: _with_dtype(factory()), x, condition)
    if context_dim is not None:
        _check_contexts(owner, x, context_dim, gen)
    if isinstance(owner, torch.nn.Module):
        owner.train()
        check_gradients(condition(owner), owner, x)
        owner.eval()


def _with_dtype(m: Any) -> Any:
    return m.double() if isinstance(m, torch.nn.Module) else m


def _check_contexts(owner: Any, x: torch.Tensor, context_dim: int, gen: torch.Generator) -> None:
    c1 = torch.randn(context_dim, generator=gen, dtype=torch.float64)
    c2 = torch.randn(context_dim, generator=gen, dtype=torch.float64)
    t1, t2 = owner.condition(c1), owner.condition(c2)
    y1, y2 = t1(x), t2(x)
    _close(t1.inv(y1.clone()), x, "conditioned on context 1, after conditioning on 2", 1e-8)
    _close(t2.inv(y2.clone()), x, "conditioned on context 2", 1e-8)
    if torch.allclose(y1, y2):
        raise AssertionError("the context has no effect on the output")
    # one context per batch row agrees with conditioning row by row
    rows = torch.stack([c1, c2])
    yb = owner.condition(rows)(x)
    _close(yb[0], y1[0], "per-row context, row 0", 1e-8)
    _close(yb[1], y2[1], "per-row context, row 1", 1e-8)
    check_batch_shapes(owner.condition(c1))
    try:
        owner.condition(torch.zeros(context_dim + 1, dtype=x.dtype))
    except ValueError:
        pass
    else:
        raise AssertionError("a context of the wrong size was accepted")
