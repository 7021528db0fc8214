"""VAEs on binarised images: posteriors and objectives at an equal budget, Pyro's example
VAE as a baseline, and the time per epoch against a plain-PyTorch floor.

``quality``: at an equal budget of epochs, batch size and learning rate (Adam), on the
same data stream (dynamic binarisation of the training images, one fixed seeded
binarisation of the test images, :mod:`pyro_genext.kinds.vae`), trains

* ours, ``pyro_genext.models.VAE`` through the engine (``pyro_genext.engine.fit``, what
  ``pyro-genext train vae`` runs), with a Gaussian, NICE or RealNVP posterior, each
  trained with the ELBO (``TraceMeanField_ELBO`` / ``Trace_ELBO``) and with IWAE
  (``ImportanceWeightedELBO``, ``K = --particles``); the checkpoint with the best
  validation ELBO is scored;
* Pyro's example VAE (784-400-z softplus, ``exp`` scale; ``_vae_peers``) trained as its
  example does, ``SVI`` + ``Trace_ELBO`` + ``pyro.optim.Adam``, on the same batches, with
  the same ``z_dim`` (its last epoch is scored: the example has no validation);

and reports each model's test ELBO (``--elbo-particles`` draws per image), IWAE
log-likelihood with ``--iwae-k`` samples on the first ``--iwae-examples`` test images, the
gap IWAE - ELBO, and the share of the Gaussian posterior's gap (same objective) a flow
posterior closes, ``1 - gap / gap_gauss``. With several seeds, the spread (max - min)
over seeds is printed next to each mean.

``timing``: seconds per training epoch (batch ``--batch-size``) of ours through the
engine's step (the loss, backward, per-tensor clipping, Adam) and through ``SVI``,
against a plain-PyTorch VAE of the same architecture (closed-form KL, same batch, no
clipping): the floor. Each figure is the median of ``--repeats`` timings of
``--timing-steps`` steps after 5 warm-up steps, times the steps of one epoch.

Usage::

    python benchmarks/vae.py quality --quick                       # smoke test, < 1 min
    python benchmarks/vae.py quality --data digits --epochs 100 --seeds 0,1,2
    python benchmarks/vae.py quality --data fashion-mnist --epochs 3 --iwae-examples 100
    python benchmarks/vae.py timing --data fashion-mnist
    python benchmarks/vae.py curve --run runs/vae --out curve.png   # a training run's curve

``curve``: the validation -ELBO per epoch of a ``pyro-genext train vae`` run, as a figure.

``flows``: one run of the flow-posterior/flow-prior study (docs/benchmarks_vae.rst): one
of the configurations of ``FLOW_CONFIGS`` (Gaussian posterior, RealNVP posterior, RealNVP
prior, both; each with ``--kl-warmup`` or without) and one seed, trained through the engine
on the ELBO with a checkpoint in ``--runs`` (an interrupted run resumes), its learning curve
(validation -ELBO, wall time and load average per epoch) written to ``--results/NAME.json``
at every validation, then its best checkpoint scored: the test ELBO and the IWAE
log-likelihood (``--iwae-k``) per image of the first ``--iwae-examples`` test images, kept
per image so that configurations can be compared on the same images. ``flows-gaps`` adds
the gap decomposition (:func:`pyro_genext.models.vae.gap_decomposition`) of a finished
run on the first ``--gap-examples`` test images; ``flows-table`` prints the summary of
every JSON in ``--results`` and the learning curves' figure::

    for seed in 0 1; do for c in gaussian realnvp-posterior realnvp-prior realnvp-both; do
        for w in "" -warmup; do
            python benchmarks/vae.py flows --config $c$w --seed $seed --runs runs/flows \
                --results benchmarks/results/vae_flows
    done; done; done
    python benchmarks/vae.py flows-table --results benchmarks/results/vae_flows \
        --out docs/_static/vae_flows_curves.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from _vae_peers import PyroExampleVAE, TorchVAE, pyro_scores  # noqa: E402
from throughput import _machine  # noqa: E402

from pyro_genext.data import binarize, load_dataset  # noqa: E402
from pyro_genext.engine import (  # noqa: E402
    Objective,
    clip_per_tensor,
    default_settings,
    fit,
    load_checkpoint,
    module_from_checkpoint,
    per_example_metrics,
)
from pyro_genext.kinds.vae import VAE_KIND, build, loss  # noqa: E402

POSTERIORS = ("none", "nice", "realnvp")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


# ---------------------------------------------------------------------------- quality
def settings_for(args: argparse.Namespace, posterior: str, objective: str, seed: int) -> dict[str, Any]:
    return {
        "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "seed": seed, "z_dim": args.z_dim, "hidden": args.hidden, "posterior_flow": posterior,
        "num_flows": args.num_flows, "flow_hidden": args.flow_hidden, "objective": objective,
        "particles": args.particles if objective == "iwae" else None,
        "checkpoint_every": 10**9, "log_interval": 10**9,
    }


def score_ours(module: Any, x: torch.Tensor, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Test ELBO and IWAE of the prepared (fixed-binarised) test images."""

    def both(m: Any, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        return {"elbo": m.elbo(xb, num_particles=args.elbo_particles),
                "iwae": m.iwae_log_likelihood(xb, num_samples=args.iwae_k)}

    kind = dataclasses.replace(VAE_KIND, metrics=both)
    v = per_example_metrics(kind, module, x, seed, "test")
    e, w = v["elbo"].double(), v["iwae"].double()
    return {"elbo": float(e.mean()), "iwae": float(w.mean()), "gap": float((w - e).mean())}


def fixed_test(data: Any, module: Any, seed: int) -> torch.Tensor:
    """The test images exactly as ``per_example_metrics`` prepares them."""
    seen: list[torch.Tensor] = []

    def keep(m: Any, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(xb)
        return {"none": torch.zeros(xb.shape[0])}

    per_example_metrics(dataclasses.replace(VAE_KIND, metrics=keep), module, data, seed, "test")
    return torch.cat(seen)


def train_pyro_example(args: argparse.Namespace, train: Any, seed: int) -> tuple[PyroExampleVAE, float]:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    d = math.prod(train.event_shape)
    vae = PyroExampleVAE(d, z_dim=args.z_dim)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
    gen = torch.Generator().manual_seed(seed)
    n, b = len(train), args.batch_size
    start = time.perf_counter()
    for _ in range(args.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - b + 1, b):
            svi.step(binarize(train.x[perm[i : i + b]], train.levels, gen))
    return vae, time.perf_counter() - start


def quality(args: argparse.Namespace) -> dict[str, Any]:
    train = load_dataset(args.data, "train")
    test = load_dataset(args.data, "test")
    test.x, test.y = test.x[: args.iwae_examples], test.y[: args.iwae_examples]
    rows: dict[str, list[dict[str, float]]] = {}
    objectives = [o for o in ("elbo", "iwae") if o in args.objectives]
    for seed in args.seeds:
        for objective in objectives:
            for posterior in args.posteriors:
                name = f"ours-{'gaussian' if posterior == 'none' else posterior}-{objective}"
                s = settings_for(args, posterior, objective, seed)
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    fit("vae", s, tmp, progress=False, log=lambda line: None)
                    seconds = time.perf_counter() - t0
                    state = load_checkpoint(Path(tmp) / "best.pt")
                module, _, _ = module_from_checkpoint(state)
                with torch.no_grad():
                    r = score_ours(module, test.x, seed, args)
                r.update(train_seconds=seconds, best_epoch=state["epoch"])
                rows.setdefault(name, []).append(r)
                if name == "ours-gaussian-elbo" and seed == args.seeds[0]:
                    # the Pyro-trace evaluator the baseline is scored with, on ours
                    x = fixed_test(test.x[:20], module, seed)
                    torch.manual_seed(0)
                    e, w = pyro_scores(module.model, module.guide, x, args.elbo_particles, args.iwae_k)
                    mine = score_ours(module, test.x[:20], seed, args)
                    print(f"cross-check on 20 test images: VAE.elbo {mine['elbo']:.3f} / iwae "
                          f"{mine['iwae']:.3f}; Pyro traces {float(e.mean()):.3f} / {float(w.mean()):.3f}")
                print(f"seed {seed} {name:24s} ELBO {r['elbo']:9.3f} IWAE {r['iwae']:9.3f} "
                      f"gap {r['gap']:6.3f}  ({seconds:.0f} s)", flush=True)
        if args.pyro_example:
            vae, seconds = train_pyro_example(args, train, seed)
            stub = build({**default_settings("vae"), "z_dim": 2, "hidden": [4]}, train)
            stub.eval()
            x = fixed_test(test.x, stub, seed).reshape(len(test.x), -1)
            torch.manual_seed(0)
            e, w = pyro_scores(vae.model, vae.guide, x, args.elbo_particles, args.iwae_k)
            r = {"elbo": float(e.mean()), "iwae": float(w.mean()), "gap": float((w - e).mean()),
                 "train_seconds": seconds}
            rows.setdefault("pyro-example-elbo", []).append(r)
            print(f"seed {seed} {'pyro-example-elbo':24s} ELBO {r['elbo']:9.3f} IWAE {r['iwae']:9.3f} "
                  f"gap {r['gap']:6.3f}  ({seconds:.0f} s)", flush=True)
    table = summarise(rows, objectives)
    print_quality(table, args)
    return {"rows": rows, "summary": table}


def summarise(rows: dict[str, list[dict[str, float]]], objectives: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, runs in rows.items():
        s: dict[str, float] = {"seeds": len(runs)}
        for key in ("elbo", "iwae", "gap", "train_seconds"):
            vals = [r[key] for r in runs]
            s[key] = statistics.fmean(vals)
            s[f"{key}_spread"] = max(vals) - min(vals)
        out[name] = s
    for objective in objectives:
        g = out.get(f"ours-gaussian-{objective}")
        for post in ("nice", "realnvp"):
            r = out.get(f"ours-{post}-{objective}")
            if g is not None and r is not None and g["gap"] > 0:
                r["closed"] = 1 - r["gap"] / g["gap"]
    return out


def print_quality(table: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    print(f"\n{args.data}: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, z_dim "
          f"{args.z_dim}; test ELBO ({args.elbo_particles} draws) and IWAE (K={args.iwae_k}) on "
          f"{args.iwae_examples} test images, nats/image, mean over {len(args.seeds)} seed(s)"
          + (" +- spread (max - min)" if len(args.seeds) > 1 else ""))
    print(f"{'model':26s} {'ELBO':>16s} {'IWAE':>16s} {'gap':>14s} {'closed':>7s} {'train s':>8s}")
    def cell(s: dict[str, float], key: str, width: int) -> str:
        text = f"{s[key]:.3f}" + (f" +-{s[key + '_spread']:.2f}" if s["seeds"] > 1 else "")
        return f"{text:>{width}s}"

    for name, s in table.items():
        closed = f"{s['closed']:.0%}" if "closed" in s else ""
        print(f"{name:26s} {cell(s, 'elbo', 16)} {cell(s, 'iwae', 16)} {cell(s, 'gap', 14)} {closed:>7s} "
              f"{s['train_seconds']:8.0f}")


# ---------------------------------------------------------------------------- timing
def timing(args: argparse.Namespace) -> dict[str, Any]:
    train = load_dataset(args.data, "train")
    n, b = len(train), args.batch_size
    steps_per_epoch = n // b
    d = math.prod(train.event_shape)
    gen = torch.Generator().manual_seed(0)
    batches = [binarize(train.x[torch.randint(0, n, (b,), generator=gen)], train.levels, gen)
               for _ in range(8)]

    def clock(step: Any) -> float:
        for i in range(5):
            step(batches[i % len(batches)])
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            for i in range(args.timing_steps):
                step(batches[i % len(batches)])
            times.append((time.perf_counter() - t0) / args.timing_steps)
        return statistics.median(times) * steps_per_epoch

    results: dict[str, float] = {}
    torch.manual_seed(0)
    floor = TorchVAE(d, args.z_dim, args.hidden)
    opt = torch.optim.Adam(floor.parameters(), lr=args.lr)

    def floor_step(x: torch.Tensor) -> None:
        loss_ = floor.loss(x)
        opt.zero_grad(set_to_none=True)
        loss_.backward()
        opt.step()

    results["torch-floor"] = clock(floor_step)
    for posterior in args.posteriors:
        for objective in [o for o in ("elbo", "iwae") if o in args.objectives]:
            s = {**default_settings("vae"), **settings_for(args, posterior, objective, 0)}
            pyro.clear_param_store()
            module = build(s, train)
            obj = Objective(module, loss(s))
            params = list(module.parameters())
            adam = torch.optim.Adam(params, lr=args.lr)

            def engine_step(x: torch.Tensor, obj: Any = obj, params: Any = params, adam: Any = adam) -> None:
                value = obj(x)
                adam.zero_grad(set_to_none=True)
                value.backward()
                clip_per_tensor(params, 10.0)
                adam.step()

            name = f"ours-{'gaussian' if posterior == 'none' else posterior}-{objective}"
            results[f"{name} (engine)"] = clock(engine_step)
            if posterior == "none" and objective == "elbo":
                pyro.clear_param_store()
                m2 = build(s, train)
                svi = SVI(m2.model, m2.guide, pyro.optim.Adam({"lr": args.lr}), TraceMeanField_ELBO())
                results[f"{name} (SVI)"] = clock(svi.step)
    base = results["torch-floor"]
    print(f"\n{args.data}: seconds per training epoch ({steps_per_epoch} steps of batch {b}), "
          f"hidden {args.hidden}, z_dim {args.z_dim}, median of {args.repeats} x {args.timing_steps} steps")
    print(f"{'contender':34s} {'s/epoch':>8s} {'x floor':>8s}")
    for name, sec in results.items():
        print(f"{name:34s} {sec:8.2f} {sec / base:8.2f}")
    return {"seconds_per_epoch": results, "steps_per_epoch": steps_per_epoch}


def curve(args: argparse.Namespace) -> dict[str, Any]:
    """The learning curve of a ``pyro-genext train vae`` run: validation -ELBO per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    state = load_checkpoint(args.run / "last.pt")
    args.out = args.out or Path("vae_curve.png")
    hist = state["history"]
    epochs = [h["epoch"] + 1 for h in hist]
    nelbo = [h["nelbo_mean"] for h in hist]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, nelbo, marker=".")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation -ELBO (nats/image)")
    s = state["settings"]
    ax.set_title(f"{s['data']}: z_dim {s['z_dim']}, hidden {s['hidden']}, batch {s['batch_size']}")
    ax.grid(alpha=0.3)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    best = min(range(len(nelbo)), key=nelbo.__getitem__)
    print(f"{len(hist)} validations; best -ELBO {nelbo[best]:.3f} at epoch {epochs[best]}, last "
          f"{nelbo[-1]:.3f}; figure in {args.out}")
    return {"epochs": epochs, "val_nelbo": nelbo, "step": state["step"]}


# ---------------------------------------------------------------------------- flows study
#: name -> (posterior_flow, prior_flow); each also with "-warmup" (``--kl-warmup``)
FLOW_CONFIGS = {
    "gaussian": ("none", "none"),
    "realnvp-posterior": ("realnvp", "none"),
    "realnvp-prior": ("none", "realnvp"),
    "realnvp-both": ("realnvp", "realnvp"),
}


def flow_settings(args: argparse.Namespace) -> dict[str, Any]:
    name = args.config.removesuffix("-warmup")
    if name not in FLOW_CONFIGS:
        raise SystemExit(f"expected --config one of {sorted(FLOW_CONFIGS)} (optionally -warmup), "
                         f"got {args.config!r}")
    posterior, prior = FLOW_CONFIGS[name]
    return {
        "data": args.data, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "z_dim": args.z_dim, "hidden": args.hidden, "posterior_flow": posterior,
        "prior_flow": prior, "num_flows": args.num_flows, "flow_hidden": args.flow_hidden,
        "objective": "elbo", "kl_warmup": args.kl_warmup if args.config.endswith("-warmup") else 0,
        "checkpoint_every": 100, "log_interval": 0,
    }


def _write(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)


def flows(args: argparse.Namespace) -> dict[str, Any]:
    import os
    import re

    s = flow_settings(args)
    run = args.runs / f"{args.config}-s{args.seed}"
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.config}-s{args.seed}.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    record.update(config=args.config, seed=args.seed, settings=s)
    curve: list[dict[str, Any]] = record.setdefault("curve", [])
    last = [time.perf_counter()]
    pattern = re.compile(r"step (\d+)/\d+ epoch (\d+): val nelbo ([-\d.]+)")

    def log(line: str) -> None:
        m = pattern.search(line)
        if m is None:
            return
        now = time.perf_counter()
        step = int(m.group(1))
        if not any(c["step"] == step for c in curve):
            curve.append({"step": step, "epoch": int(m.group(2)) + 1, "val_nelbo": float(m.group(3)),
                          "seconds": now - last[0], "loadavg": os.getloadavg()[0]})
            _write(path, {**record, "status": "training"})
        last[0] = now

    record.setdefault("commit", os.environ.get("BENCH_COMMIT"))  # the commit the run was trained at
    done = (run / "last.pt").exists() and load_checkpoint(run / "last.pt")["step"] >= \
        args.epochs * (load_dataset(args.data, "train").x.shape[0] // args.batch_size)
    if not done:
        last[0] = time.perf_counter()
        fit("vae", s, run, resume=(run / "last.pt").exists(), progress=False, log=log)
    if "test" not in record:
        state = load_checkpoint(run / "best.pt")
        module, _, _ = module_from_checkpoint(state)
        test = load_dataset(args.data, "test")
        x = test.x[: args.iwae_examples]
        t0 = time.perf_counter()

        def both(m: Any, xb: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"elbo": m.elbo(xb, num_particles=args.elbo_particles),
                    "iwae": m.iwae_log_likelihood(xb, num_samples=args.iwae_k)}

        v = per_example_metrics(dataclasses.replace(VAE_KIND, metrics=both), module, x, args.seed, "test",
                                batch_size=100)
        e, w = v["elbo"].double(), v["iwae"].double()
        n = len(e)
        record["test"] = {
            "best_step": state["best_step"], "best_epoch": state["epoch"] + 1, "num_examples": n,
            "iwae_k": args.iwae_k, "elbo_particles": args.elbo_particles,
            "elbo": float(e.mean()), "elbo_se": float(e.std() / n**0.5),
            "iwae": float(w.mean()), "iwae_se": float(w.std() / n**0.5),
            "gap": float((w - e).mean()), "eval_seconds": time.perf_counter() - t0,
            "loadavg": os.getloadavg()[0], "commit": os.environ.get("BENCH_COMMIT"),
            "per_example_elbo": [round(float(t), 4) for t in e],
            "per_example_iwae": [round(float(t), 4) for t in w],
        }
    record["status"] = "evaluated"
    _write(path, record)
    t = record["test"]
    print(f"{args.config} seed {args.seed}: test ELBO {t['elbo']:.3f} IWAE {t['iwae']:.3f} (K={t['iwae_k']}, "
          f"{t['num_examples']} images), best epoch {t['best_epoch']}", flush=True)
    return {"result": str(path)}


def flows_gaps(args: argparse.Namespace) -> dict[str, Any]:
    """The gap decomposition of a finished ``flows`` run, added to its JSON."""
    import os

    from pyro_genext.models.vae import gap_decomposition

    path = args.results / f"{args.config}-s{args.seed}.json"
    record = json.loads(path.read_text())
    if record.get("status") != "evaluated":
        raise SystemExit(f"{path}: the run is not finished and evaluated yet")
    state = load_checkpoint(args.runs / f"{args.config}-s{args.seed}" / "best.pt")
    module, _, _ = module_from_checkpoint(state)
    test = load_dataset(args.data, "test")
    x = fixed_test(test.x[: args.gap_examples], module, args.seed)
    t0 = time.perf_counter()
    g = gap_decomposition(module, x, num_samples=args.iwae_k, elbo_samples=args.gap_elbo_samples,
                          steps=args.gap_steps, particles=args.gap_particles, seed=args.seed)
    record["gaps"] = {
        **g.summary(), "num_samples": args.iwae_k, "elbo_samples": args.gap_elbo_samples,
        "steps": args.gap_steps, "particles": args.gap_particles, "seconds": time.perf_counter() - t0,
        "loadavg": os.getloadavg()[0], "commit": os.environ.get("BENCH_COMMIT"),
        "per_example": {name: [round(float(v), 4) for v in getattr(g, name)]
                        for name in ("log_px", "elbo_amortised", "elbo_family", "elbo_flexible")},
    }
    _write(path, record)
    r = record["gaps"]
    print(f"{args.config} seed {args.seed} ({r['num_examples']} images, {r['seconds']:.0f} s): log p(x) "
          f"{r['log_px']:.3f}, ELBO amortised {r['elbo_amortised']:.3f}, best of family "
          f"{r['elbo_family']:.3f}, flexible {r['elbo_flexible']:.3f}; approximation gap "
          f"{r['approximation_gap']:.3f}, amortisation gap {r['amortisation_gap']:.3f}", flush=True)
    return {"result": str(path)}


def flows_table(args: argparse.Namespace) -> dict[str, Any]:
    """The study's summary over seeds (mean, and the spread max - min), and a figure of the
    learning curves."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(args.results.glob("*.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["config"], []).append(r)
    order = [c + w for w in ("", "-warmup") for c in FLOW_CONFIGS]
    table: dict[str, dict[str, Any]] = {}
    print(f"{'configuration':26s} {'seeds':>5s} {'test IWAE':>17s} {'test ELBO':>17s} {'gap':>6s} "
          f"{'approx':>7s} {'amort':>7s} {'flex':>6s} {'s/epoch':>8s} {'load':>5s}")
    for name in [c for c in order if c in runs]:
        done = [r for r in runs[name] if "test" in r]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in done],
                               "epochs": [len(r["curve"]) for r in runs[name]]}
        for key in ("iwae", "elbo", "gap"):
            vals = [r["test"][key] for r in done]
            if vals:
                row[key], row[f"{key}_spread"] = statistics.fmean(vals), max(vals) - min(vals)
        for key in ("approximation_gap", "amortisation_gap", "flexible_gap"):
            vals = [r["gaps"][key] for r in done if "gaps" in r]
            if vals:
                row[key] = statistics.fmean(vals)
                row[f"{key}_seeds"] = len(vals)
        # against the Gaussian VAE of the same seed, image by image (the same binarised images)
        diffs = []
        for r in done:
            g = next((q for q in runs.get("gaussian", []) if q["seed"] == r["seed"] and "test" in q), None)
            if g is not None and name != "gaussian":
                d = torch.tensor(r["test"]["per_example_iwae"], dtype=torch.float64) - torch.tensor(
                    g["test"]["per_example_iwae"], dtype=torch.float64)
                diffs.append((float(d.mean()), float(d.std() / len(d) ** 0.5)))
        if diffs:
            row["iwae_vs_gaussian"] = [m for m, _ in diffs]
            row["iwae_vs_gaussian_se"] = [e for _, e in diffs]
        secs = [c["seconds"] for r in runs[name] for c in r["curve"][1:]]
        loads = [c["loadavg"] for r in runs[name] for c in r["curve"][1:]]
        if secs:
            row["seconds_per_epoch_median"] = statistics.median(secs)
            row["loadavg_median"] = statistics.median(loads)
        table[name] = row

        def cell(key: str, width: int, row: dict[str, Any] = row, seeds: int = len(done)) -> str:
            if key not in row:
                return f"{'':>{width}s}"
            text = f"{row[key]:.2f}" + (f" +-{row[key + '_spread']:.2f}" if seeds > 1 else "")
            return f"{text:>{width}s}"

        def gap(key: str, width: int, row: dict[str, Any] = row) -> str:
            return f"{row[key]:{width}.2f}" if key in row else f"{'':>{width}s}"

        print(f"{name:26s} {len(done):5d} {cell('iwae', 17)} {cell('elbo', 17)} {gap('gap', 6)} "
              f"{gap('approximation_gap', 7)} {gap('amortisation_gap', 7)} {gap('flexible_gap', 6)} "
              f"{row.get('seconds_per_epoch_median', math.nan):8.1f} "
              f"{row.get('loadavg_median', math.nan):5.1f}"
              + ("  vs gaussian: " + ", ".join(f"{m:+.2f} (se {e:.2f})" for m, e in diffs) if diffs else ""))
    if args.rst:
        print_rst(table)
    if args.out is not None and runs:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        colours = dict(zip(FLOW_CONFIGS, ("C0", "C1", "C2", "C3")))
        for name in [c for c in order if c in runs]:
            for i, r in enumerate(runs[name]):
                ep = [c["epoch"] for c in r["curve"]]
                ax.plot(ep, [-c["val_nelbo"] for c in r["curve"]],
                        color=colours[name.removesuffix("-warmup")],
                        ls="--" if name.endswith("-warmup") else "-", lw=1,
                        label=name if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation ELBO (nats/image)")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], ax.get_ylim()[1] - 25))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.savefig(args.out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        print(f"learning curves in {args.out}")
    return {"table": table}


def print_rst(table: dict[str, dict[str, Any]]) -> None:
    """The summary as the reStructuredText table of docs/benchmarks_vae.rst."""
    head = ("configuration", "seeds", "test IWAE", "vs Gaussian", "test ELBO", "gap", "approx.", "amort.",
            "flexible", "s/epoch")
    rows = []
    for name, r in table.items():
        if "iwae" not in r:
            continue
        pm = len(r["seeds"]) > 1

        def mean(key: str, r: dict[str, Any] = r, pm: bool = pm) -> str:
            return f"{r[key]:.2f}" + (f" +-{r[key + '_spread']:.2f}" if pm else "")

        vs = ", ".join(f"{m:+.2f}" for m in r.get("iwae_vs_gaussian", []))
        keys = ("approximation_gap", "amortisation_gap", "flexible_gap")
        gaps = [f"{r[k]:.2f}" if k in r else "" for k in keys]
        rows.append((name, ",".join(map(str, r["seeds"])), mean("iwae"), vs, mean("elbo"), f"{r['gap']:.2f}",
                     *gaps, f"{r.get('seconds_per_epoch_median', math.nan):.1f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    rule = "  ".join("=" * w for w in widths)
    print(rule)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print(rule)
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    print(rule)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("quality", "timing", "curve", "flows", "flows-gaps", "flows-table"))
    p.add_argument("--config", default="gaussian", help="flows: a FLOW_CONFIGS name, or NAME-warmup")
    p.add_argument("--seed", type=int, default=0, help="flows: the run's seed")
    p.add_argument("--kl-warmup", type=int, default=2500, help="flows: steps of the -warmup configurations")
    p.add_argument("--runs", type=Path, default=Path("runs/flows"), help="flows: the runs' folder")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/vae_flows"),
                   help="flows: one JSON per run")
    p.add_argument("--rst", action="store_true", help="flows-table: also as a reStructuredText table")
    p.add_argument("--gap-examples", type=int, default=100, help="flows-gaps: test images decomposed")
    p.add_argument("--gap-steps", type=int, default=300, help="flows-gaps: Adam steps per local posterior")
    p.add_argument("--gap-particles", type=int, default=8, help="flows-gaps: draws per step")
    p.add_argument("--gap-elbo-samples", type=int, default=200, help="flows-gaps: draws per ELBO estimate")
    p.add_argument("--run", type=Path, default=None, help="curve: the run folder")
    p.add_argument("--out", type=Path, default=None, help="curve, flows-table: the figure")
    p.add_argument("--quick", action="store_true", help="smoke test: digits, 2 epochs, K=50")
    p.add_argument("--data", default="digits", choices=("digits", "fashion-mnist", "mnist"))
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--z-dim", type=int, default=16)
    p.add_argument("--hidden", type=_ints, default=[512, 256])
    p.add_argument("--num-flows", type=int, default=4)
    p.add_argument("--flow-hidden", type=_ints, default=[128, 128])
    p.add_argument("--particles", type=int, default=5, help="K of the IWAE objective")
    p.add_argument("--posteriors", default="none,nice,realnvp")
    p.add_argument("--objectives", default="elbo,iwae")
    p.add_argument("--seeds", type=_ints, default=[0])
    p.add_argument("--elbo-particles", type=int, default=10)
    p.add_argument("--iwae-k", type=int, default=5000)
    p.add_argument("--iwae-examples", type=int, default=180)
    p.add_argument("--no-pyro-example", dest="pyro_example", action="store_false")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timing-steps", type=int, default=50)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    args.posteriors = [s.strip() for s in args.posteriors.split(",")]
    args.objectives = [s.strip() for s in args.objectives.split(",")]
    if args.quick:
        args.data, args.epochs, args.iwae_k, args.iwae_examples = "digits", 2, 50, 40
        args.hidden, args.flow_hidden, args.repeats, args.timing_steps = [64], [16], 2, 5
        args.kl_warmup = 10
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    machine = _machine(1)
    out = {"quality": quality, "timing": timing, "curve": curve, "flows": flows, "flows-gaps": flows_gaps,
           "flows-table": flows_table}[args.what](args)
    out.update(machine=machine, loadavg_end=__import__("os").getloadavg(), command=sys.argv,
               settings={k: v for k, v in vars(args).items() if k != "json"})
    print(f"load average at the start {machine['loadavg_start']}, at the end {out['loadavg_end']}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
