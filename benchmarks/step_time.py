"""Time per SVI step: AutoRealNVP against AutoIAFNormal at a similar parameter count.

For each model, AutoIAFNormal(num_transforms=2) (Pyro's default widths, 3D+1) is built
first; AutoRealNVP gets one hidden layer whose width h makes its parameter count closest
to that. The guides are timed in alternating blocks (so that a change of load on a shared
machine hits both alike) and the median block is reported.

    python benchmarks/step_time.py --blocks 5 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal

from pyro_genext.infer import AutoRealNVP
from pyro_genext.infer.targets import TARGETS


def build(target: Any, make: Any) -> tuple[SVI, int]:
    pyro.clear_param_store()
    guide = make(target.model)
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": 1e-3}),
              Trace_ELBO(num_particles=4, vectorize_particles=True))
    svi.step(*target.args)
    return svi, sum(p.numel() for p in guide.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--steps", type=int, default=40, help="steps per block")
    p.add_argument("--models", nargs="+", default=["funnel", "logistic"], choices=list(TARGETS))
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':10s} {'guide':32s} {'params':>7s} {'ms/step (median of blocks)':>28s}")
    for name in a.models:
        target = TARGETS[name]()
        iaf = lambda m: AutoIAFNormal(m, num_transforms=2)  # noqa: E731
        _, n_iaf = build(target, iaf)
        def rnvp(layers: int, h: int, stl: bool = False) -> Any:
            return lambda m: AutoRealNVP(m, num_layers=layers, hidden_dims=(h,), stl=stl)

        def match(layers: int, target: Any = target, n_iaf: int = n_iaf) -> int:
            return min(range(4, 513, 4), key=lambda h: abs(build(target, rnvp(layers, h))[1] - n_iaf))

        h4, h2 = match(4), match(2)
        guides = {
            "AutoIAFNormal(2)": iaf,
            f"AutoRealNVP(L4, h=({h4},))": rnvp(4, h4),
            f"AutoRealNVP(L4, h=({h4},), stl)": rnvp(4, h4, True),
            f"AutoRealNVP(L2, h=({h2},))": rnvp(2, h2),
        }
        svis = {g: build(target, make) for g, make in guides.items()}
        times: dict[str, list[float]] = {g: [] for g in guides}
        for _ in range(a.blocks):
            for g, (svi, _) in svis.items():
                pyro.clear_param_store()  # each SVI keeps its own guide's parameters
                t0 = time.perf_counter()
                for _ in range(a.steps):
                    svi.step(*target.args)
                times[g].append(1000 * (time.perf_counter() - t0) / a.steps)
        for g, (_, n) in svis.items():
            t = times[g]
            print(f"{name:10s} {g:32s} {n:7d} {statistics.median(t):10.2f}  "
                  f"(blocks {min(t):.1f}-{max(t):.1f})", flush=True)


if __name__ == "__main__":
    main()
