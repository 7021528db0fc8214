"""Guides on the posteriordb posteriors, scored against their reference draws.

For each ported posterior (:mod:`pyro_genext.infer.posteriordb`), guide, loop and seed:
one fit, by ``fit_guide`` (loop ``fit``) or the plain ``SVI`` loop of
``benchmarks/posteriors.py`` (loop ``svi``; the loops, guides and guide specs
``Name:key=value`` are that script's). Scores, from ``--num-samples`` guide draws:

* ``mean_err_u`` / ``sd_err_u``: over every **unconstrained** coordinate, the mean of
  :math:`|m - m_{ref}| / sd_{ref}` and of :math:`|sd / sd_{ref} - 1|`, against the 10,000
  reference draws mapped by ``biject_to(support).inv``; ``mean_err_c`` / ``sd_err_c``: the
  same in the constrained space (the values as posteriordb gives them);
* ``elbo`` (mean log weight), ``iw_elbo`` (:math:`\\log\\frac1N\\sum w_n`), ``khat``
  (Pareto k-hat of the weights), ``seconds`` (wall time of the fit), ``steps_run``.

Each fit is one record of the ``--json`` file, written atomically as soon as it ends;
fits already there are skipped, so a killed sweep resumes::

    python benchmarks/posteriordb.py --steps 4000 --seeds 0 1 2 \\
        --json benchmarks/results/posteriordb_4000steps.json
    python benchmarks/posteriordb.py --table benchmarks/results/posteriordb_4000steps.json

``--nuts``: instead of guides, a short Pyro NUTS run per posterior (and seed), checked
against the reference: every unconstrained mean within 0.1 reference sd, every sd
within 10 %.

The posteriordb folder: ``--root``, else ``$PYRO_GENEXT_POSTERIORDB``, else
``../shared/posteriordb`` beside this repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from posteriors import GUIDES, LOOPS, make_guide, unconstrained  # benchmarks/posteriors.py
from posteriors import table as posteriors_table
from pyro.infer import MCMC, NUTS

from pyro_genext.diagnostics import _log_evidence, _psis, importance_samples
from pyro_genext.infer.posteriordb import (
    ENV_VAR,
    PosteriorDBTarget,
    latent_sites,
    list_posteriors,
    load_posterior,
)

DEFAULT_GUIDES = ["AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "AutoNICE", "AutoRealNVP"]
KEY = ("posterior", "guide", "loop", "seed", "steps")


def default_root() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return Path(__file__).resolve().parents[2] / "shared" / "posteriordb"


# ------------------------------------------------------------------ scoring
def _flat(draws: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([draws[k].reshape(draws[k].shape[0], -1) for k in names], 1)


def reference_moments(target: PosteriorDBTarget) -> dict[str, torch.Tensor]:
    """Means and sds of the reference draws, unconstrained (``_u``) and constrained (``_c``),
    coordinates in sorted site order."""
    sites = latent_sites(target.model, target.args)
    names = sorted(sites)
    u = unconstrained({k: target.draws[k].double() for k in names}, sites, names)
    c = _flat({k: target.draws[k].double() for k in names}, names)
    return {"mean_u": u.mean(0), "sd_u": u.std(0), "mean_c": c.mean(0), "sd_c": c.std(0)}


def moment_errors(u: torch.Tensor, c: torch.Tensor, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for space, x in (("u", u), ("c", c)):
        m, sd = ref[f"mean_{space}"], ref[f"sd_{space}"]
        out[f"mean_err_{space}"] = float(((x.mean(0) - m).abs() / sd).mean())
        out[f"sd_err_{space}"] = float((x.std(0) / sd - 1).abs().mean())
        out[f"mean_err_{space}_max"] = float(((x.mean(0) - m).abs() / sd).max())
        out[f"sd_err_{space}_max"] = float((x.std(0) / sd - 1).abs().max())
    return out


def score(target: PosteriorDBTarget, guide: Any, ref: dict[str, torch.Tensor],
          num_samples: int) -> dict[str, Any]:
    s = importance_samples(target.model, guide, *target.args, num_samples=num_samples,
                           max_simultaneous=min(num_samples, 2000))
    lw = s.log_weights.double()
    _, khat = _psis(lw)
    names = sorted(k for k in s.draws if k in s.sites and not s.sites[k]["infer"].get("_deterministic"))
    u = unconstrained(s.draws, s.sites, names).double()
    c = _flat(s.draws, names).double()
    return {"elbo": float(lw.mean()), "iw_elbo": _log_evidence(lw).value, "khat": khat,
            **moment_errors(u, c, ref)}


def fit_one(target: PosteriorDBTarget, spec: str, loop: str, steps: int, seed: int,
            ref: dict[str, torch.Tensor], num_samples: int) -> dict[str, Any]:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(spec, target.model)
    t0 = time.perf_counter()
    losses, ran, extra = LOOPS[loop](target, guide, steps)
    out: dict[str, Any] = {**extra, "seconds": time.perf_counter() - t0, "steps_run": ran,
                           "final_loss": statistics.mean(losses[-100:]),
                           "finite": all(math.isfinite(v) for v in losses)}
    out.update(score(target, guide, ref, num_samples))
    return out


def nuts_one(target: PosteriorDBTarget, seed: int, warmup: int, samples: int,
             ref: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A short NUTS run (dense mass matrix); passes if every unconstrained mean is within
    0.1 reference sd and every sd within 10 %."""
    pyro.set_rng_seed(seed)
    mcmc = MCMC(NUTS(target.model, full_mass=True), num_samples=samples, warmup_steps=warmup,
                disable_progbar=True)
    t0 = time.perf_counter()
    mcmc.run(*target.args)
    seconds = time.perf_counter() - t0
    draws = mcmc.get_samples()
    sites = latent_sites(target.model, target.args)
    names = sorted(sites)
    u = unconstrained(draws, sites, names).double()
    c = _flat(draws, names).double()
    out: dict[str, Any] = {"seconds": seconds, "warmup": warmup, "samples": samples}
    out.update(moment_errors(u, c, ref))
    out["passed"] = out["mean_err_u_max"] < 0.1 and out["sd_err_u_max"] < 0.1
    return out


