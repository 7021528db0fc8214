"""Test bits/dim of coupling flows at an equal step budget, selected on validation.

On scikit-learn digits (8x8, 17 levels) or Fashion-MNIST (28x28, 256 levels), flattened
to vectors, this trains

* ours: ``pyro_genext.realnvp`` (8 affine couplings, each followed by the recipe's
  default actnorm; ``ours-plain``: the couplings alone, the peers' architecture) and
  ``pyro_genext.nice`` (4 additive couplings and a scaling);
* the peers at equal architecture: nflows, normflows, zuko and Pyro's ``AffineCoupling``
  (8 affine couplings), built by the throughput benchmark's builders (``_peers``, through
  ``_quality_peers``);

every conditioner an MLP ``half -> width -> width -> out`` (width 256), with Adam (lr
1e-3, no clipping) on batches of 64 for ``--steps`` steps. Validation bits/dim are
evaluated every ``--eval-every`` steps and at the last step; the parameters with the best
validation bits/dim are kept and the test bits/dim reported are theirs (the test set is
never used to select). The test bits/dim of the last step's parameters are reported too.

Every implementation sees the same pre-processing and the same data stream: for a seed,
the same batches and the same dequantization noise ``u ~ U[0, 1)``; the same
``LogitPreprocess`` (alpha 0.05, the default of ``FlowDensity``) maps the dequantized
levels to the flow's space, and its log-Jacobian is added to each flow's log-density, so
bits/dim are on the discrete data scale for all of them (``log2(levels)`` is the uniform
model: 4.09 for digits, 8 for Fashion-MNIST). For ours this is checked against
``FlowDensity.log_prob`` at start-up. Validation and test bits/dim use one fixed
dequantization draw (seed 1234, as ``pyro_genext.training.evaluate``).

A run counts as diverged if its training loss became NaN or infinite (training stops
there) or its last validation bits/dim are NaN, infinite or above 8.

Usage::

    .venv/bin/python benchmarks/quality.py --quick                  # smoke test, < 60 s
    .venv/bin/python benchmarks/quality.py --data digits --seeds 0,1,2 --json digits.json
    .venv/bin/python benchmarks/quality.py --data fashion-mnist --steps 1500 --eval-every 250
    .venv/bin/python benchmarks/quality.py --init library           # peers' own last-layer init
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from _quality_peers import IMPLEMENTATIONS, INITS, Model, Unavailable, build  # noqa: E402
from throughput import _machine  # noqa: E402

from pyro_genext.data import load_dataset  # noqa: E402
from pyro_genext.metrics import bits_per_dim  # noqa: E402
from pyro_genext.models import FlowDensity  # noqa: E402
from pyro_genext.transforms import LogitPreprocess, initialize  # noqa: E402

ALPHA = 0.05
EVAL_SEED = 1234
DIVERGED_BPD = 8.0


# ---------------------------------------------------------------------------- data
class Data:
    """The splits, flattened, and the pre-processing every implementation shares."""

    def __init__(self, name: str, eval_points: int | None = None) -> None:
        splits = {
            s: load_dataset(name, s, num_points=None if s == "train" else eval_points)
            for s in ("train", "val", "test")
        }
        self.name = name
        self.levels = int(splits["train"].levels)  # type: ignore[arg-type]
        self.train = splits["train"].x.flatten(1)
        self.dim = self.train.shape[1]
        self.pre = LogitPreprocess(self.dim, self.levels, ALPHA)
        gen = torch.Generator().manual_seed(EVAL_SEED)
        # one fixed dequantization draw for validation and test, shared by every model
        self.val_deq = self._dequantize(splits["val"].x.flatten(1), gen)
        self.test_deq = self._dequantize(splits["test"].x.flatten(1), gen)
        self.val = self.to_flow_space(self.val_deq)
        self.test = self.to_flow_space(self.test_deq)

    @staticmethod
    def _dequantize(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x + torch.rand(x.shape, generator=gen)

    def to_flow_space(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z = pre^{-1}(x)`` and ``log|det d pre/dz|`` at ``z`` (shape ``(N,)``)."""
        z = self.pre.inv(x)
        return z, self.pre.log_abs_det_jacobian(z, x)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val[0]), "test": len(self.test[0])}


def _bpd(lp: torch.Tensor, dim: int) -> float:
    """Mean bits/dim of data-scale log-densities ``lp``; NaN if any is NaN or +inf."""
    if torch.isnan(lp).any() or (lp == math.inf).any():
        return math.nan
    return float(bits_per_dim(lp, (dim,)).mean())


