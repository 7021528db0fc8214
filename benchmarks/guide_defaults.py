"""How AutoRealNVP's defaults were chosen, and what fit_guide's step costs.

``screen``: the candidate settings of issue 15 (couplings near the identity, sticking the
landing, 10 x 2 couplings of width 32, the hand-built RealNVP of Pyro's couplings) on the
five tuning targets, by ``benchmarks/posteriors.py`` (same scores, same JSON)::

    python benchmarks/guide_defaults.py screen --steps 2000 --seeds 0 \\
        --json benchmarks/results/screen_2000steps.json

``step-time``: one training step of ``AutoRealNVP(stl=True)`` by ``SVI.step`` with Pyro's
``ClippedAdam`` (one optimiser per parameter tensor) against
:func:`pyro_genext.infer.fit_guide` (one ``Adam(foreach=True)``, global-norm clipping),
same ELBO (8 vectorised particles), in alternating blocks so that a change of load hits
both alike; median over blocks::

    python benchmarks/guide_defaults.py step-time --blocks 7 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

sys.path.insert(0, str(Path(__file__).parent))
import posteriors  # noqa: E402

from pyro_genext.infer import AutoRealNVP, fit_guide  # noqa: E402
from pyro_genext.infer.targets import TARGETS  # noqa: E402

CANDIDATES = [
    "AutoRealNVP:stl=0,init_coupling_scale=0",  # the defaults before issue 15
    "RealNVP-hand",
    "AutoRealNVP:stl=0,init_coupling_scale=0.01",
    "AutoRealNVP:stl=1,init_coupling_scale=0",
    "AutoRealNVP:stl=1,init_coupling_scale=0.01",
    "AutoRealNVP:stl=1,num_layers=10,hidden_dims=32/32",
]


def step_time(blocks: int, steps: int) -> None:
    print(f"{'target':10s} {'params':>7s} {'tensors':>7s} {'SVI.step ms':>12s} {'fit_guide ms':>13s}")
    for name in ("funnel", "logistic"):
        t = TARGETS[name]()
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoRealNVP(t.model, stl=True)
        elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)
        svi = SVI(t.model, guide, pyro.optim.ClippedAdam({"lr": 5e-3, "clip_norm": 10.0}), elbo)
        svi.step(*t.args)
        times: dict[str, list[float]] = {"svi": [], "fit": []}
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(steps):
                svi.step(*t.args)
            times["svi"].append((time.perf_counter() - t0) / steps)
            t0 = time.perf_counter()
            fit_guide(t.model, guide, *t.args, num_steps=steps, stop_on_plateau=False, progress_bar=False)
            times["fit"].append((time.perf_counter() - t0) / steps)
        params = list(guide.parameters())
        print(f"{name:10s} {sum(p.numel() for p in params):7d} {len(params):7d} "
              f"{1000 * statistics.median(times['svi']):12.1f} {1000 * statistics.median(times['fit']):13.1f}"
              f"   (blocks: svi {min(times['svi']) * 1000:.1f}-{max(times['svi']) * 1000:.1f}, "
              f"fit {min(times['fit']) * 1000:.1f}-{max(times['fit']) * 1000:.1f})", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("screen")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--seeds", type=int, nargs="+", default=[0])
    s.add_argument("--json", type=Path, required=True)
    s.add_argument("--guides", nargs="+", default=CANDIDATES)
    t = sub.add_parser("step-time")
    t.add_argument("--blocks", type=int, default=7)
    t.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.what == "step-time":
        step_time(a.blocks, a.steps)
        return 0
    return posteriors.main(["--models", *TARGETS, "--guides", *a.guides, "--loops", "svi",
                            "--steps", str(a.steps), "--seeds", *map(str, a.seeds),
                            "--num-samples", "5000", "--nuts-warmup", "300", "--nuts-samples", "500",
                            "--json", str(a.json)])


if __name__ == "__main__":
    sys.exit(main())