# ------------------------------------------------------------------ the records
def load_records(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return list(json.loads(path.read_text())["records"])


def save_records(path: Path, records: list[dict[str, Any]]) -> None:
    """Atomic: a killed run leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"records": records}, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------ tables
COLUMNS = [("mean_err_u", ".3f"), ("sd_err_u", ".3f"), ("mean_err_c", ".3f"), ("sd_err_c", ".3f"),
           ("elbo", ".2f"), ("iw_elbo", ".2f"), ("khat", ".2f"), ("seconds", ".0f"), ("steps_run", ".0f")]


def table(records: list[dict[str, Any]]) -> str:
    fits = [r for r in records if r["loop"] != "nuts"]
    lines = [posteriors_table([{**r, "target": r["posterior"], "reference": "posteriordb"} for r in fits],
                              spec=COLUMNS)] if fits else []
    nuts = [r for r in records if r["loop"] == "nuts"]
    if nuts:
        lines.append("\n## NUTS against the reference (max over coordinates, unconstrained)")
        lines.append(f"{'posterior':48s} {'seed':>4s} {'mean_err':>9s} {'sd_err':>9s} "
                     f"{'seconds':>8s}  passed")
        for r in nuts:
            if "error" in r:
                lines.append(f"{r['posterior']:48s} {r['seed']:>4d} error: {r['error']}")
                continue
            lines.append(f"{r['posterior']:48s} {r['seed']:>4d} {r['mean_err_u_max']:9.3f} "
                         f"{r['sd_err_u_max']:9.3f} {r['seconds']:8.0f}  {r['passed']}")
    lines.append(summary(fits))
    if any(r["guide"] == "AutoMultivariateNormal" and r["loop"] == "fit-laplace" for r in fits):
        lines.append(summary(fits, base=("AutoMultivariateNormal", "fit-laplace")))
    return "\n".join(lines)


def summary(fits: list[dict[str, Any]], ours: tuple[str, str] = ("AutoRealNVP", "fit"),
            base: tuple[str, str] = ("AutoMultivariateNormal", "fit")) -> str:
    """The issue's targets for ``ours`` against ``base`` (each a (guide, loop)), posterior by
    posterior: best or tied on moment errors (err = mean_err_u + sd_err_u, within the
    seed-to-seed half-ranges) among every ``fit_guide`` row (loops ``fit`` and
    ``fit-laplace``); never worse than ``base`` beyond those half-ranges; the IW-ELBO
    difference (at least ``base``'s within the half-ranges), ``base``'s k-hat, and the
    ratio of mean wall times. A posterior where every fit of ``ours`` failed counts as
    missed on every target (no time ratio)."""
    by: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    tried: set[tuple[str, str, str]] = set()
    for r in fits:
        key = (r["posterior"], r["guide"], r["loop"])
        tried.add(key)
        if "error" not in r:
            by.setdefault(key, []).append(r)
    posts = sorted({p for p, g, lp in tried if (g, lp) == ours} & {p for p, g, lp in by if (g, lp) == base})
    if not posts:
        return ""

    def stat(key: tuple[str, str, str], c: str) -> tuple[float, float]:
        v = [r[c] for r in by[key]]
        return statistics.mean(v), (max(v) - min(v)) / 2

    def err(key: tuple[str, str, str]) -> tuple[float, float]:
        (m, dm), (sd, dsd) = stat(key, "mean_err_u"), stat(key, "sd_err_u")
        return m + sd, dm + dsd

    name = lambda gl: f"{gl[0]} ({gl[1]})"  # noqa: E731
    lines = [f"\n## {name(ours)} against {name(base)} (err = mean_err_u + sd_err_u; best among every "
             "fit_guide row)",
             f"{'posterior':48s} {'best/tied':>9s} {'vs base':>9s} {'d_iwelbo':>9s} {'iw ok':>6s} "
             f"{'khat_b':>7s} {'t ratio':>8s}"]
    best_count, iw_ok, not_worse, ratios, gains_high_k = 0, 0, 0, [], []
    for p in posts:
        mine, theirs = (p, *ours), (p, *base)
        k_b = stat(theirs, "khat")[0]
        if mine not in by:
            lines.append(f"{p:48s} {'failed':>9s} {'failed':>9s} {'-':>9s} {'-':>6s} {k_b:7.2f} {'-':>8s}")
            continue
        rows = {key: err(key) for key in by if key[0] == p and key[2] in ("fit", "fit-laplace")}
        e, spread = rows[mine]
        best_key = min(rows, key=lambda k: rows[k][0])
        tied = e <= rows[best_key][0] + spread + rows[best_key][1]
        worse = e > rows[theirs][0] + spread + rows[theirs][1]
        (iw, d_iw_mine), (iw_b, d_iw_b) = stat(mine, "iw_elbo"), stat(theirs, "iw_elbo")
        d_iw = iw - iw_b
        ok = d_iw >= -(d_iw_mine + d_iw_b)
        best_count += tied
        not_worse += not worse
        iw_ok += ok
        if k_b > 0.7:
            gains_high_k.append(d_iw)
        ratio = stat(mine, "seconds")[0] / stat(theirs, "seconds")[0]
        ratios.append(ratio)
        lines.append(f"{p:48s} {str(tied):>9s} {'worse' if worse else 'ok':>9s} {d_iw:9.2f} {str(ok):>6s} "
                     f"{k_b:7.2f} {ratio:8.2f}")
    n = len(posts)
    gain = (f"{statistics.median(gains_high_k):.2f} nats over {len(gains_high_k)}" if gains_high_k
            else "none")
    lines.append(f"of {n} posteriors: best or tied on {best_count} ({100 * best_count / n:.0f} %); not worse "
                 f"than the base beyond the spread on {not_worse}; IW-ELBO at least the base's (within the "
                 f"spread) on {iw_ok}; median IW-ELBO gain where the base's k-hat > 0.7: {gain}; median "
                 f"time ratio {statistics.median(ratios):.2f}"
                 + (f" over {len(ratios)}" if len(ratios) < n else ""))
    return "\n".join(lines)


def figure(records: list[dict[str, Any]], out: Path) -> None:
    """Which guide on which kind of model: per posterior (grouped by family, rows), each
    (guide, loop)'s moment error ``mean_err_u + sd_err_u`` (mean over seeds; a cross where
    every fit failed) on a log scale, and the IW-ELBO deficit from the best row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fits = [r for r in records if r["loop"] != "nuts"]
    posts = sorted({r["posterior"] for r in fits}, key=lambda p: (p.split("-")[0].rstrip("0123456789"), p))
    keys = list(dict.fromkeys((r["guide"], r["loop"]) for r in fits))
    fig, axes = plt.subplots(1, 2, figsize=(13, max(4.0, 0.28 * len(posts) + 1.5)), sharey=True)
    markers = "osD^v<>ph*"
    for i, (guide, loop) in enumerate(keys):
        xs_err, xs_iw, ys, failed = [], [], [], []
        for j, p in enumerate(posts):
            rows = [r for r in fits if (r["posterior"], r["guide"], r["loop"]) == (p, guide, loop)]
            ok = [r for r in rows if "error" not in r]
            if rows and not ok:
                failed.append(j)
            if not ok:
                continue
            best = max(statistics.mean(r["iw_elbo"] for r in fits if r["posterior"] == p and "error" not in r
                                       and (r["guide"], r["loop"]) == k) for k in keys
                       if any(r["posterior"] == p and "error" not in r and (r["guide"], r["loop"]) == k
                              for r in fits))
            xs_err.append(statistics.mean(r["mean_err_u"] + r["sd_err_u"] for r in ok))
            xs_iw.append(max(1e-3, best - statistics.mean(r["iw_elbo"] for r in ok)))
            ys.append(j)
        label = f"{guide} ({loop})"
        offset = (i - (len(keys) - 1) / 2) * 0.08
        color = f"C{i}"
        marker = markers[i % len(markers)]
        axes[0].scatter(xs_err, [y + offset for y in ys], marker=marker, color=color, s=22, label=label)
        axes[1].scatter(xs_iw, [y + offset for y in ys], marker=marker, color=color, s=22)
        if failed:  # hollow, at the left edge
            axes[0].scatter([3e-3] * len(failed), [y + offset for y in failed], marker=marker, s=30,
                            facecolors="none", edgecolors=color)
    axes[0].set_xscale("log")
    axes[1].set_xscale("log")
    axes[0].set_yticks(range(len(posts)), posts, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("moment error: mean + sd error, unconstrained, in reference sds\n"
                       "(hollow, at the left edge: every fit failed)")
    axes[1].set_xlabel("IW-ELBO below the best row, nats (floored at 1e-3)")
    for ax in axes:
        ax.grid(True, which="major", axis="x", alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="upper center", ncol=4)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=None, help="the posteriordb folder")
    p.add_argument("--posteriors", nargs="+", default=None, help="default: every ported one")
    p.add_argument("--guides", nargs="+", default=DEFAULT_GUIDES,
                   help=f"guide specs, Name or Name:key=value,... (names: {', '.join(GUIDES)})")
    p.add_argument("--loops", nargs="+", default=["fit", "svi"], choices=list(LOOPS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--num-samples", type=int, default=10000, help="guide draws per evaluation")
    p.add_argument("--nuts", action="store_true", help="NUTS against the reference instead of guides")
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None, help="records, one per fit, resumable")
    p.add_argument("--table", type=Path, nargs="+", default=None, help="print the tables of records files")
    p.add_argument("--figure", type=Path, default=None, help="with --table: also draw the figure here")
    p.add_argument("--only-loops", nargs="+", default=None, help="with --table: these loops only")
    a = p.parse_args(argv)
    if a.table:
        records = [r for path in a.table for r in load_records(path)
                   if a.only_loops is None or r["loop"] in a.only_loops]
        print(table(records))
        if a.figure:
            figure(records, a.figure)
        return 0
    torch.set_num_threads(1)
    logging.getLogger("pyro").setLevel(logging.WARNING)  # not the ELBO's guess of max_plate_nesting
    root = a.root or default_root()
    ported = list_posteriors(root, ported=True)
    posts = a.posteriors or ported
    unknown = [n for n in posts if n not in ported]
    if unknown:
        p.error(f"not ported: {unknown}; ported: {ported}")
    unknown_guides = [g for g in a.guides if g.partition(":")[0] not in GUIDES]
    if unknown_guides:
        p.error(f"unknown guides {unknown_guides}; expected names among {list(GUIDES)}")
    records = load_records(a.json)
    done = {tuple(r[k] for k in KEY) for r in records}
    for name in posts:
        target = load_posterior(name, root)
        ref = reference_moments(target)
        jobs: list[tuple[str, str, int]] = (
            [("NUTS", "nuts", s) for s in a.seeds] if a.nuts
            else [(g, lp, s) for g in a.guides for lp in a.loops for s in a.seeds])
        for spec, loop, seed in jobs:
            steps = a.nuts_samples if loop == "nuts" else a.steps
            key = (name, spec, loop, seed, steps)
            if key in done:
                continue
            rec: dict[str, Any] = dict(zip(KEY, key))
            try:
                if loop == "nuts":
                    rec.update(nuts_one(target, seed, a.nuts_warmup, a.nuts_samples, ref))
                else:
                    rec.update(fit_one(target, spec, loop, a.steps, seed, ref, a.num_samples))
            except (ValueError, RuntimeError) as e:  # a diverged fit is a result too
                rec["error"] = str(e).splitlines()[0][:200]
            print(json.dumps(rec), flush=True)
            records.append(rec)
            if a.json:
                save_records(a.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