def evaluate(model: Model, split: tuple[torch.Tensor, torch.Tensor], dim: int) -> float:
    """Bits/dim on the discrete data scale of one pre-processed split."""
    z, ladj = split
    model.module.eval()
    with torch.no_grad():
        lp = torch.cat([
            model.log_prob(z[i : i + 1000].clone()) - ladj[i : i + 1000]
            for i in range(0, len(z), 1000)
        ])
    model.module.train()
    return _bpd(lp, dim)


def check_preprocessing(data: Data, width: int) -> float:
    """Largest gap between ours through the shared pipeline and ``FlowDensity.log_prob``
    (a model with a few steps of training, so the flow is not the identity)."""
    torch.manual_seed(0)
    model = build("ours-realnvp", data.dim, width)
    opt = torch.optim.Adam(model.module.parameters(), lr=1e-3)
    z, ladj = data.val
    for _ in range(3):
        loss = -(model.log_prob(z[:64].clone()) - ladj[:64]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    density = FlowDensity(model.module, levels=data.levels, alpha=ALPHA)  # type: ignore[arg-type]
    with torch.no_grad():
        ours = model.log_prob(z[:64].clone()) - ladj[:64]
        theirs = density.log_prob(data.val_deq[:64])
    gap = float((ours - theirs).abs().max())
    if not gap <= 1e-3 * float(theirs.abs().max()):
        raise AssertionError(f"shared pre-processing disagrees with FlowDensity.log_prob by {gap}")
    return gap


# ---------------------------------------------------------------------------- training
def run(name: str, data: Data, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Train one implementation for ``args.steps`` steps; select on validation."""
    torch.manual_seed(seed)
    model = build(name, data.dim, args.width, args.init)
    opt = torch.optim.Adam(model.module.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)  # batches and noise: the same for every model
    n = len(data.train)
    perm, pos = torch.randperm(n, generator=gen), 0
    history: list[tuple[int, float]] = []
    best, best_step, best_state = math.inf, 0, None
    stopped = ""
    step = 0
    start = time.perf_counter()
    while step < args.steps:
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        x = data.train[perm[pos : pos + args.batch]]
        pos += args.batch
        z, ladj = data.to_flow_space(x + torch.rand(x.shape, generator=gen))
        if step == 0 and name.startswith("ours"):
            # the data-dependent start-up of ours' actnorms, on the first training batch
            initialize(model.module, z)
        try:
            loss = -(model.log_prob(z) - ladj).mean()
            if not torch.isfinite(loss):
                stopped = f"training loss {float(loss.detach())} at step {step + 1}"
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
        except (ValueError, RuntimeError) as err:  # e.g. a library's own NaN checks
            stopped = f"{type(err).__name__} at step {step + 1}: {str(err).splitlines()[0][:120]}"
            break
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, data.val, data.dim)
            history.append((step, val))
            if val < best:
                best, best_step = val, step
                best_state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    final_val = evaluate(model, data.val, data.dim)
    if not history or history[-1][0] != step:
        history.append((step, final_val))
    final_test = evaluate(model, data.test, data.dim)
    test = math.nan
    if best_state is not None:
        model.module.load_state_dict(best_state)
        test = evaluate(model, data.test, data.dim)
    wall = time.perf_counter() - start
    diverged = bool(stopped) or not (final_val <= DIVERGED_BPD)  # NaN compares False
    vals = [v for _, v in history]
    return {
        "implementation": name, "seed": seed, "init": args.init, "params": model.params,
        "steps": step, "best_val_bpd": best if best_state is not None else math.nan,
        "best_step": best_step, "test_bpd": test, "final_val_bpd": final_val,
        "final_test_bpd": final_test,
        "worst_val_bpd": max(vals, key=lambda v: math.inf if math.isnan(v) else v),
        "diverged": diverged, "stopped": stopped, "wall_s": wall, "history": history,
        "note": model.note,
    }


# ---------------------------------------------------------------------------- report
def _f(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else str(v)


def _markdown(head: list[str], body: list[list[str]]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["implementation", "seed", "params", "best val bpd (step)", "test bpd", "final val bpd",
            "final test bpd", "worst val bpd", "wall s", "diverged"]
    body = []
    for r in rows:
        div = "yes" if r["diverged"] else "no"
        if r["stopped"]:
            div += f" ({r['stopped']})"
        body.append([
            r["implementation"], str(r["seed"]), f"{r['params']:,}",
            f"{_f(r['best_val_bpd'])} ({r['best_step']})", _f(r["test_bpd"]),
            _f(r["final_val_bpd"]), _f(r["final_test_bpd"]), _f(r["worst_val_bpd"]),
            f"{r['wall_s']:.0f}", div,
        ])
    return _markdown(head, body)


def _mean_sd(vs: list[float]) -> str:
    if any(not math.isfinite(v) for v in vs):
        return "nan" if any(math.isnan(v) for v in vs) else "inf"
    if len(vs) == 1:
        return f"{vs[0]:.3f}"
    return f"{statistics.mean(vs):.3f} ± {statistics.stdev(vs):.3f}"


def summary(rows: list[dict[str, Any]]) -> str:
    head = ["implementation", "seeds", "test bpd (best on val)", "final test bpd", "diverged"]
    body = []
    for name in dict.fromkeys(r["implementation"] for r in rows):
        rs = [r for r in rows if r["implementation"] == name]
        body.append([
            name, str(len(rs)), _mean_sd([r["test_bpd"] for r in rs]),
            _mean_sd([r["final_test_bpd"] for r in rs]),
            f"{sum(r['diverged'] for r in rs)}/{len(rs)}",
        ])
    return _markdown(head, body)


def verdict(rows: list[dict[str, Any]]) -> str:
    """Which implementation has the lowest mean test bpd (selected on validation)."""
    means = {}
    for name in dict.fromkeys(r["implementation"] for r in rows):
        vs = [r["test_bpd"] for r in rows if r["implementation"] == name]
        means[name] = statistics.mean(vs) if all(math.isfinite(v) for v in vs) else math.inf
    order = sorted(means, key=means.__getitem__)
    return "ranking by mean test bpd: " + ", ".join(f"{n} {_f(means[n])}" for n in order)


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("digits", "fashion-mnist"), default="digits")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 3000)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="validation every K steps (default 100 on digits, 250 on fashion-mnist)")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (init, batches)")
    p.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                   help=f"implementations, from {','.join(IMPLEMENTATIONS)}")
    p.add_argument("--init", choices=INITS, default="zero",
                   help="last conditioner layer of the peers: zero (equal architecture) or "
                        "library (each library's default)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--quick", action="store_true", help="smoke test, under a minute")
    p.add_argument("--json", type=Path, default=None, help="also save the results here")
    args = p.parse_args(argv)
    fm = args.data == "fashion-mnist"
    args.steps = args.steps if args.steps is not None else (60 if fm else 200) if args.quick else 3000
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 4) if args.quick else 250 if fm else 100
    args.eval_points = 500 if args.quick and fm else None
    try:
        args.seeds = [int(s) for s in args.seeds.replace(",", " ").split()]
    except ValueError:
        p.error(f"--seeds: expected integers, got {args.seeds!r}")
    args.impls = args.impls.replace(",", " ").split()
    for name in args.impls:
        if name not in IMPLEMENTATIONS:
            p.error(f"--impls: expected names from {sorted(IMPLEMENTATIONS)}, got {name!r}")
    for name in ("steps", "eval_every", "width", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not args.seeds:
        p.error("--seeds: expected at least one seed")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr: expected > 0, got {args.lr}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.distributions.Distribution.set_default_validate_args(False)
    import pyro

    pyro.enable_validation(False)
    machine = _machine(args.threads)
    data = Data(args.data, args.eval_points)
    gap = check_preprocessing(data, args.width)
    print(f"# Test bits/dim on {args.data}: {args.steps} steps, batch {args.batch}, Adam lr "
          f"{args.lr}, width {args.width}, peers' init: {args.init}, seeds {args.seeds}")
    print(f"cpu: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), torch threads: "
          f"{args.threads}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print(f"load average at start: {', '.join(f'{v:.2f}' for v in machine['loadavg_start'])}")
    print(f"data: {data.sizes()} images of D={data.dim}, {data.levels} levels "
          f"(uniform model: {math.log2(data.levels):.3f} bpd); validation every "
          f"{args.eval_every} steps; pre-processing matches FlowDensity.log_prob "
          f"(max gap {gap:.1e} nats)\n", flush=True)

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    start = time.perf_counter()

    def save() -> None:  # after every run, so that an interrupted run keeps what it measured
        machine["loadavg_end"] = os.getloadavg()
        machine["wall_s"] = time.perf_counter() - start
        if args.json is not None:
            payload = {
                "machine": machine,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "data": {"name": data.name, "dim": data.dim, "levels": data.levels, **data.sizes()},
                "results": rows,
                "notes": list(dict.fromkeys(notes)),
            }
            args.json.write_text(json.dumps(payload, indent=2))

    for seed in args.seeds:
        for name in args.impls:
            try:
                row = run(name, data, args, seed)
            except Unavailable as why:
                notes.append(f"{name}: skipped: {why}")
                continue
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            if row["note"]:
                notes.append(f"{name}: {row['note']}")
            save()
    save()
    print("\n" + table(rows) + "\n\n" + summary(rows) + "\n\n" + verdict(rows))
    for note in dict.fromkeys(notes):
        print(f"- {note}")
    print(f"\nload average at end: {', '.join(f'{v:.2f}' for v in machine['loadavg_end'])}; "
          f"wall time {machine['wall_s']:.0f} s")
    if args.json is not None:
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
