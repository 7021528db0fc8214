"""The main job on built-in data, as ``make demo`` runs it.

Trains a multi-scale RealNVP on scikit-learn's digits (8x8 images, 17 grey levels) for a
short budget, reports the test bits/dim of the best-on-validation checkpoint and writes a
grid of samples::

    python -m pyro_genext.demo --out runs/demo [--steps 1500]

It is the same as running::

    pyro-genext train realnvp --data digits --steps 1500 --hidden 32 --num-blocks 1 --out runs/demo
    pyro-genext evaluate runs/demo --split test
    pyro-genext sample runs/demo --num 64 --out runs/demo/samples.png
"""

from __future__ import annotations

import argparse
import sys

from .cli import main as cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyro_genext.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", default="1500")
    p.add_argument("--threads", default="1", help="torch CPU threads (1 is fastest for this small model)")
    args = p.parse_args(argv)
    train = ["train", "realnvp", "--data", "digits", "--steps", args.steps, "--hidden", "32",
             "--num-blocks", "1", "--threads", args.threads, "--out", args.out]
    for command in (
        train,
        ["evaluate", args.out, "--split", "test"],
        ["sample", args.out, "--num", "64", "--out", f"{args.out}/samples.png"],
    ):
        print("$ pyro-genext " + " ".join(command), file=sys.stderr, flush=True)
        status = cli(command)
        if status:
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
