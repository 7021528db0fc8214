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
* a wrong event shape raises ``ValueError`` before any computation (pyro_genext's own
  bijectors; skipped for other transforms, which need not follow that convention);
* the log-det **per event under a batch** against each event's own autograd Jacobian (a
  transform that returns, say, the batch mean of its log-dets fails it);
* ``torch.inference_mode()``: sampling, scoring and the round trip give the same values;
* the cache (``"cache"``): under ``torch.func.functional_call`` two parameter sets give
  their own outputs; an output changed in place is not answered from the cache; a copy
  made right after a call computes afresh; sampling then scoring, and scoring, run each
  network once (counted with forward hooks).

It works on any torch ``Transform`` given the shape of one input event
(``event_shape=...``), Pyro's own included; ``skip`` names checks to leave out. Pyro's
``affine_coupling`` and ``spline_coupling`` fail the ``"cache"`` check (torch's cache is
keyed on the input tensor alone) and pass the others.

Each check raises ``AssertionError`` with a message naming the check.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
    "check_log_det_per_event",
    "check_inference_mode",
    "check_cache",
    "perturb_parameters",
    "CHECKS",
]

#: The names of the checks :func:`check_bijector` runs (and ``skip`` may name).
CHECKS = ("round_trip", "log_det", "batch_shapes", "distribution", "bad_input",
          "serialization", "gradients", "inference_mode", "cache")

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
    ev = getattr(t, "event_shape", None)
    if ev is None:
        ev = getattr(t, "_check_event_shape", None)
    if ev is None:
        raise AssertionError(
            f"{type(t).__name__} has no event_shape: pass check_bijector(..., event_shape=...)"
        )
    ev = tuple(ev)
    out = getattr(t, "codomain_event_shape", None)
    if out is None:
        try:
            out = tuple(t.forward_shape(ev))
        except Exception:
            out = ev
    return ev, tuple(out)


class _Uncached(Transform):
    """A transform's own maps with nothing remembered, for transforms whose
    ``with_cache(0)`` is not implemented (torch's default for subclasses)."""

    bijective = True

    def __init__(self, t: Transform) -> None:
        super().__init__(cache_size=0)
        self.t = t
        self.domain, self.codomain = t.domain, t.codomain  # type: ignore[misc]

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.t._call(x)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return self.t._inverse(y)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.t.log_abs_det_jacobian(x.clone(), y.clone())

    def with_cache(self, cache_size: int = 1) -> Transform:
        return self if cache_size == 0 else self.t.with_cache(cache_size)


def _uncached(t: Transform) -> Transform:
    try:
        return t.with_cache(0)
    except NotImplementedError:
        return _Uncached(t)


def _cached(t: Transform) -> Transform | None:
    try:
        c = t.with_cache(1)
    except NotImplementedError:
        return None
    return c if c._cache_size == 1 else None


def check_round_trip(t: Transform, x: torch.Tensor, atol: float = 1e-8) -> None:
    """Uncached and cached round trips in both directions."""
    uncached = _uncached(t)
    y = uncached(x)
    _close(uncached.inv(y.clone()), x, "round trip inv(f(x)) uncached", atol)
    _close(uncached._inverse(y.clone()), x, "round trip _inverse(f(x))", atol)
    x2 = uncached.inv(y.clone())
    _close(uncached(x2.clone()), y, "round trip f(inv(y)) uncached", atol * 10)
    cached = _cached(t)
    if cached is None:
        return
    if isinstance(t, torch.nn.Module) and isinstance(cached, torch.nn.Module):
        if any(a is not b for a, b in zip(t.parameters(), cached.parameters())):
            raise AssertionError("with_cache(1) must share the parameters of the original")
    yc = cached(x)
    if cached.inv(yc) is not x:
        raise AssertionError("cached inverse of f(x) must return x itself")
    _close(cached.inv(yc.clone()), x, "round trip with cache_size=1 but a cloned y", atol)


