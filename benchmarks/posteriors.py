"""Flow guides against Gaussian guides and Pyro's flows on eight posteriors, trained by
two loops.

Targets: the five tuning targets of :mod:`pyro_genext.infer.targets` (``TARGETS``, on
which the defaults were chosen) and the held-out ones (``HELD_OUT``). Loops:

* ``svi``: the plain loop a Pyro user already has (issue 15): ``SVI`` with
  ``Trace_ELBO(num_particles=8, vectorize_particles=True)`` and ``ClippedAdam`` (lr 5e-3,
  clip_norm 10, the learning rate decaying exponentially to 10 % by the last step);
* ``fit``: :func:`pyro_genext.infer.fit_guide` at its defaults (the same particles, step
  size, decay and clipping; one optimiser over all parameters; it may stop early on a
  plateau, and then reports how many steps it ran); ``fit-iwae``: the same with the
  importance-weighted bound, :math:`K = 10`, every step run.

Scores, from ``--num-samples`` guide draws: ``elbo`` (mean log weight), ``iw_elbo``
(:math:`\\log \\frac1N \\sum w_n`, the importance-weighted bound with :math:`K = N`),
Pareto ``khat``, and ``mean_err`` / ``sd_err``: the mean over every **unconstrained**
latent coordinate of :math:`|m - m_{ref}| / sd_{ref}` and :math:`|sd / sd_{ref} - 1|`;
``neck_sd`` (the funnel's ``y``, exactly 3; ``log tau`` of the hierarchical models) and
``mode_weight`` (the share of draws in the mode ``z_1 + z_2 > 0`` of the two-mode
target, 0.5 exactly); the same with the suffix ``_ir`` for the draws weighted by their
PSIS-smoothed importance weights (importance-weighted sampling of the final draws).
References: exact or by quadrature where :mod:`~pyro_genext.infer.targets` has them
(``Target.ref_mean``), else NUTS, checked with split R-hat and cached in
``benchmarks/results/posterior_refs.json``.

Guides are named ``Name`` or ``Name:key=value,key=value`` (keyword arguments of the
guide, e.g. ``AutoRealNVP:stl=1,init_coupling_scale=0.01,hidden_dims=32/32``). Each
finished run is appended to the ``--json`` file at once; runs already there are
skipped, so a killed sweep resumes::

    python benchmarks/posteriors.py --models banana bimodal --guides AutoRealNVP \\
        RealNVP-hand --loops svi fit --steps 4000 --seeds 0 1 2 --json out.json
    python benchmarks/posteriors.py --table out.json     # the tables of a sweep
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
from pyro.distributions.transforms import Permute, affine_coupling, biject_to
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.poutine.util import site_is_subsample

from pyro_genext.diagnostics import _log_evidence, _psis, importance_samples
from pyro_genext.infer import AutoNICE, AutoRealNVP, fit_guide
from pyro_genext.infer.targets import HELD_OUT, TARGETS, Target, eight_schools, horseshoe
from pyro_genext.transforms import Affine

REFS = Path(__file__).parent / "results" / "posterior_refs.json"
ALL_TARGETS = {**TARGETS, **HELD_OUT}


def hand_realnvp(dim: int) -> Any:
    """What a user builds from Pyro's couplings (issue 15): 4 x [affine_coupling(D,
    hidden_dims=[H, H]), a fixed seeded permutation (a swap when D = 2)], then a learnable
    element-wise affine layer starting at the identity; H = max(32, 4D); PyTorch's
    default initialisation."""
    h = max(32, 4 * dim)
    parts: list[Any] = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        parts.append(affine_coupling(dim, hidden_dims=[h, h]))
        perm = torch.tensor([1, 0]) if dim == 2 else torch.randperm(dim, generator=gen)
        parts.append(Permute(perm))
    parts.append(Affine(dim, scale=1.0))
    return pyro.distributions.transforms.ComposeTransformModule(parts)


GUIDES: dict[str, Any] = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": AutoIAFNormal,
    "RealNVP-hand": lambda m, **kw: AutoNormalizingFlow(m, hand_realnvp, **kw),
    "AutoNICE": AutoNICE,
    "AutoRealNVP": AutoRealNVP,
}


def make_guide(spec: str, model: Any) -> Any:
    """``Name`` or ``Name:key=value,...``; a value ``a/b`` is a tuple of ints."""
    name, _, opts = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if "/" in value:
            kwargs[key] = tuple(int(v) for v in value.split("/"))
        elif key == "stl":
            kwargs[key] = bool(int(value))
        else:
            try:
                kwargs[key] = int(value)
            except ValueError:
                number = value.replace(".", "", 1).replace("e-", "", 1).isdigit()
                kwargs[key] = float(value) if number else value
    return GUIDES[name](model, **kwargs)


def unconstrained(draws: dict[str, torch.Tensor], sites: dict[str, Any], names: list[str]) -> torch.Tensor:
    cols = []
    for k in names:
        u = biject_to(sites[k]["fn"].support).inv(draws[k])
        cols.append(u.reshape(u.shape[0], -1))
    return torch.cat(cols, dim=1)


# ------------------------------------------------------------------ references
def nuts_reference(target: Target, warmup: int, samples: int, chains: int) -> dict[str, Any]:
    """NUTS on the non-centred twin where there is one; moments of the unconstrained
    coordinates of the target's own sites, in sorted site order."""
    model = {"eight_schools": eight_schools(centered=False).model,
             "horseshoe": horseshoe(centered=False).model}.get(target.name, target.model)
    proto = pyro.poutine.trace(target.model).get_trace(*target.args)
    sites = {k: s for k, s in proto.nodes.items()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    names = sorted(sites)
    runs = []
    for c in range(chains):
        pyro.set_rng_seed(100 + c)
        mcmc = MCMC(NUTS(model), num_samples=samples, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*target.args)
        s = mcmc.get_samples()
        if target.name == "horseshoe":
            s["beta"] = s["tau"][:, None] * s["lambda"] * s.pop("z")
        runs.append(unconstrained(s, sites, names))
    x = torch.stack(runs)  # (chains, samples, D)
    rhat = pyro.ops.stats.split_gelman_rubin(x, chain_dim=0, sample_dim=1)
    flat = x.reshape(-1, x.shape[-1])
    return {"mean": flat.mean(0).tolist(), "sd": flat.std(0).tolist(), "unconstrained": True,
            "rhat_max": float(rhat.max()), "warmup": warmup, "samples": samples, "chains": chains}


def reference(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    if target.ref_mean:
        names = sorted(target.ref_mean)
        m = torch.cat([target.ref_mean[k].reshape(-1) for k in names])
        s = torch.cat([target.ref_sd[k].reshape(-1) for k in names])
        return {"mean": m.tolist(), "sd": s.tolist(), "exact": True}
    refs = json.loads(REFS.read_text()) if REFS.exists() else {}
    key = f"{target.name}:unconstrained:{args.nuts_warmup}:{args.nuts_samples}:{args.nuts_chains}"
    cached = [k for k in refs if k.startswith(f"{target.name}:unconstrained:")]
    if key not in refs and cached:  # a cached reference of other settings: the longest
        key = max(cached, key=lambda k: refs[k]["chains"] * refs[k]["samples"])
    if key not in refs:
        t0 = time.perf_counter()
        refs[key] = nuts_reference(target, args.nuts_warmup, args.nuts_samples, args.nuts_chains)
        refs[key]["seconds"] = time.perf_counter() - t0
        refs = {**json.loads(REFS.read_text()), **refs} if REFS.exists() else refs
        REFS.parent.mkdir(exist_ok=True)
        REFS.write_text(json.dumps(refs, indent=1))
    return refs[key]


# ------------------------------------------------------------------ one fit
def svi_loop(target: Target, guide: Any, steps: int) -> tuple[list[float], int, dict[str, Any]]:
    """The plain loop of issue 15. Every loop returns the losses, the steps run and what
    else it records (``fit_guide``'s: where the guide started)."""
    optim = pyro.optim.ClippedAdam({"lr": 5e-3, "clip_norm": 10.0, "lrd": 0.1 ** (1 / steps)})
    svi = SVI(target.model, guide, optim, Trace_ELBO(num_particles=8, vectorize_particles=True))
    return [svi.step(*target.args) for _ in range(steps)], steps, {}


def fit_loop(target: Target, guide: Any, steps: int,
             **options: Any) -> tuple[list[float], int, dict[str, Any]]:
    result = fit_guide(target.model, guide, *target.args, num_steps=steps, progress_bar=False, **options)
    return result.losses, result.num_steps, {"init": result.init}


LOOPS = {
    "svi": svi_loop,
    "fit": fit_loop,
    # importance-weighted training, K = 10 (Agrawal et al. 2020); the bound is too flat
    # near the optimum for the plateau rule (see fit_guide), so every step is run
    "fit-iwae": partial(fit_loop, objective="iwae", num_particles=10, stop_on_plateau=False),
    # fit_guide started at the posterior's mode, in the Laplace approximation's units
    # (docs/real_models.rst): for flat priors and raw-scale data
    "fit-laplace": partial(fit_loop, init="laplace"),
    # fit_guide from the guide's own start (init_loc_fn, init_scale): the default before
    # issue 24's init="auto"
    "fit-own": partial(fit_loop, init=None),
}


def score(target: Target, guide: Any, ref: dict[str, Any], num_samples: int) -> dict[str, Any]:
    s = importance_samples(target.model, guide, *target.args, num_samples=num_samples,
                           max_simultaneous=min(num_samples, 2000))
    lw = s.log_weights.double()
    weights, khat = _psis(lw)
    w = weights.double()[:, None]
    names = sorted(k for k in s.draws if k in s.sites and not s.sites[k]["infer"].get("_deterministic"))
    x = unconstrained(s.draws, s.sites, names).double()
    m_ref, sd_ref = torch.tensor(ref["mean"]).double(), torch.tensor(ref["sd"]).double()
    out = {"elbo": float(lw.mean()), "iw_elbo": _log_evidence(lw).value, "khat": khat}
    # the guide's own draws, then the same draws with PSIS weights ("_ir": importance-
    # weighted sampling of the final draws, as Agrawal et al. 2020 recommend)
    mw = (w * x).sum(0)
    sdw = (w * (x - mw) ** 2).sum(0).sqrt()
    for suffix, m, sd in (("", x.mean(0), x.std(0)), ("_ir", mw, sdw)):
        out["mean_err" + suffix] = float(((m - m_ref).abs() / sd_ref).mean())
        out["sd_err" + suffix] = float((sd / sd_ref - 1).abs().mean())
        if target.neck:
            col = sum(s.draws[k][0].numel() for k in names[: names.index(target.neck)])
            out["neck_sd" + suffix] = float(sd[col])
    if target.neck:
        out["neck_sd_ref"] = float(sd_ref[col])
    if target.name == "bimodal":
        upper = (s.draws["z"].sum(-1) > 0).double()
        out["mode_weight"] = float(upper.mean())
        out["mode_weight_ir"] = float((w[:, 0] * upper).sum())
    return out


def run(target: Target, spec: str, loop: str, steps: int, seed: int, ref: dict[str, Any],
        num_samples: int) -> dict[str, Any]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(spec, target.model)
    t0 = time.perf_counter()
    losses, ran, extra = LOOPS[loop](target, guide, steps)
    wall = time.perf_counter() - t0
    out = {**extra, "steps_run": ran, "seconds": wall, "step_ms": 1000 * wall / max(1, ran),
           "final_loss": statistics.mean(losses[-100:]),
           "finite": all(math.isfinite(v) for v in losses),
           "params": sum(p.numel() for p in pyro.get_param_store().values())}
    out.update(score(target, guide, ref, num_samples))
    return out


# ------------------------------------------------------------------ tables
COLUMNS = [("elbo", ".3f"), ("iw_elbo", ".3f"), ("khat", ".2f"), ("mean_err", ".3f"),
           ("sd_err", ".3f"), ("neck_sd", ".2f"), ("mode_weight", ".2f"), ("mean_err_ir", ".3f"),
           ("sd_err_ir", ".3f"), ("neck_sd_ir", ".2f"), ("mode_weight_ir", ".2f"),
           ("steps_run", ".0f")]


def table(records: list[dict[str, Any]], columns: list[str] | None = None,
          spec: list[tuple[str, str]] = COLUMNS) -> str:
    """One table per target; ``spec``: the (column, format) pairs to choose from."""
    cols = [(c, f) for c, f in spec if columns is None or c in columns]
    lines = []
    for tname in dict.fromkeys(r["target"] for r in records):
        rows = [r for r in records if r["target"] == tname]
        lines.append(f"\n## {tname}  (reference: {rows[0]['reference']})")
        lines.append(f"{'guide':50s} {'loop':8s} {'n':>2s} " + " ".join(f"{c[:10]:>10s}" for c, _ in cols))
        for key in dict.fromkeys((r["guide"], r["loop"]) for r in rows):
            runs = [r for r in rows if (r["guide"], r["loop"]) == key and "error" not in r]
            failed = sum(1 for r in rows if (r["guide"], r["loop"]) == key and "error" in r)
            cells = []
            for c, fmt in cols:
                v = [r[c] for r in runs if c in r and math.isfinite(r[c])]
                if not v:
                    cells.append(f"{'-':>10s}")
                elif len(v) == 1:
                    cells.append(f"{v[0]:>10{fmt}}")
                else:  # mean and half the range over seeds
                    cells.append(f"{statistics.mean(v):{fmt}}~{(max(v) - min(v)) / 2:.{fmt[1]}f}".rjust(10))
            note = f" ({failed} failed)" if failed else ""
            lines.append(f"{key[0][:50]:50s} {key[1]:8s} {len(runs):>2d} " + " ".join(cells) + note)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(ALL_TARGETS), choices=list(ALL_TARGETS))
    p.add_argument("--guides", nargs="+", default=list(GUIDES))
    p.add_argument("--loops", nargs="+", default=["svi", "fit"], choices=list(LOOPS))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=10000, help="guide draws per evaluation")
    p.add_argument("--nuts-warmup", type=int, default=500,
                   help="NUTS settings of a new reference (a cached one is used if there is one)")
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-chains", type=int, default=2)
    p.add_argument("--reference-only", action="store_true", help="compute the references and stop")
    p.add_argument("--json", type=Path, default=None, help="results, appended run by run")
    p.add_argument("--table", type=Path, nargs="+", default=None,
                   help="print the tables of results files (merged, in order) for --models")
    p.add_argument("--columns", nargs="+", default=None, choices=[c for c, _ in COLUMNS])
    p.add_argument("--only", nargs="+", default=None, help="with --table: these guides, in this order")
    p.add_argument("--rename", nargs="+", default=[], help="with --table: OLD=>NEW guide names")
    a = p.parse_args(argv)
    if a.table:
        runs = [r for path in a.table for r in json.loads(path.read_text())["runs"]]
        runs = [r for r in runs if r["target"] in a.models and (a.only is None or r["guide"] in a.only)]
        if a.only:  # rows in the order asked
            runs.sort(key=lambda r: (a.models.index(r["target"]), a.only.index(r["guide"])))
        names = dict(item.split("=>", 1) for item in a.rename)
        print(table([{**r, "guide": names.get(r["guide"], r["guide"])} for r in runs], a.columns))
        return 0
    torch.set_num_threads(1)
    results: dict[str, Any] = {"runs": []}
    if a.json and a.json.exists():
        results = json.loads(a.json.read_text())
    done = {(r["target"], r["guide"], r["loop"], r["seed"], r["steps"]) for r in results["runs"]}
    for mname in a.models:
        target = ALL_TARGETS[mname]()
        ref = reference(target, a)
        rdesc = "exact" if ref.get("exact") else (
            f"NUTS {ref['chains']}x{ref['samples']} (warmup {ref['warmup']}), "
            f"max R-hat {ref['rhat_max']:.3f}")
        print(f"## {mname}: reference {rdesc}", flush=True)
        if a.reference_only:
            continue
        for spec in a.guides:
            for loop in a.loops:
                for seed in a.seeds:
                    if (mname, spec, loop, seed, a.steps) in done:
                        continue
                    rec: dict[str, Any] = {"target": mname, "guide": spec, "loop": loop, "seed": seed,
                                           "steps": a.steps, "reference": rdesc}
                    try:
                        rec.update(run(target, spec, loop, a.steps, seed, ref, a.num_samples))
                    except (ValueError, RuntimeError) as e:  # a diverged fit is a result too
                        rec["error"] = str(e).splitlines()[0][:200]
                    print(json.dumps(rec), flush=True)
                    results["runs"].append(rec)
                    if a.json:
                        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
