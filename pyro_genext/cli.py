"""The ``pyro-genext`` command line: train, evaluate and sample every model kind.

::

    pyro-genext train realnvp --data digits --steps 2000 --out runs/digits
    pyro-genext train realnvp --out runs/digits --resume --steps 4000
    pyro-genext evaluate runs/digits --split test --json
    pyro-genext sample runs/digits --num 64 --out samples.png

``MODEL`` is any kind registered with :mod:`pyro_genext.engine` (``pyro-genext train
MODEL --help`` lists its own flags); ``evaluate`` and ``sample`` rebuild the model from
the kind and settings its checkpoint records. Bad arguments exit with status 2, every
other error (missing or corrupt checkpoint, missing data, an output path that cannot be
written, a diverged run) with status 1; either way the whole message is printed on
stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import torch

from .engine import nonneg_int, positive_int
from .engine.settings import SettingsParser

__all__ = ["main", "build_parser"]

PROG = "pyro-genext"


class UsageError(Exception):
    """Bad command-line arguments (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class _TrainParser(SettingsParser, _Parser):
    """``train MODEL``: the namespace holds only the flags given (see SettingsParser)."""


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags evaluate and sample share: which run, where its data are, how to compute."""
    p.add_argument("run", type=Path, help="a training run folder or checkpoint file")
    p.add_argument("--checkpoint", choices=("best", "last"), default=None,
                   help="which checkpoint of a run folder (default: best.pt, or last.pt for a "
                        "run stopped before its first validation)")
    p.add_argument("--root", default=None, help="folder holding the data files (default: the run's)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: the model's fastest)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def _add_evaluate_arguments(e: argparse.ArgumentParser) -> None:
    _add_run_arguments(e)
    e.add_argument("--split", choices=("train", "val", "test"), default="test",
                   help="the split to score (default: test)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_sample_arguments(s: argparse.ArgumentParser) -> None:
    _add_run_arguments(s)
    s.add_argument("--num", type=positive_int, default=64, help="how many samples (default: 64)")
    s.add_argument("--out", required=True, type=Path, help="the PNG file to write")
    s.add_argument("--seed", type=nonneg_int, default=0, help="seeds the draw (default: 0)")


def _add_kinds_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """Every kind's own flags of ``command``, one group per kind, so that the run folder is
    found wherever it stands among them (``evaluate --num-samples 10 RUN``); once the
    checkpoint names the kind, its flags alone are parsed again (:func:`_load_run`). ``p``
    resolves a flag two kinds share by keeping the later one: here only its arity counts."""
    from .engine import kinds

    for name, kind in kinds().items():
        add = getattr(kind, f"add_{command}_arguments")
        if add is not None:  # a group takes the same add_argument calls as a parser
            add(cast(argparse.ArgumentParser, p.add_argument_group(f"flags of {name} runs")))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (``train`` has one sub-command per registered model kind)."""
    from . import __version__
    from .engine import add_train_arguments, kinds

    p = _Parser(prog=PROG, description="Train, evaluate and sample deep generative models for Pyro.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (pyro-genext train MODEL --help for its flags)",
                       description="Train a model; MODEL --help lists its flags.")
    models = t.add_subparsers(dest="model", required=True, parser_class=_TrainParser,
                              metavar="MODEL")
    for name, kind in kinds().items():
        m = models.add_parser(name, help=kind.summary, description=kind.summary)
        add_train_arguments(m, kind)

    e = sub.add_parser("evaluate", help="score a trained model on a split",
                       conflict_handler="resolve")
    _add_evaluate_arguments(e)
    _add_kinds_arguments(e, "evaluate")
    s = sub.add_parser("sample", help="draw samples into a picture", conflict_handler="resolve")
    _add_sample_arguments(s)
    _add_kinds_arguments(s, "sample")
    return p


def _checkpoint_path(run: Path, which: str | None) -> Path:
    if not run.is_dir() or which is None:  # load_checkpoint: a folder's best.pt, else last.pt
        return run
    return run / f"{which}.pt"


def _set_threads(given: int | None, default: int) -> None:
    torch.set_num_threads(given or default)


def _cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from .engine import INVOCATION, check_settings, default_settings, describe_result, fit, get_kind

    kind = get_kind(args.model)
    given = {k: v for k, v in vars(args).items() if k not in ("command", "model")}
    control = {k: given.pop(k) for k in INVOCATION if k in given}
    resume = bool(control.get("resume", False))
    if control.get("out") is None:
        raise UsageError("the following arguments are required: --out")
    if not resume:
        if "data" not in given:
            raise UsageError("the following arguments are required: --data")
        try:
            check_settings({**default_settings(kind), **given}, kind)
        except ValueError as e:
            raise UsageError(str(e)) from None
    _set_threads(control.get("threads"), kind.default_threads)
    quiet = bool(control.get("quiet", False))
    result = fit(kind, given, control["out"], resume=resume,
                 overwrite=bool(control.get("overwrite", False)), progress=not quiet,
                 log=(lambda msg: None) if quiet else None)
    from .distributed import context

    if context().is_main:  # under torchrun, rank 0 reports for the run
        print(describe_result(result), file=sys.stderr)
    return 0


def _load_run(
    args: argparse.Namespace, command: str, rest: list[str]
) -> tuple[Any, Any, argparse.Namespace, dict]:
    """Load the checkpoint, then parse the command's flags again with the kind's own."""
    from .engine import load_checkpoint, module_from_checkpoint

    state = load_checkpoint(_checkpoint_path(args.run, args.checkpoint))
    module, kind, settings = module_from_checkpoint(state)
    extra = getattr(kind, f"add_{command}_arguments")
    q = _Parser(prog=f"{PROG} {command}")
    (_add_evaluate_arguments if command == "evaluate" else _add_sample_arguments)(q)
    if extra is not None:
        extra(q)
    full = q.parse_args(rest)
    full.kind = kind.name
    full.settings = settings
    full.step = state["step"]
    _set_threads(full.threads, kind.default_threads)
    return module.to(_device(full.device)), kind, full, state


def _device(name: str) -> torch.device:
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device: {name!r} requested but CUDA is not available")
    return torch.device(name)


def _cmd_evaluate(args: argparse.Namespace, rest: list[str]) -> int:
    from .data import load_dataset

    module, kind, full, state = _load_run(args, "evaluate", rest)
    s = full.settings
    data = load_dataset(s["data"], full.split, root=full.root or s.get("root"), seed=s["seed"])
    with torch.no_grad():
        scores = kind.evaluate(module, data, full)
    # num_examples: how many examples were scored (a kind that scores part of the split
    # says so under this key)
    result: dict[str, Any] = {"num_examples": len(data), **scores, "split": full.split,
                              "data": s["data"], "model": kind.name, "step": state["step"]}
    if full.json:
        print(json.dumps(result))
    else:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in scores.items() if k != "num_examples")
        print(f"{kind.name} on {s['data']} ({full.split}, {result['num_examples']} examples, "
              f"step {state['step']}): {shown}")
    return 0