def check_log_det(t: Transform, x: torch.Tensor, atol: float = 1e-7) -> None:
    """log|det J| of one event against the autograd Jacobian (float64 recommended)."""
    ev, out = _event_shapes(t)
    t0 = _uncached(t)

    def flat(v: torch.Tensor) -> torch.Tensor:
        return t0(v.reshape(ev)).reshape(-1)

    jac = torch.autograd.functional.jacobian(flat, x.reshape(-1).clone(), vectorize=True)
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
    try:
        s = t.sign
    except NotImplementedError:
        s = None
    if isinstance(s, int) and int(sign.item()) != s:
        raise AssertionError(f"sign is {s}, but det J has sign {int(sign.item())}")


def check_log_det_per_event(t: Transform, x: torch.Tensor, atol: float = 1e-7) -> None:
    """The log-det of a batch, event by event, against each event's autograd Jacobian:
    a log-det that mixes events (a batch mean, a sum over the batch) fails here even
    where a single event would pass."""
    ev, out = _event_shapes(t)
    t0 = _uncached(t)
    xb = x.clone()
    ladj = t0.log_abs_det_jacobian(xb, t0(xb))
    if tuple(ladj.shape) != tuple(x.shape[: x.dim() - len(ev)]):
        raise AssertionError(f"log-det per event: shape {tuple(ladj.shape)} for a batch "
                             f"{tuple(x.shape[: x.dim() - len(ev)])}")
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v: t0(v.reshape(ev)).reshape(-1), x[i].reshape(-1).clone(), vectorize=True
        )
        _close(ladj[i], torch.linalg.slogdet(jac)[1].to(ladj),
               f"log|det J| of event {i} in a batch vs its autograd Jacobian", atol)


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
        y = _uncached(t)(x)
        if tuple(y.shape) != b + out:
            raise AssertionError(f"batch {b}: output shape {tuple(y.shape)}, expected {b + out}")
        if tuple(t.forward_shape(x.shape)) != b + out or tuple(t.inverse_shape(y.shape)) != b + ev:
            raise AssertionError(f"batch {b}: forward_shape/inverse_shape disagree with the output")
        ladj = t.log_abs_det_jacobian(x, y)
        if tuple(ladj.shape) != b:
            raise AssertionError(f"batch {b}: log-det shape {tuple(ladj.shape)}, expected {b}")
        # each event must be mapped independently of the others in the batch
        if len(b) > 0:
            first = _uncached(t)(x[(0,) * len(b)].clone())
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
    y = _uncached(t)(x).detach()
    lp = d.log_prob(y.clone())
    z = _uncached(t).inv(y.clone())
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
        t = _cached(condition(owner)) or condition(owner)
        t(x.clone().requires_grad_())
        owner_t = condition(owner)
        owner_t(x.clone().requires_grad_())
    ref = _uncached(condition(owner))(x)
    fresh = factory()
    fresh.load_state_dict(owner.state_dict())
    fresh.train(owner.training)
    _close(_uncached(condition(fresh))(x), ref, "state_dict round trip", 1e-10)
    loaded = pickle.loads(pickle.dumps(owner))
    _close(_uncached(condition(loaded))(x), ref, "pickle round trip", 1e-10)
    dup = copy.deepcopy(owner)
    _close(_uncached(condition(dup))(x), ref, "deepcopy round trip", 1e-10)
    buf = io.BytesIO()
    torch.save(owner, buf)
    buf.seek(0)
    reloaded = torch.load(buf, weights_only=False)
    _close(_uncached(condition(reloaded))(x), ref, "torch.save round trip", 1e-10)


