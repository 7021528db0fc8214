"""Flow posteriors for Bayesian models: swap AutoNormal for AutoRealNVP and check the fit.

Five posteriors that Gaussian guides get wrong in different ways (Neal's funnel, eight
schools in the centered parametrisation, logistic regression on scikit-learn's
breast-cancer data, a banana and a two-mode mixture), each fitted with AutoNormal,
AutoMultivariateNormal, Pyro's AutoIAFNormal and pyro_genext's AutoRealNVP at the same
step budget (each trained by pyro_genext.infer.fit_guide, which may stop early on a
plateau), and sampled with NUTS. Every fit is judged the same way: Pareto k-hat of the
importance weights (pyro_genext.diagnostics.diagnose) and the errors of its posterior
means and standard deviations (unconstrained coordinates: log tau for a scale) against
the exact answer (funnel, banana, mixture; eight schools by quadrature) or NUTS
(logistic regression). ArviZ draws the comparison: pair plots of the
2-D posteriors and a forest plot of the eight schools.

    python tutorials/bayesian_flow_guides.py --out out/          # full (minutes)
    python tutorials/bayesian_flow_guides.py --smoke --json --out out/   # seconds

Writes pairs.png, forest.png, khat.png and (with --json) results.json into --out.

--smoke only checks that the script runs (20 fit steps, 40 NUTS draws, 200 guide draws):
its tables, pictures and results.json are marked as such, and their numbers say nothing
about the guides. docs/tutorials.rst quotes the full run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.distributions.transforms import biject_to  # noqa: E402
from pyro.infer import MCMC, NUTS  # noqa: E402
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal  # noqa: E402
from pyro.ops.stats import split_gelman_rubin  # noqa: E402

from pyro_genext.diagnostics import diagnose, to_inference_data  # noqa: E402
from pyro_genext.infer import AutoRealNVP, fit_guide  # noqa: E402
from pyro_genext.infer.targets import TARGETS, Target  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: E402

GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": lambda m: AutoIAFNormal(m, num_transforms=2),
    "AutoRealNVP": AutoRealNVP,
}
# the 2-D views drawn by az.plot_pair, with the same limits for every method
PAIRS = {"funnel": (["y", "x"], {"x_dim_0": [0]}, (-9, 9), (-30, 30)),
         "banana": (["x1", "x2"], {}, (-7, 7), (-5, 15)),
         "bimodal": (["z"], {}, (-4, 4), (-4, 4))}


def train(target: Target, name: str, steps: int) -> Any:
    """Every guide through the same loop, pyro_genext.infer.fit_guide at its defaults
    (8 vectorised particles, lr 5e-3 decaying to 10 %, gradient clipping, the plateau
    rule): the comparison stays fair, and it is the loop we recommend."""
    pyro.clear_param_store()
    guide = GUIDES[name](target.model)
    fit_guide(target.model, guide, *target.args, num_steps=steps, progress_bar=False)
    return guide


def run_nuts(target: Target, warmup: int, samples: int) -> Any:
    mcmc = MCMC(NUTS(target.model), num_samples=samples, warmup_steps=warmup,
                num_chains=1, disable_progbar=True)
    mcmc.run(*target.args)
    samples = mcmc.get_samples()
    post = {k: v.detach().numpy()[None] for k, v in samples.items()}
    # one chain: split R-hat, comparing its two halves (ArviZ wants two chains or more)
    rhat = max(float(split_gelman_rubin(v.reshape(1, len(v), -1), 0, 1).max()) for v in samples.values())
    return az.from_dict(posterior=post), rhat


def moments(idata: Any, target: Target, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and standard deviations of the unconstrained coordinates (log tau for a
    scale), where the references live."""
    proto = pyro.poutine.trace(target.model).get_trace(*target.args)
    cols = []
    for n in sorted(names):
        v = torch.as_tensor(idata.posterior[n].values).double()
        v = biject_to(proto.nodes[n]["fn"].support).inv(v)
        cols.append(v.reshape(v.shape[0] * v.shape[1], -1))
    x = torch.cat(cols, 1)
    return x.mean(0), x.std(0)


