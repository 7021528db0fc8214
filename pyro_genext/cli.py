"""The ``pyro-genext`` command line: train, evaluate and sample flow density models.

::

    pyro-genext train realnvp --data digits --steps 2000 --out runs/digits
    pyro-genext evaluate runs/digits --split test --json
    pyro-genext sample runs/digits --num 64 --out samples.png

Bad arguments exit with status 2 and one line on stderr; every other error (missing or
corrupt checkpoint, unreadable data, an output folder that cannot be written, a diverged
run) exits with status 1 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = ["main", "build_parser"]

PROG = "pyro-genext"


class UsageError(Exception):
    """Bad command-line arguments (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .data import DATASETS
    from .training import MODELS

    p = _Parser(prog=PROG, description="Train, evaluate and sample NICE / RealNVP density models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="fit a flow to a data set by maximum likelihood")
    t.add_argument("model", choices=MODELS)
    t.add_argument("--data", required=True, choices=DATASETS, metavar="{" + ",".join(DATASETS) + "}")
    t.add_argument("--out", required=True, type=Path, help="folder for checkpoints")
    budget = t.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_nonneg_int, help="optimisation steps (0: save untrained)")
    budget.add_argument("--epochs", type=_nonneg_int, help="passes over the training split")
    t.add_argument("--batch-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=_positive_float, default=1e-3)
    t.add_argument("--seed", type=_nonneg_int, default=0)
    t.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    t.add_argument("--root", default=None, help="folder holding the data files")
    t.add_argument("--num-layers", type=_positive_int, default=None,
                   help="couplings of a vector flow (default: nice 4, realnvp 8)")
    t.add_argument("--hidden", type=_positive_int, default=None,
                   help="conditioner width (default: 256 dense units, or 64 channels for images)")
    t.add_argument("--num-blocks", type=_positive_int, default=2, help="ResNet blocks per conditioner")
    t.add_argument("--clip-norm", type=_positive_float, default=10.0,
                   help="clip each parameter's gradient norm to this before Adam's update")
    t.add_argument("--scale-bound", type=_positive_float, default=2.0,
                   help="bound of each RealNVP coupling's log-scale (default 2)")
    t.add_argument("--checkpoint-every", type=_positive_int, default=500, help="steps between checkpoints")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or log lines")

    e = sub.add_parser("evaluate", help="bits/dim of a trained model on a split")
    e.add_argument("run", type=Path, help="a training output folder or checkpoint file")
    e.add_argument("--split", choices=("train", "val", "test"), default="test")
    e.add_argument("--checkpoint", choices=("best", "last"), default="best")
    e.add_argument("--root", default=None, help="folder holding the data files")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    s = sub.add_parser("sample", help="draw samples to a PNG")
    s.add_argument("run", type=Path, help="a training output folder or checkpoint file")
    s.add_argument("--num", type=_positive_int, default=64)
    s.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    s.add_argument("--seed", type=_nonneg_int, default=0)
    s.add_argument("--checkpoint", choices=("best", "last"), default="best")
    return p


def _checkpoint_path(run: Path, which: str) -> Path:
    return run / f"{which}.pt" if run.is_dir() else run


def _cmd_train(args: argparse.Namespace) -> int:
    from .training import TrainConfig, train

    cfg = TrainConfig(
        model=args.model, data=args.data, steps=args.steps, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
        root=args.root, num_layers=args.num_layers, hidden=args.hidden,
        num_blocks=args.num_blocks, clip_norm=args.clip_norm,
        checkpoint_every=args.checkpoint_every, scale_bound=args.scale_bound,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda msg: None) if args.quiet else None
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet, log=log)
    if not args.quiet:
        print(f"best validation bits/dim {summary['best_val_bpd']:.4f} after {summary['steps']} steps; "
              f"checkpoints in {args.out}", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .training import density_from_checkpoint, evaluate, load_checkpoint

    state = load_checkpoint(_checkpoint_path(args.run, args.checkpoint))
    density, cfg, _ = density_from_checkpoint(state)
    data = load_dataset(cfg.data, args.split, root=args.root or cfg.root, seed=cfg.seed)
    bpd = evaluate(density, data.x)
    result: dict[str, Any] = {
        "bits_per_dim": bpd, "split": args.split, "data": cfg.data, "model": cfg.model,
        "step": state["step"], "num_examples": len(data),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{cfg.model} on {cfg.data} ({args.split}, {len(data)} examples, step {state['step']}): "
              f"{bpd:.4f} bits/dim")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .plots import save_samples
    from .training import density_from_checkpoint, load_checkpoint

    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out: expected a .png file, got {args.out}")
    if not args.out.parent.exists():
        raise OSError(f"output folder {args.out.parent} does not exist")
    state = load_checkpoint(_checkpoint_path(args.run, args.checkpoint))
    density, cfg, data = density_from_checkpoint(state)
    torch.manual_seed(args.seed)
    save_samples(density, data, args.num, args.out)
    print(f"wrote {args.num} samples to {args.out}", file=sys.stderr)
    return 0


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "sample": _cmd_sample}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-genext`` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (the last checkpoint was saved)", file=sys.stderr)
        return 130
    except Exception as e:  # one line, no traceback
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else type(e).__name__
    return msg if isinstance(e, (ValueError, OSError, RuntimeError)) else f"{type(e).__name__}: {msg}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