def check_gradients(t: Transform, owner: Any, x: torch.Tensor) -> None:
    """Gradients reach every parameter: scoring in training mode, sampling in eval mode
    (where every bijector may sample; see :class:`~pyro_genext.transforms.BatchNormFlow`)."""
    if not isinstance(owner, torch.nn.Module) or not any(True for _ in owner.parameters()):
        return
    owner.zero_grad()
    ev, out = _event_shapes(t)
    base = Normal(x.new_zeros(ev), x.new_ones(ev)).to_event(len(ev))
    d = TransformedDistribution(base, [t])
    was = owner.training
    owner.eval()
    y = _uncached(t)(x).detach()
    sample_loss = t(x).pow(2).sum()
    owner.train(was)
    loss = -d.log_prob(y).sum() + sample_loss
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
    t0 = _uncached(t)
    for call, expected in ((t0, ev), (t0.inv, out)):
        bad = torch.cat([x, x], dim=-1)  # last dim doubled: a wrong event shape
        try:
            call(bad)
        except ValueError as e:
            if str(tuple(expected)) not in str(e):
                raise AssertionError(f"ValueError does not name the expected shape: {e}") from e
        else:
            raise AssertionError(f"shape {tuple(bad.shape)} was accepted by {call}")


def check_inference_mode(t: Transform, x: torch.Tensor, atol: float = 1e-8) -> None:
    """Sampling, scoring and the round trip work under ``torch.inference_mode()`` on
    tensors made there, and give the values they give outside it."""
    ev, out = _event_shapes(t)
    base = Normal(x.new_zeros(ev), x.new_ones(ev)).to_event(len(ev))
    with torch.no_grad():
        y_ref = _uncached(t)(x.clone())
        lp_ref = TransformedDistribution(base, [t]).log_prob(y_ref.clone())
    with torch.inference_mode():
        xi = x.clone()
        y = t(xi)
        back = t.inv(y)
        lp = TransformedDistribution(base, [t]).log_prob(y.clone())
        s = TransformedDistribution(base, [t]).sample((2,))
        lps = TransformedDistribution(base, [t]).log_prob(s)
    _close(y, y_ref, "inference mode: forward", atol)
    _close(back, x, "inference mode: round trip", atol)
    _close(lp, lp_ref, "inference mode: log_prob", atol)
    if not torch.isfinite(lps).all():
        raise AssertionError("inference mode: log_prob of a sample is not finite")


def _leaf_modules(owner: Any) -> list[torch.nn.Module]:
    if not isinstance(owner, torch.nn.Module):
        return []
    return [m for m in owner.modules()
            if not any(True for _ in m.children()) and any(True for _ in m.parameters(False))]