def reference(target: Target, nuts_idata: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    if target.ref_mean:  # exact, or by quadrature (eight schools)
        m = torch.cat([target.ref_mean[k].reshape(-1) for k in sorted(target.ref_mean)]).double()
        s = torch.cat([target.ref_sd[k].reshape(-1) for k in sorted(target.ref_sd)]).double()
        return m, s, "exact"
    m, s = moments(nuts_idata, target, list(nuts_idata.posterior.data_vars))
    return m, s, "NUTS"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny settings, for the test suite")
    p.add_argument("--json", action="store_true", help="also write results.json")
    p.add_argument("--out", type=Path, default=Path("tutorials/out/bayesian_flow_guides"))
    p.add_argument("--steps", type=int, default=None, help="most fit_guide steps per guide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = a.steps or (20 if a.smoke else 4000)
    warmup, samples = (30, 40) if a.smoke else (300, 600)  # (20, 40) got stuck on eight schools
    draws = 200 if a.smoke else 2000
    models = ["funnel", "banana", "bimodal", "eight_schools"] if a.smoke else list(TARGETS)
    a.out.mkdir(parents=True, exist_ok=True)
    notice = (f"SMOKE RUN ({steps} fit steps, {samples} NUTS draws, {draws} guide draws): "
              "it checks that the code runs; its numbers mean nothing about the guides. "
              "Run without --smoke for results." if a.smoke else "")
    if notice:
        print(notice)
    results: dict[str, Any] = {"mode": "smoke" if a.smoke else "full", "steps": steps,
                               "nuts": [warmup, samples], "models": {}}
    if notice:
        results["note"] = notice
    idatas: dict[str, dict[str, Any]] = {}
    for mname in models:
        pyro.set_rng_seed(a.seed)
        target = TARGETS[mname]()
        t0 = time.perf_counter()
        nuts_idata, rhat = run_nuts(target, warmup, samples)
        rows: dict[str, Any] = {"NUTS": {"seconds": time.perf_counter() - t0, "split_rhat_max": rhat}}
        ref_m, ref_s, ref_kind = reference(target, nuts_idata)
        names = sorted(target.ref_mean) if target.ref_mean else sorted(nuts_idata.posterior.data_vars)
        idatas[mname] = {"NUTS": nuts_idata}
        print(f"\n{mname}: reference {ref_kind}; NUTS split R-hat max {rhat:.3f}"
              + ("   [smoke run: meaningless numbers]" if a.smoke else ""))
        for g in GUIDES:
            t0 = time.perf_counter()
            guide = train(target, g, steps)
            seconds = time.perf_counter() - t0
            d = diagnose(target.model, guide, *target.args, num_samples=draws, verbose=False)
            idata = to_inference_data(target.model, guide, *target.args, num_samples=draws)
            m, s = moments(idata, target, names)
            rows[g] = {
                "elbo": d.elbo, "log_evidence": d.log_evidence, "khat": d.khat, "ess": d.ess,
                "mean_err": float(((m - ref_m).abs() / ref_s).mean()),
                "sd_err": float((s / ref_s - 1).abs().mean()), "seconds": seconds,
            }
            if target.neck:
                rows[g]["neck_sd"] = float(idata.posterior[target.neck].std())
            idatas[mname][g] = idata
            r = rows[g]
            print(f"  {g:24s} ELBO {r['elbo']:9.2f}  log Z {r['log_evidence']:9.2f}  "
                  f"k-hat {r['khat']:5.2f}  mean err {r['mean_err']:.3f}  sd err {r['sd_err']:.3f}"
                  + (f"  {target.neck} sd {r['neck_sd']:.2f}" if target.neck else ""))
        results["models"][mname] = rows

    # pair plots of the 2-D posteriors: one row per model, one column per method
    methods = ["NUTS"] + list(GUIDES)
    pair_models = [m for m in PAIRS if m in idatas]
    fig, axes = plt.subplots(len(pair_models), len(methods), figsize=(3 * len(methods), 3 * len(pair_models)),
                             squeeze=False)
    for i, mname in enumerate(pair_models):
        var_names, coords, xlim, ylim = PAIRS[mname]
        for j, meth in enumerate(methods):
            ax = axes[i, j]
            az.plot_pair(idatas[mname][meth], var_names=var_names, coords=coords, ax=ax,
                         scatter_kwargs={"alpha": 0.3, "s": 3})
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_title(f"{mname}: {meth}", fontsize=9)
    if notice:
        fig.suptitle("SMOKE RUN: these pictures mean nothing", color="red")
    fig.tight_layout()
    fig.savefig(a.out / "pairs.png", dpi=80)
    plt.close(fig)

    # forest plot of the eight schools' theta, every method side by side
    sch = idatas["eight_schools"]
    axes = az.plot_forest([sch[m] for m in methods], model_names=methods, var_names=["theta"],
                          combined=True, figsize=(7, 6))
    axes[0].set_title("eight schools (centered): theta" + (" [SMOKE RUN: means nothing]" if notice else ""))
    plt.gcf().savefig(a.out / "forest.png", dpi=80)
    plt.close("all")

    # k-hat per model and guide
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(GUIDES)
    for j, g in enumerate(GUIDES):
        ks = [min(results["models"][m][g]["khat"], 3.0) for m in models]
        ax.bar([i + j * width for i in range(len(models))], ks, width, label=g)
    for level in (0.5, 0.7):
        ax.axhline(level, color="k", lw=0.8, ls="--")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models)
    ax.set_ylabel("Pareto k-hat (clipped at 3)")
    if notice:
        ax.set_title("SMOKE RUN: these k-hats mean nothing", color="red")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out / "khat.png", dpi=80)
    plt.close(fig)

    if a.json:
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {a.out}/pairs.png, forest.png, khat.png")
    if notice:
        print(notice)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
