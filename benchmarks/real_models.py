"""What real models need from ``fit_guide`` (issue 24): where the guide starts, coordinates
on very different scales, large data through subsampling, separated modes.

Parts (``--part``):

* ``scales``: two regressions with flat priors on raw scales, ``y ~ normal(b0 + b1 x,
  sigma)``: posteriordb's ``earnings-earn_height`` (earnings in dollars on height in
  inches; reference: posteriordb's 10,000 NUTS draws) and a ``kilpisjarvi``-like one
  (62 simulated summers, ``x`` the year 1952..2013, ``y`` a temperature near 9 degrees
  rising 0.02 a year; reference: 100,000 exact posterior draws). ``AutoRealNVP`` at its
  defaults through ``fit_guide`` with ``init=None`` (the guide's own start; Pyro's
  strategies cannot sample a flat prior, so the guide gets ``init_to_support``, the
  point whose unconstrained coordinates are 0), ``init="map"`` and ``init="laplace"``,
  the last also with ``affine="full"`` (``--configs none map laplace laplace+full``).
  Scores: over the constrained coordinates, the largest ``|mean - ref| / ref sd`` and
  ``|sd / ref sd - 1|``.
* ``subsample``: a logistic regression on ``--rows`` simulated rows (10 coefficients),
  ``AutoRealNVP`` fitted on the full data and with ``pyro.plate(subsample_size=...)``;
  posterior means and sds compared (in units of the full fit's sd), steps run, seconds.
* ``modes``: the two-mode target of :mod:`pyro_genext.infer.targets` with near and far
  modes; ``fit_guide`` at its defaults, with ``temper=...`` and with
  ``objective="iwae"``; the share of guide draws in each mode.

Run (one part at a time; each a few minutes on one thread)::

    python benchmarks/real_models.py --part scales --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
import zipfile
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import biject_to
from torch.distributions import constraints

from pyro_genext.infer import AutoRealNVP, fit_guide
from pyro_genext.infer.init import init_to_support

PDB = Path(__file__).resolve().parents[1] / ".." / "shared" / "posteriordb" / "posterior_database"


def _load_json_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as z:
        return json.loads(z.read(z.namelist()[0]))


def regression(x: torch.Tensor, y: torch.Tensor) -> None:
    """``y ~ normal(beta[0] + beta[1] x, sigma)``, flat priors (Stan's ``earn_height``)."""
    beta = pyro.sample("beta", dist.ImproperUniform(constraints.real, (), (2,)))
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(beta[..., 0] + beta[..., 1] * x, sigma), obs=y)