@contextmanager
def _counting(owner: Any) -> Iterator[list[int]]:
    """Counts forward calls of the modules that hold parameters (the networks' layers)."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1

    handles = [m.register_forward_hook(hook) for m in _leaf_modules(owner)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def check_cache(t: Transform, owner: Any, x: torch.Tensor, atol: float = 1e-8) -> None:
    """The cache never answers for a tensor it did not produce, nor for one changed since,
    and saves every second network pass when sampling then scoring."""
    cached = _cached(t)
    if cached is None:
        return
    uncached = _uncached(t)
    ev, out = _event_shapes(t)
    with torch.no_grad():
        # an output changed in place is recomputed, not answered with the old input
        y = cached(x.clone())
        y.add_(0.25)
        _close(cached.inv(y), uncached.inv(y.clone()), "cache: inv of an output changed in place",
               atol)
        # a copy made right after a call computes afresh
        y = cached(x)
        dup = copy.deepcopy(cached)
        back = dup.inv(y)
        if back is x:
            raise AssertionError("cache: a deep copy answered from the original's cache")
        _close(back, x, "cache: round trip in a copy made right after a call", atol)
    # two parameter sets under torch.func.functional_call, both at version 0
    if isinstance(cached, torch.nn.Module) and any(True for _ in cached.parameters()):
        gen = torch.Generator().manual_seed(7)
        sets = [{n: (p + 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))
                 .detach() for n, p in cached.named_parameters()} for _ in range(2)]
        with torch.no_grad():
            outs = [torch.func.functional_call(cached, ps, (x,)) for ps in sets]
            for k, ps in enumerate(sets):
                ref: Any = copy.deepcopy(uncached)
                ref.load_state_dict(ps, strict=False)
                _close(outs[k], ref(x.clone()),
                       f"cache: torch.func.functional_call with parameter set {k}", atol)
        if torch.allclose(outs[0], outs[1]):
            raise AssertionError("cache: two parameter sets gave the same output")
    # one network pass for sample-then-score and for scoring
    if _leaf_modules(owner):
        base = Normal(x.new_zeros(ev), x.new_ones(ev)).to_event(len(ev))
        with _counting(owner) as calls:
            cached(x.clone())
        one_pass = calls[0]
        d = TransformedDistribution(base, [cached])
        with _counting(owner) as calls:
            s = d.rsample((3,))
            d.log_prob(s)
        if calls[0] != one_pass:
            raise AssertionError(f"cache: rsample then log_prob ran {calls[0]} network calls, "
                                 f"one pass is {one_pass}")
        with _counting(owner) as calls:
            d.log_prob(s.detach().clone())
        if calls[0] != one_pass:
            raise AssertionError(f"cache: log_prob of data ran {calls[0]} network calls, "
                                 f"one pass is {one_pass}")


def check_bijector(
    factory: Callable[[], Any],
    context_dim: int | None = None,
    batch_shapes: Sequence[tuple[int, ...]] = BATCH_SHAPES,
    perturb: float = 0.05,
    atol: float = 1e-7,
    seed: int = 0,
    *,
    event_shape: Sequence[int] | None = None,
    skip: Sequence[str] = (),
) -> None:
    """Run every check on ``factory()`` in float64, in eval mode after perturbing the
    parameters (and gradients in training mode). For a conditional bijector pass its
    ``context_dim``: the checks run on ``condition(context)`` with one context, and with
    one context per batch row, and two conditioned transforms must coexist.

    ``event_shape``: the shape of one input event, for transforms that do not say it
    (any torch ``Transform``, e.g. Pyro's ``affine_coupling(4)``: ``event_shape=(4,)``).
    ``skip``: names from :data:`CHECKS` to leave out.
    """
    unknown = set(skip) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; expected names from {CHECKS}")
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
    if event_shape is not None:
        given = tuple(int(s) for s in event_shape)
        if getattr(t, "event_shape", given) != given:
            raise ValueError(f"event_shape={given} but the transform says {t.event_shape}")
        if getattr(t, "event_shape", None) is None:
            t._check_event_shape = given
    if not getattr(t, "bijective", False):
        raise AssertionError("bijective must be True")
    ev, _ = _event_shapes(t)
    x = torch.randn((3,) + ev, generator=gen, dtype=torch.float64)
    ours = isinstance(t, _flow_transform())
    steps: list[tuple[str, Callable[[], None]]] = [
        ("round_trip", lambda: check_round_trip(t, x)),
        ("log_det", lambda: check_log_det(t, x[0], atol=atol)),
        ("log_det", lambda: check_log_det_per_event(t, x, atol=atol)),
        ("batch_shapes", lambda: check_batch_shapes(t, batch_shapes, seed)),
        ("distribution", lambda: check_distribution(t, x, atol=atol)),
        ("bad_input", lambda: check_bad_input(t, x) if ours else None),
        ("serialization",
         lambda: check_serialization(owner, lambda: _with_dtype(factory()), x, condition)),
        ("inference_mode", lambda: check_inference_mode(t, x)),
        ("cache", lambda: check_cache(t, owner, x)),
    ]
    if context_dim is not None:
        steps.append(("contexts", lambda: _check_contexts(owner, x[:2], context_dim, gen)))
    if isinstance(owner, torch.nn.Module):
        def gradients() -> None:
            owner.train()
            try:
                check_gradients(condition(owner), owner, x)
            finally:
                owner.eval()
        steps.append(("gradients", gradients))
    for name, run in steps:
        if name in skip:
            continue
        try:
            run()
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from e
        except Exception as e:  # a crash is a failed check too, named as such
            raise AssertionError(f"{name}: {type(e).__name__}: {e}") from e


def _flow_transform() -> type:
    from .transforms.base import FlowTransform

    return FlowTransform


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
