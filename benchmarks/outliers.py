"""Outlier images early in training: the worst validation image, step by step.

Trains a RealNVP with the training engine (:func:`~pyro_genext.engine.fit`, validating
on the first ``--val`` validation images) and, through a callback after every step,
scores those images after every one of the first ``--dense`` steps, then every
``--every`` steps and at the last. Per log-scale bound and seed it prints

* the worst image over the whole run (bits/dim) and the step it was seen at, beside the
  median image at that step,
* the worst image after step ``--dense``,
* the largest training-batch loss of any step (bits/dim of the batch mean),
* the validation mean, median and worst at the last step, and the test bits/dim there
  (the whole test split, with ``--test``).

A bound is ``b`` (the log-scale in ``(-b, b)``) or ``low,high`` (in ``(low, high)``; the
scoring direction multiplies by at most ``e^{-low}``).

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/outliers.py --quick
    PYTHONPATH=. .venv/bin/python benchmarks/outliers.py --data fashion-mnist \\
        --hidden 32 --num-blocks 1 --steps 300 --seeds 0,1,2 --bounds 2 -1,2 --test
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from pyro_genext.data import Dataset, load_dataset  # noqa: E402
from pyro_genext.engine import Trainer, fit  # noqa: E402


def parse_bound(text: str) -> float | tuple[float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"expected a bound b or low,high, got {text!r}")


def run(data: str, variant: tuple[Any, float], seed: int, args: argparse.Namespace,
        tr: Any, va: Any, te: Any) -> dict[str, Any]:
    bound, input_bound = variant
    s = {"data": data, "seed": seed, "scale_bound": bound, "input_bound": input_bound,
         "hidden": args.hidden, "num_blocks": args.num_blocks, "batch_size": args.batch,
         "lr": args.lr, "warmup": args.warmup, "steps": args.steps}
    xv = va.x[: args.val]
    history: list[dict[str, float]] = []
    worst_train = [-math.inf]
    module: list[Any] = []

    def watch(t: Trainer) -> None:
        if t.step:  # the latest training loss, in bits/dim of the batch mean
            d = math.prod(t.module.event_shape) * math.log(2)
            worst_train[0] = max(worst_train[0], t.last_loss / d)
        if t.step <= args.dense or t.step % args.every == 0 or t.step == args.steps:
            v = t.scores(xv)["bpd"].double()
            history.append({"step": t.step, "mean": float(v.mean()), "median": float(v.median()),
                            "worst": float(v.max())})
        module[:] = [t.module]

    start = time.perf_counter()
    small_val = Dataset(name=va.name, x=xv, y=None, levels=va.levels, split="val")
    try:
        fit("realnvp", s, train_data=tr, val_data=small_val, callback=watch, every=1,
            progress=False, log=lambda line: None)
    except FloatingPointError:  # a diverged run: recorded, not fatal to the table
        history.append({"step": len(history), "mean": math.nan, "median": math.nan,
                        "worst": math.nan})
    wall = time.perf_counter() - start
    peak = max(history, key=lambda h: h["worst"] if math.isfinite(h["worst"]) else math.inf)
    late = [h["worst"] for h in history if h["step"] > args.dense]
    out = {"variant": variant, "seed": seed, "worst": peak["worst"], "worst_step": peak["step"],
           "median_then": peak["median"], "worst_late": max(late) if late else math.nan,
           "worst_train": worst_train[0], "final": history[-1], "wall_s": wall,
           "history": history}
    if te is not None:
        from pyro_genext.engine import get_kind, per_example_metrics

        t = per_example_metrics(get_kind("realnvp"), module[0], te.x, seed, "test")["bpd"].double()
        out["test"] = {"mean": float(t.mean()), "median": float(t.median()),
                       "worst": float(t.max())}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--bounds", nargs="+", type=parse_bound, default=[2.0, (-1.0, 2.0)])
    p.add_argument("--input-bounds", nargs="+", type=float, default=[0.0],
                   help="conditioner input bounds (0: off)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--dense", type=int, default=20, help="validate after each of these steps")
    p.add_argument("--every", type=int, default=25, help="then validate every this many steps")
    p.add_argument("--val", type=int, default=1000, help="validation images")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--num-blocks", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=0, help="learning-rate warm-up steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--test", action="store_true", help="score the test split at the end")
    p.add_argument("--quick", action="store_true", help="digits, 30 steps: a smoke test")
    p.add_argument("--json", help="write every run's history to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.steps, args.dense, args.every, args.val = "digits", 30, 5, 10, 200
    torch.set_num_threads(args.threads)
    seeds = [int(v) for v in args.seeds.split(",")]
    print(f"# {args.data}, realnvp hidden {args.hidden} blocks {args.num_blocks}, batch "
          f"{args.batch}, lr {args.lr}, warm-up {args.warmup}, {args.steps} steps, first "
          f"{args.val} val images, {args.threads} thread(s), torch {torch.__version__}")
    variants = [(b, ib) for b in args.bounds for ib in args.input_bounds]

    def name(variant: tuple[Any, float]) -> str:
        b, ib = variant
        return f"scale {b}, input {ib:g}" if ib else f"scale {b}, input off"

    rows = []
    for seed in seeds:
        tr = load_dataset(args.data, "train", seed=seed)
        va = load_dataset(args.data, "val", seed=seed)
        te = load_dataset(args.data, "test", seed=seed) if args.test else None
        for variant in variants:
            r = run(args.data, variant, seed, args, tr, va, te)
            rows.append(r)
            f = r["final"]
            test = f" test {r['test']['mean']:.4f}" if "test" in r else ""
            print(f"{name(variant):>28} seed {seed}: worst {r['worst']:.1f} at step "
                  f"{r['worst_step']} (median {r['median_then']:.2f}), after step "
                  f"{args.dense} {r['worst_late']:.2f}, worst batch {r['worst_train']:.1f}; "
                  f"final val {f['mean']:.4f}/{f['median']:.4f}/{f['worst']:.2f}{test} "
                  f"({r['wall_s']:.0f} s)", flush=True)
    print()
    print("| variant | seeds | worst image (max over seeds) | worst after step "
          f"{args.dense} | worst batch | final val mean (sd) | final val worst | test mean (sd) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for variant in variants:
        rs = [r for r in rows if r["variant"] == variant]

        def ms(values: list[float]) -> str:
            if len(values) < 2:
                return f"{values[0]:.4f}"
            return f"{statistics.mean(values):.4f} ({statistics.stdev(values):.4f})"

        test = ms([r["test"]["mean"] for r in rs]) if all("test" in r for r in rs) else "-"
        print(f"| {name(variant)} | {len(rs)} | {max(r['worst'] for r in rs):.1f} | "
              f"{max(r['worst_late'] for r in rs):.2f} | {max(r['worst_train'] for r in rs):.1f} | "
              f"{ms([r['final']['mean'] for r in rs])} | "
              f"{max(r['final']['worst'] for r in rs):.2f} | {test} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
