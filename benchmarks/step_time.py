"""Time per SVI step: AutoRealNVP against AutoIAFNormal at a similar parameter count, on
Pyro's ``SVI.step`` and on the fast training path.

For each model, AutoIAFNormal(num_transforms=2) (Pyro's default widths, 3D+1) is built
first; AutoRealNVP gets one hidden layer whose width h makes its parameter count closest
to that. AutoRealNVP at its defaults (10 couplings, two hidden layers of 32, stl=True) is
compared with an AutoIAFNormal(2) whose hidden width makes *its* count closest to that.

Two ways to take a step:

* ``svi``: ``SVI(model, guide, pyro.optim.Adam(...), elbo).step()``, Pyro's loop, whose
  optimiser wrapper runs one ``torch.optim.Adam`` per parameter tensor;
* ``fast``: Pyro's ``ELBOModule`` (``elbo(model, guide)``, a ``torch.nn.Module`` whose
  forward is the differentiable loss) with a single ``torch.optim.Adam(foreach=True)``
  over all its parameters: ``zero_grad``, ``loss_fn()``, ``backward``, ``step``.

The guides are timed in alternating blocks (so that a change of load on a shared
machine hits all alike) and the median block is reported.

    python benchmarks/step_time.py --blocks 5 --steps 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal

from pyro_genext.infer import AutoRealNVP
from pyro_genext.infer.targets import TARGETS


def _elbo() -> Trace_ELBO:
    return Trace_ELBO(num_particles=4, vectorize_particles=True)


def build(target: Any, make: Any, path: str = "svi") -> tuple[Callable[[], Any], int]:
    """A function taking one step of ``make(target.model)`` on ``path``, after a first
    step that builds the guide's parameters; and the guide's parameter count."""
    pyro.clear_param_store()
    guide = make(target.model)
    if path == "svi":
        svi = SVI(target.model, guide, pyro.optim.Adam({"lr": 1e-3}), _elbo())
        svi.step(*target.args)
        return lambda: svi.step(*target.args), sum(p.numel() for p in guide.parameters())
    loss_fn = _elbo()(target.model, guide)
    loss_fn(*target.args)  # builds the guide's parameters
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-3, foreach=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(*target.args).backward()
        opt.step()

    step()
    return step, sum(p.numel() for p in guide.parameters())


def iaf(h: int | None = None) -> Any:
    return lambda m: AutoIAFNormal(m, num_transforms=2, hidden_dim=None if h is None else [h])


def rnvp(layers: int = 4, h: int | None = None, stl: bool = False) -> Any:
    dims = None if h is None else (h,)
    return lambda m: AutoRealNVP(m, num_layers=layers, hidden_dims=dims, stl=stl)


def closest(target: Any, make: Callable[[int], Any], count: int, lo: int = 4) -> int:
    """The width h (a multiple of 4, >= lo) whose guide's parameter count is closest to
    ``count`` (counts grow with h: bisection)."""
    def n(h: int) -> int:
        return build(target, make(h))[1]

    lo, hi = -(-lo // 4), 1024  # in units of 4
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if n(4 * mid) < count else (lo, mid)
    return min((4 * lo, 4 * hi), key=lambda h: abs(n(h) - count))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="steps per block")
    p.add_argument("--models", nargs="+", default=["funnel", "logistic"], choices=list(TARGETS))
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"{'model':10s} {'guide':36s} {'path':5s} {'params':>7s} "
          f"{'ms/step (median of blocks)':>28s}")
    for name in a.models:
        target = TARGETS[name]()
        pyro.clear_param_store()
        dim = AutoRealNVP(target.model).setup(*target.args).latent_dim
        n_iaf = build(target, iaf())[1]
        n_default = build(target, rnvp())[1]
        h4 = closest(target, lambda h: rnvp(4, h), n_iaf)
        h2 = closest(target, lambda h: rnvp(2, h), n_iaf)
        hi = closest(target, iaf, n_default, lo=dim)  # Pyro's IAF needs a width >= D
        guides = {
            ("AutoIAFNormal(2)", "svi"): iaf(),
            (f"AutoRealNVP(L4, h=({h4},))", "svi"): rnvp(4, h4),
            (f"AutoRealNVP(L4, h=({h4},), stl)", "svi"): rnvp(4, h4, True),
            (f"AutoRealNVP(L2, h=({h2},))", "svi"): rnvp(2, h2),
            (f"AutoIAFNormal(2, h=[{hi}])", "svi"): iaf(hi),
            ("AutoRealNVP() defaults", "svi"): rnvp(),
            ("AutoIAFNormal(2)", "fast"): iaf(),
            (f"AutoRealNVP(L4, h=({h4},))", "fast"): rnvp(4, h4),
            (f"AutoIAFNormal(2, h=[{hi}])", "fast"): iaf(hi),
            ("AutoRealNVP() defaults", "fast"): rnvp(),
        }
        runs = {key: build(target, make, key[1]) for key, make in guides.items()}
        times: dict[tuple[str, str], list[float]] = {key: [] for key in guides}
        for _ in range(a.blocks):
            for key, (step, _) in runs.items():
                pyro.clear_param_store()  # each guide keeps its own parameters
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    step()
                times[key].append(1000 * (time.perf_counter() - t0) / a.steps)
        for (g, path), (_, n) in runs.items():
            t = times[g, path]
            print(f"{name:10s} {g:36s} {path:5s} {n:7d} {statistics.median(t):10.2f}  "
                  f"(blocks {min(t):.2f}-{max(t):.2f})", flush=True)
    print(f"load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
