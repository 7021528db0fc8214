"""Flow posteriors against Gaussian guides, Pyro's flows and NUTS, on five models.

For each model of :mod:`pyro_genext.infer.targets` and each guide, at an equal step
budget and several seeds: ELBO, log-evidence (importance sampled), Pareto k-hat, the
errors of posterior means and standard deviations against a reference, the same errors
after PSIS importance resampling ("+IR"), and the time per SVI step. References are exact
where the model allows (funnel, banana, bimodal) and NUTS otherwise (eight schools, from
the non-centered parametrisation; logistic regression), checked with R-hat and cached in
benchmarks/results/posterior_refs.json.

Every guide is trained with ClippedAdam (clip_norm 10), Trace_ELBO with 4 vectorised
particles. A run that fails (NaN or a model validation error) is counted in "fail" and
left out of the averages. Moment errors are averaged over every latent coordinate (constrained values):
``mean err = mean |m - m_ref| / sd_ref`` and ``sd err = mean |sd / sd_ref - 1|``.

    python benchmarks/posteriors.py --steps 400 --seeds 0 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.distributions.transforms import affine_coupling, iterated, spline_coupling
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

from pyro_genext.diagnostics import _log_evidence, _psis, importance_samples
from pyro_genext.infer import AutoNICE, AutoRealNVP
from pyro_genext.infer.targets import TARGETS, Target, eight_schools

REFS = Path(__file__).parent / "results" / "posterior_refs.json"

GUIDES: dict[str, Any] = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": partial(AutoIAFNormal, num_transforms=2),
    "ANF-affine_coupling": lambda m: AutoNormalizingFlow(m, partial(iterated, 4, affine_coupling)),
    "ANF-spline_coupling": lambda m: AutoNormalizingFlow(m, partial(iterated, 2, spline_coupling)),
    "AutoNICE": AutoNICE,
    "AutoRealNVP": AutoRealNVP,
    "AutoRealNVP-stl": partial(AutoRealNVP, stl=True),
    "AutoRealNVP-full": partial(AutoRealNVP, affine="full"),
    # about AutoIAFNormal's parameter count, for the step-time comparison
    "AutoRealNVP-small": partial(AutoRealNVP, hidden_dims=(32,)),
}


def flatten(draws: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(v.shape[0], -1) for _, v in sorted(draws.items())], dim=1)


# ------------------------------------------------------------------ references
def nuts_reference(target: Target, warmup: int, samples: int, chains: int) -> dict[str, Any]:
    model, args = target.model, target.args
    if target.name == "eight_schools":
        model = eight_schools(centered=False).model
    runs = []
    for c in range(chains):
        pyro.set_rng_seed(100 + c)
        mcmc = MCMC(NUTS(model), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*args)
        s = {k: v for k, v in mcmc.get_samples().items()}
        if target.name == "eight_schools":
            s["theta"] = s["mu"][:, None] + s["tau"][:, None] * s.pop("eta")
        runs.append(flatten(s))
    x = torch.stack(runs)  # (chains, samples, D)
    rhat = pyro.ops.stats.split_gelman_rubin(x, chain_dim=0, sample_dim=1)
    flat = x.reshape(-1, x.shape[-1])
    return {"mean": flat.mean(0).tolist(), "sd": flat.std(0).tolist(),
            "rhat_max": float(rhat.max()), "warmup": warmup, "samples": samples, "chains": chains}


def exact_reference(target: Target) -> dict[str, Any]:
    m = flatten({k: v.reshape(1, -1) for k, v in target.mean.items()})[0]
    s = flatten({k: v.reshape(1, -1) for k, v in target.sd.items()})[0]
    return {"mean": m.tolist(), "sd": s.tolist(), "exact": True}


def reference(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    if target.mean:
        return exact_reference(target)
    refs = json.loads(REFS.read_text()) if REFS.exists() else {}
    key = f"{target.name}:{args.nuts_warmup}:{args.nuts_samples}:{args.nuts_chains}"
    if key not in refs:
        t0 = time.perf_counter()
        refs[key] = nuts_reference(target, args.nuts_warmup, args.nuts_samples, args.nuts_chains)
        refs[key]["seconds"] = time.perf_counter() - t0
        REFS.parent.mkdir(exist_ok=True)
        REFS.write_text(json.dumps(refs, indent=1))
    return refs[key]


# ------------------------------------------------------------------ one fit
def fit(target: Target, name: str, steps: int, seed: int, lr: float, ref: dict[str, Any],
        num_samples: int) -> dict[str, Any]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = GUIDES[name](target.model)
    # gradient clipping for every guide alike: without it a single funnel draw with a very
    # negative neck overflows exp(-y) x^2 and turns the parameters into NaN (seen with
    # AutoRealNVP, seed 1, step 343 of 400)
    optim = pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 10.0})
    svi = SVI(target.model, guide, optim, Trace_ELBO(num_particles=4, vectorize_particles=True))
    svi.step(*target.args)  # builds the guide
    nparams = sum(p.numel() for p in pyro.get_param_store().values())
    t0 = time.perf_counter()
    losses = [svi.step(*target.args) for _ in range(steps - 1)]
    step_ms = 1000 * (time.perf_counter() - t0) / max(1, steps - 1)
    s = importance_samples(target.model, guide, *target.args, num_samples=num_samples)
    lw = s.log_weights.double()
    ev = _log_evidence(lw)
    weights, khat = _psis(lw)
    names = sorted(ref_sites(target))
    x = flatten({k: s.draws[k] for k in names}).double()
    m_ref, sd_ref = torch.tensor(ref["mean"]).double(), torch.tensor(ref["sd"]).double()

    def errors(mean: torch.Tensor, sd: torch.Tensor) -> tuple[float, float]:
        return (float(((mean - m_ref).abs() / sd_ref).mean()), float((sd / sd_ref - 1).abs().mean()))

    me, se = errors(x.mean(0), x.std(0))
    w = weights.double()[:, None]
    mw = (w * x).sum(0)
    me_ir, se_ir = errors(mw, ((w * (x - mw) ** 2).sum(0)).sqrt())
    out = {"elbo": float(lw.mean()), "log_evidence": ev.value, "log_evidence_se": ev.stderr,
           "khat": khat, "mean_err": me, "sd_err": se, "mean_err_ir": me_ir, "sd_err_ir": se_ir,
           "step_ms": step_ms, "params": nparams, "finite": all(math.isfinite(v) for v in losses)}
    if target.neck:
        i = names.index(target.neck)
        col = sum(s.draws[k][0].numel() for k in names[:i])
        out["neck_sd"] = float(x[:, col].std())
    return out


def ref_sites(target: Target) -> list[str]:
    if target.mean:
        return list(target.mean)
    return ["mu", "tau", "theta"] if target.name == "eight_schools" else ["b", "w"]


# ------------------------------------------------------------------ table
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--num-samples", type=int, default=2000, help="guide draws per evaluation")
    p.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--nuts-warmup", type=int, default=300)
    p.add_argument("--nuts-samples", type=int, default=500)
    p.add_argument("--nuts-chains", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "models": {}}
    for mname in a.models:
        target = TARGETS[mname]()
        ref = reference(target, a)
        rdesc = "exact" if ref.get("exact") else (
            f"NUTS {ref['chains']}x{ref['samples']} (warmup {ref['warmup']}), "
            f"max R-hat {ref['rhat_max']:.3f}")
        print(f"\n## {mname}  (reference: {rdesc})", flush=True)
        hdr = (f"{'guide':24s} {'ELBO':>8s} {'log Z':>8s} {'k-hat':>6s} {'mean err':>9s} "
               f"{'sd err':>7s} {'+IR mean':>9s} {'+IR sd':>7s} {'neck sd':>8s} {'ms/step':>8s} "
               f"{'params':>7s} {'fail':>4s}")
        print(hdr)
        table: dict[str, Any] = {"reference": ref, "guides": {}}
        for g in a.guides:
            runs, failed = [], 0
            for seed in a.seeds:
                try:
                    runs.append(fit(target, g, a.steps, seed, a.lr, ref, a.num_samples))
                except (ValueError, RuntimeError) as e:  # a diverged fit is a result too
                    failed += 1
                    print(f"  {g} seed {seed} failed: {str(e).splitlines()[0][:120]}", flush=True)
            table["guides"][g] = {"runs": runs, "failed": failed}

            def ms(key: str, fmt: str = ".2f", runs: list[dict[str, Any]] = runs) -> str:
                v = [r[key] for r in runs if key in r]
                if not v:
                    return "-"
                return f"{statistics.mean(v):{fmt}}"

            print(f"{g:24s} {ms('elbo'):>8s} {ms('log_evidence'):>8s} {ms('khat'):>6s} "
                  f"{ms('mean_err', '.3f'):>9s} {ms('sd_err', '.3f'):>7s} {ms('mean_err_ir', '.3f'):>9s} "
                  f"{ms('sd_err_ir', '.3f'):>7s} {ms('neck_sd'):>8s} {ms('step_ms', '.1f'):>8s} "
                  f"{ms('params', '.0f'):>7s} {failed:>4d}", flush=True)
        results["models"][mname] = table
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
