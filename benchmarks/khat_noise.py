"""How much Pareto k-hat moves from one set of guide draws to the next.

k-hat is itself an estimate: fitted to the largest weights of ``N`` draws, it varies from
seed to seed. This script measures that spread for Gaussian guides of known quality on the
conjugate model of ``tests/test_diagnostics.py`` (mu ~ N(0, 1), five y_i ~ N(mu, 1)),
each guide a Normal with its mean shifted and its sd stretched relative to the exact
posterior, over ``--seeds`` seeds and several ``N``, by the library's own path
(:func:`~pyro_genext.diagnostics.importance_samples`, then
:func:`~pyro_genext.diagnostics.pareto_khat`). It also compares the seed-to-seed spread
with a bootstrap of one seed's weights (``--bootstrap`` resamples), to see whether one set
of draws can estimate its own k-hat noise::

    python benchmarks/khat_noise.py --seeds 100 --bootstrap 200
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, init_to_value

from pyro_genext.diagnostics import importance_samples, pareto_khat

Y = torch.tensor([0.3, 1.2, 0.8, 1.9, 0.4])
POST_VAR = 1.0 / (len(Y) + 1)
POST_MEAN = float(Y.sum()) * POST_VAR

# (shift in posterior sds, stretch of the sd): from a good guide to a poor one
GUIDES = [(0.0, 1.2), (0.5, 0.8), (0.3, 0.6), (0.5, 0.6), (0.3, 0.4)]


def conjugate(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def guide_for(shift, stretch):
    pyro.clear_param_store()
    sd = math.sqrt(POST_VAR)
    init = init_to_value(values={"mu": torch.tensor(POST_MEAN + shift * sd)})
    return AutoDiagonalNormal(conjugate, init_loc_fn=init, init_scale=stretch * sd)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=100)
    p.add_argument("--draws", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    p.add_argument("--bootstrap", type=int, default=200)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    print(f"k-hat over {a.seeds} seeds (conjugate model; guide = exact posterior shifted by "
          "'shift' sds, sd times 'stretch')")
    print("| shift | stretch | N | mean k-hat | sd over seeds | 5%-95% over seeds | "
          f"bootstrap sd (seed 0, {a.bootstrap} resamples) |")
    print("|---|---|---|---|---|---|---|")
    for shift, stretch in GUIDES:
        guide = guide_for(shift, stretch)
        for n in a.draws:
            ks, lw0 = [], None
            for seed in range(a.seeds):
                pyro.set_rng_seed(seed)
                lw = importance_samples(conjugate, guide, Y, num_samples=n).log_weights
                lw0 = lw if lw0 is None else lw0
                ks.append(pareto_khat(lw))
            gen = np.random.default_rng(0)
            lw0n = lw0.double().numpy()
            boot = [pareto_khat(lw0n[gen.integers(0, n, n)]) for _ in range(a.bootstrap)]
            q5, q95 = np.quantile(ks, [0.05, 0.95])
            print(f"| {shift} | {stretch} | {n} | {statistics.mean(ks):.3f} | "
                  f"{statistics.stdev(ks):.3f} | {q5:.2f}-{q95:.2f} | {statistics.stdev(boot):.3f} |",
                  flush=True)
    print(f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
