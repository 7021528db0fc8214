"""How AutoRealNVP's defaults were chosen: a few architectures on Neal's funnel and the
banana at an equal step budget, several seeds.

Both targets have no data, so log p(data) = 0 and KL(q || p) = -ELBO, estimated with
4000 draws. Also reported: the standard deviation of the funnel's neck y (true 3).

    python benchmarks/guide_defaults.py --steps 400 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_genext.infer import AutoRealNVP
from pyro_genext.infer.targets import banana, funnel

CONFIGS = {
    "L4 auto diag s0.1": dict(num_layers=4),
    "L6 auto diag s0.1": dict(num_layers=6),
    "L8 auto diag s0.1": dict(num_layers=8),
    "L6 h(64,64) diag s0.1": dict(num_layers=6, hidden_dims=(64, 64)),
    "L6 auto full s0.1": dict(num_layers=6, affine="full"),
    "L2 auto diag s1": dict(num_layers=2, init_scale=1.0),
    "L4 auto diag s1": dict(num_layers=4, init_scale=1.0),
    "L4 h(64,64) diag s1": dict(num_layers=4, hidden_dims=(64, 64), init_scale=1.0),
    "L4 auto full s1": dict(num_layers=4, affine="full", init_scale=1.0),
    "L4 h(32,) diag s1": dict(num_layers=4, hidden_dims=(32,), init_scale=1.0),
    "L2 h(32,) diag s1": dict(num_layers=2, hidden_dims=(32,), init_scale=1.0),
}


def run(target, config, steps, seed, lr):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoRealNVP(target.model, **config)
    svi = SVI(target.model, guide, pyro.optim.Adam({"lr": lr}),
              Trace_ELBO(num_particles=8, vectorize_particles=True))
    t0 = time.perf_counter()
    for _ in range(steps):
        svi.step(*target.args)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        kl = Trace_ELBO(num_particles=4000, vectorize_particles=True).loss(target.model, guide)
        neck = None
        if target.neck:
            z = guide.get_posterior().sample((4000,))
            neck = float(z[:, 0].std())  # y is the first site of the funnel
    return kl, neck, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--only", nargs="*", default=[], help="run the configs whose name has one of these")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"steps={a.steps} seeds={a.seeds} lr={a.lr} Trace_ELBO(8 particles)")
    print(f"{'config':28s} {'funnel KL':>18s} {'neck sd (3)':>16s} {'banana KL':>18s} {'s/run':>6s}")
    for name, cfg in CONFIGS.items():
        if a.only and not any(o in name for o in a.only):
            continue
        f = [run(funnel(), cfg, a.steps, s, a.lr) for s in a.seeds]
        b = [run(banana(), cfg, a.steps, s, a.lr) for s in a.seeds]
        def ms(v):
            return f"{statistics.mean(v):.3f} ({min(v):.2f}-{max(v):.2f})"
        wall = statistics.mean([r[2] for r in f + b])
        print(f"{name:28s} {ms([r[0] for r in f]):>18s} {ms([r[1] for r in f]):>16s} "
              f"{ms([r[0] for r in b]):>18s} {wall:6.1f}", flush=True)


if __name__ == "__main__":
    main()
