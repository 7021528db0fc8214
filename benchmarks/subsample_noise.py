"""Where a subsampled fit's error comes from (issue 24): a logistic regression on
``--rows`` simulated rows (10 standard normal predictors, coefficients evenly spaced in
[-1, 1], prior ``N(0, 1)``), ``AutoRealNVP`` preconditioned with the full data's Laplace
approximation, then ``fit_guide`` with ``pyro.plate(subsample_size=--batch)`` under each
``--configs`` entry (a JSON object of ``fit_guide`` options), seeds 0 and 1. The reference
is that Laplace approximation (at thousands of rows a logistic regression's posterior is
close to Gaussian; the guide starts there, so a fit that stays put scores about 0.015,
the Monte Carlo error of 20,000 draws). Errors: the largest over the coefficients of
|mean - mode| / sd and |sd / sd_laplace - 1|.

    python benchmarks/subsample_noise.py --rows 20000 --batch 200 \\
        --configs '{}' '{"lr": 0.0005}' '{"lr": 0.0002}' '{"stop_on_plateau": false}'
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import pyro.distributions as dist
import torch

from pyro_genext.infer import AutoRealNVP, fit_guide
from pyro_genext.infer.init import laplace, precondition


def logistic(x: torch.Tensor, y: torch.Tensor, subsample_size: int | None = None) -> None:
    beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        pyro.sample("y", dist.Bernoulli(logits=(x[idx] * beta).sum(-1)), obs=y[idx])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--configs", nargs="+", default=["{}"], help="JSON objects of fit_guide options")
    a = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, 10, generator=g)
    y = torch.bernoulli(torch.sigmoid(x @ torch.linspace(-1, 1, 10)), generator=g)
    fit = laplace(logistic, x, y)
    m, sd = fit.loc.double(), fit.scale.double()
    for config in a.configs:
        options = json.loads(config)
        for seed in a.seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            guide = precondition(AutoRealNVP(logistic), fit, logistic, x, y, subsample_size=a.batch)
            t0 = time.perf_counter()
            res = fit_guide(logistic, guide, x, y, subsample_size=a.batch, progress_bar=False, **options)
            with torch.no_grad():
                z = guide.get_posterior().sample((20000,)).double()
            print(json.dumps({"config": options, "seed": seed, "rows": a.rows, "batch": a.batch,
                              "steps": res.num_steps, "seconds": round(time.perf_counter() - t0, 1),
                              "mean_err": round(float(((z.mean(0) - m).abs() / sd).max()), 3),
                              "sd_err": round(float((z.std(0) / sd - 1).abs().max()), 3)}), flush=True)


if __name__ == "__main__":
    main()
