"""Plumbing the tutorials share: their command-line flags, the set-up, and reporting.

Nothing here is part of the lessons; read the tutorials themselves first.

Every tutorial takes the same flags:

* ``--smoke``: tiny settings that run in seconds on one thread (the test suite runs this);
* ``--out DIR``: where pictures and ``results.json`` go (default ``tutorials/out/<name>``);
* ``--steps N``: training steps, overriding the mode's default;
* ``--seed S``: seeds the data split, the initialisation and the training noise;
* ``--json``: also write the printed numbers to ``DIR/results.json``;
* ``--threads T``: torch's CPU threads (default 1: these models are small, and on a
  shared machine more threads oversubscribe the cores; on a shared 2-core machine the
  NICE tutorial ran 14 times slower with 2 threads than with 1);
* ``--data``: which data set (or sets).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import torch

HERE = Path(__file__).resolve().parent


def parser(name: str, doc: str, data: Sequence[str], default: str | Sequence[str]) -> argparse.ArgumentParser:
    """The flags every tutorial takes; ``--data`` takes one name, or several when
    ``default`` is a list (``all`` then means every name in ``data``)."""
    p = argparse.ArgumentParser(
        prog=f"python tutorials/{name}.py",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true",
                   help="tiny settings, seconds on one thread (what the tests run)")
    p.add_argument("--out", type=Path, default=HERE / "out" / name,
                   help=f"folder for pictures and results.json (default tutorials/out/{name})")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the mode's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="also write the numbers to OUT/results.json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    if isinstance(default, str):
        p.add_argument("--data", choices=list(data), default=default,
                       help=f"data set (default {default})")
    else:
        p.add_argument("--data", nargs="+", choices=[*data, "all"], default=list(default),
                       help=f"data sets, or 'all' (default: {' '.join(default)})")
    return p


def setup(args: argparse.Namespace, smoke_steps: int, full_steps: int) -> argparse.Namespace:
    """Apply the flags: the number of steps, threads, seeds and the output folder."""
    if args.steps is None:
        args.steps = smoke_steps if args.smoke else full_steps
    if args.steps < 1:
        raise SystemExit(f"expected --steps >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    args.out.mkdir(parents=True, exist_ok=True)
    args.started = time.perf_counter()
    return args


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Print the key numbers and, with ``--json``, write them to ``OUT/results.json``.

    Adds the wall-clock seconds since :func:`setup`, the mode and the thread count."""
    results = {
        **results,
        "mode": "smoke" if args.smoke else "full",
        "steps": args.steps,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - args.started, 1),
    }
    print("\nresults")
    for key, value in _flatten(results):
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {key:<36} {text}")
    if args.json:
        path = args.out / "results.json"
        path.write_text(json.dumps(results, indent=2, default=_finite_or_str) + "\n")
        print(f"numbers written to {path}")


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((prefix + key, value))
    return rows


def _finite_or_str(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        v = float(value)
        return v if math.isfinite(v) else str(v)
    return str(value)