def exact_regression_draws(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Exact posterior draws of ``(beta0, beta1, sigma)`` under flat priors on ``beta``
    and ``sigma > 0``: ``sigma^2 ~ InvGamma((n - 3) / 2, RSS / 2)``,
    ``beta | sigma ~ N(beta_hat, sigma^2 (X'X)^-1)``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.stack([torch.ones_like(x), x], -1).double()
    yd = y.double()
    xtx = X.T @ X
    bhat = torch.linalg.solve(xtx, X.T @ yd)
    rss = float(((yd - X @ bhat) ** 2).sum())
    shape = (len(x) - 3) / 2
    gam = torch._standard_gamma(torch.full((n,), shape, dtype=torch.float64), generator=g)
    sigma2 = (rss / 2) / gam
    chol = torch.linalg.cholesky(torch.linalg.inv(xtx))
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    beta = bhat + sigma2.sqrt()[:, None] * eps @ chol.T
    return torch.cat([beta, sigma2.sqrt()[:, None]], -1)


def scale_problems() -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``name -> (x, y, reference draws of (beta0, beta1, sigma))``."""
    d = _load_json_zip(PDB / "data" / "data" / "earnings.json.zip")
    ref = _load_json_zip(PDB / "reference_posteriors" / "draws" / "draws" / "earnings-earn_height.json.zip")
    draws = torch.tensor([[c[k] for k in ("beta[1]", "beta[2]", "sigma")] for c in ref],
                         dtype=torch.float64)  # (chains, 3, draws)
    earnings = (torch.tensor(d["height"], dtype=torch.float), torch.tensor(d["earn"], dtype=torch.float),
                draws.permute(0, 2, 1).reshape(-1, 3))
    g = torch.Generator().manual_seed(2024)
    year = torch.arange(1952, 2014, dtype=torch.float)
    temp = 8.6 + 0.02 * (year - 1983) + 1.1 * torch.randn(len(year), generator=g)
    kilpis = (year, temp, exact_regression_draws(year, temp, 100_000, seed=1))
    return {"earnings": earnings, "kilpisjarvi_like": kilpis}


@torch.no_grad()
def guide_draws(guide: Any, n: int) -> torch.Tensor:
    """``n`` draws of every latent site of an ``AutoContinuous`` guide, constrained, as
    columns (Pyro's ``Predictive`` would trace the model, which cannot sample a flat
    prior)."""
    z = guide.get_posterior().sample((n,))
    cols = [biject_to(site["fn"].support)(u).reshape(n, -1) for site, u in guide._unpack_latent(z)]
    return torch.cat(cols, -1).double()


def score(draws: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    m, s = ref.mean(0), ref.std(0)
    mean_err = float(((draws.mean(0) - m).abs() / s).max())
    sd_err = float((draws.std(0) / s - 1).abs().max())
    return mean_err, sd_err


def run_scales(seeds: list[int], steps: int, num_samples: int, configs: list[str],
               problems: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for name, (x, y, ref) in scale_problems().items():
        if problems and name not in problems:
            continue
        for config in configs:
            init, _, affine = config.partition("+")
            init = None if init == "none" else init
            for seed in seeds:
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                guide = AutoRealNVP(regression, init_loc_fn=init_to_support, affine=affine or "diagonal")
                t0 = time.perf_counter()
                try:
                    res = fit_guide(regression, guide, x, y, num_steps=steps, progress_bar=False,
                                    init=init)
                except RuntimeError as e:  # a non-finite loss
                    row = dict(problem=name, init=config, seed=seed, failed=str(e))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    continue
                seconds = time.perf_counter() - t0
                draws = guide_draws(guide, num_samples)
                mean_err, sd_err = score(draws, ref)
                row = dict(problem=name, init=config, seed=seed, steps=res.num_steps,
                           mean_err=mean_err, sd_err=sd_err, seconds=seconds,
                           final_loss=sum(res.losses[-100:]) / len(res.losses[-100:]))
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def logistic(x: torch.Tensor, y: torch.Tensor, subsample_size: int | None = None) -> None:
    """Logistic regression, ``beta ~ N(0, 1)``, the rows subsampled by the plate if
    ``subsample_size`` is given (the log-likelihood scaled by ``N / subsample_size``)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as idx:
        logits = (x[idx] * beta).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[idx])


def simulated_logistic(rows: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    beta = torch.linspace(-1.0, 1.0, dim)
    y = torch.bernoulli(torch.sigmoid(x @ beta), generator=g)
    return x, y


def run_subsample(seeds: list[int], steps: int, num_samples: int, rows: int, batch: int,
                  configs: list[str]) -> list[dict[str, Any]]:
    from pyro_genext.infer.init import laplace, precondition

    x, y = simulated_logistic(rows, 10)
    out: list[dict[str, Any]] = []
    fits: dict[str, torch.Tensor] = {}
    for config in configs:
        data, *flags = config.split("+")
        size = None if data == "full" else batch
        for seed in seeds:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            guide = AutoRealNVP(logistic)
            t0 = time.perf_counter()
            if "laplace" in flags:  # the Laplace fit on the full data, then the (subsampled) fit
                precondition(guide, laplace(logistic, x, y), logistic, x, y, subsample_size=size)
            res = fit_guide(logistic, guide, x, y, subsample_size=size, num_steps=steps, progress_bar=False,
                            stop_on_plateau="nostop" not in flags)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                z = guide.get_posterior().sample((num_samples,)).double()
            if not fits:  # the first config's first seed: the reference
                fits["ref"] = z
            ref = fits["ref"]
            m, sd = ref.mean(0), ref.std(0)
            row = dict(config=config, seed=seed, rows=rows, batch=size, steps=res.num_steps,
                       stopped_early=res.stopped_early, seconds=seconds,
                       mean_err=float(((z.mean(0) - m).abs() / sd).max()),
                       sd_err=float((z.std(0) / sd - 1).abs().max()))
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def run_modes(seeds: list[int], steps: int, num_samples: int, offsets: list[float],
              names: list[str]) -> list[dict[str, Any]]:
    from pyro_genext.infer.targets import bimodal

    configs = {"default": {}, "temper": {"temper": steps // 2},
               "iwae": {"objective": "iwae", "stop_on_plateau": False}}
    rows = []
    for offset in offsets:
        target = bimodal(offset=offset)
        for config in names:
            options = configs[config]
            for seed in seeds:
                pyro.clear_param_store()
                pyro.set_rng_seed(seed)
                guide = AutoRealNVP(target.model)
                t0 = time.perf_counter()
                res = fit_guide(target.model, guide, num_steps=steps, progress_bar=False, **options)
                seconds = time.perf_counter() - t0
                with torch.no_grad():
                    z = guide.get_posterior().sample((num_samples,))
                # modes at +-(o, o) with sd 0.7: the separation in mode sds is 2 sqrt(2) o / 0.7
                row = dict(offset=offset, separation_sds=2 * math.sqrt(2) * offset / 0.7, config=config,
                           seed=seed, steps=res.num_steps, mode_weight=float((z.sum(-1) > 0).float().mean()),
                           seconds=seconds)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


CONFIGS = ["none", "map", "laplace", "laplace+full"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["scales", "subsample", "modes"], required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--num-samples", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--configs", nargs="+", default=CONFIGS,
                    help="scales: fit_guide's init, '+full' for affine='full'; modes: default, "
                    "temper, iwae; subsample: "
                    "full, sub, each with +laplace and/or +nostop (no plateau rule); the first: reference")
    ap.add_argument("--problems", nargs="+", default=None, help="scales: earnings, kilpisjarvi_like")
    ap.add_argument("--batch", type=int, default=1000, help="subsample: rows per step")
    ap.add_argument("--offsets", type=float, nargs="+", default=[1.5, 2.97],
                    help="modes: the two-mode target's offsets (1.5: 6 mode sds apart, 2.97: 12)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = {"scales": lambda: run_scales(a.seeds, a.steps, a.num_samples, a.configs, a.problems),
            "modes": lambda: run_modes(a.seeds, a.steps, a.num_samples, a.offsets,
                                       a.configs if a.configs != CONFIGS else ["default", "temper", "iwae"]),
            "subsample": lambda: run_subsample(a.seeds, a.steps, a.num_samples, a.rows, a.batch,
                                               a.configs)}[a.part]()
    if a.json is not None:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