def _cmd_sample(args: argparse.Namespace, rest: list[str]) -> int:
    from .data import load_dataset

    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out: expected a .png file, got {args.out}")
    if not args.out.parent.exists():
        raise OSError(f"output folder {args.out.parent} does not exist")
    module, kind, full, _ = _load_run(args, "sample", rest)
    s = full.settings
    data = load_dataset(s["data"], "test", root=full.root or s.get("root"), seed=s["seed"])
    with torch.no_grad():
        paths = kind.sample(module, data, full)
    print(f"wrote {full.num} samples to {', '.join(str(q) for q in paths)}", file=sys.stderr)
    return 0


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "sample": _cmd_sample}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-genext`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, unknown = build_parser().parse_known_args(argv)
        rest = argv[argv.index(args.command) + 1 :]
        if unknown and args.command == "train":
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
        return COMMANDS[args.command](args, rest)
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (--resume continues from the last checkpoint)", file=sys.stderr)
        return 130
    except Exception as e:  # the whole message, no traceback
        print(f"{PROG}: error: {_message(e)}", file=sys.stderr)
        return 1
    finally:
        from .distributed import teardown

        teardown()  # leave the process group of a run under torchrun, if one was joined


def _message(e: BaseException) -> str:
    """The exception's whole message (every line), prefixed by its type unless it is one of
    the errors whose message says everything."""
    msg = str(getattr(e, "command_line_message", None) or e).strip() or type(e).__name__
    return msg if isinstance(e, (ValueError, OSError, RuntimeError)) else f"{type(e).__name__}: {msg}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
