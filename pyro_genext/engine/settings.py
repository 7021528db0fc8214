"""A run's settings: the engine's common settings stated once, the kinds' own, their checks,
and how a resumed run merges what it is given with what its checkpoint holds.

Every setting is a ``train`` flag and a key of the ``settings`` dict that :func:`fit`
takes (``--batch-size`` is ``batch_size``). :data:`COMMON` declares the engine's settings
once, with their defaults, types and help; a kind adds its own through its
``add_arguments`` hook. The command line and :func:`default_settings` read both from the
same parser, so a default is written in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..data import DATASETS
from .kind import ModelKind

__all__ = [
    "Setting",
    "COMMON",
    "INVOCATION",
    "RUN_CONTROL",
    "BUDGET",
    "SettingsParser",
    "add_train_arguments",
    "default_settings",
    "check_settings",
    "resume_settings",
    "budget",
    "flag",
    "positive_int",
    "nonneg_int",
    "positive_float",
    "nonneg_float",
]

#: Settings that a resumed run may change: where the data are, the device, how often to
#: checkpoint and log, whether the step is compiled.
RUN_CONTROL = ("root", "device", "checkpoint_every", "log_interval", "compile", "compile_mode")
#: The budget, which a resumed run may raise.
BUDGET = ("steps", "epochs")
#: Flags that steer one invocation and are not settings of the run.
INVOCATION = ("out", "resume", "overwrite", "quiet", "threads")


def flag(key: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


# ------------------------------------------------------------------- value types
class _Number:
    """An argparse type that parses a flag's text and a check of a Python value, from one
    statement of what is expected (``whole`` numbers or finite numbers, ``> low`` or
    ``>= low``)."""

    def __init__(self, whole: bool, low: float, strict: bool) -> None:
        self.whole, self.low, self.strict = whole, low, strict
        kind = "a whole number" if whole else "a finite number"
        bound = f"> {low:g}" if strict else f">= {low:g}"
        self.expected = f"{kind} {bound}"
        self.__name__ = self.expected  # argparse names the type in its messages

    def ok(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if self.whole else (int, float)):
            return False
        return math.isfinite(v) and (v > self.low if self.strict else v >= self.low)

    def __call__(self, text: str) -> Any:
        try:
            v = int(text) if self.whole else float(text)
        except ValueError:
            what = "a whole number" if self.whole else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text}")
        return v

    def check(self, key: str, v: Any) -> None:
        """Raise ``ValueError`` naming the flag unless ``v`` is expected."""
        if not self.ok(v):
            raise ValueError(f"{flag(key)}: expected {self.expected}, got {v!r}")


positive_int = _Number(whole=True, low=1, strict=False)
nonneg_int = _Number(whole=True, low=0, strict=False)
positive_float = _Number(whole=False, low=0, strict=True)
nonneg_float = _Number(whole=False, low=0, strict=False)


# ------------------------------------------------------------ the common settings
@dataclasses.dataclass(frozen=True)
class Setting:
    """One of the engine's settings: its key, default, type (an argparse type with a
    ``check``), choices and help. ``default`` may be a function of the kind."""

    key: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    flag_only: bool = False  # a switch (store_true), not a value

    def default_for(self, kind: ModelKind) -> Any:
        return self.default(kind) if callable(self.default) else self.default


COMMON: tuple[Setting, ...] = (
    Setting("data", None, "the data set (required, except with --resume)", choices=DATASETS),
    Setting("out", None, "the run folder for checkpoints (required)", type=Path),
    Setting("steps", None, "optimisation steps (0: save the untrained model; default: 10 "
            "epochs)", type=nonneg_int),
    Setting("epochs", None, "passes over the training split (default: 10)", type=nonneg_int),
    Setting("batch_size", 64, "examples per step; at most the size of the training split",
            type=positive_int),
    Setting("lr", 1e-3, "Adam's learning rate", type=positive_float),
    Setting("warmup", lambda kind: kind.default_warmup,
            "steps over which the learning rate rises linearly from lr/N to lr (0: none)",
            type=nonneg_int),
    Setting("clip_norm", 10.0, "before each update, clip the gradient of EACH parameter tensor "
            "to this norm (as Pyro's clip_args; not the total norm); the loss is per example",
            type=positive_float),
    Setting("seed", 0, "seeds the data split, the initialisation and every random draw",
            type=nonneg_int),
    Setting("device", "cpu", "cpu, cuda or cuda:N"),
    Setting("autocast", "none", "bf16: the networks compute in bfloat16 under torch.autocast, "
            "the element-wise maps and log-determinants stay in float32", choices=("none", "bf16")),
    Setting("compile", False, "compile the whole training step (loss, backward, clipping, "
            "update) with torch.compile; the first step pays the compilation, reported in the "
            "log", flag_only=True),
    Setting("compile_mode", "auto", "torch.compile's mode with --compile; auto: reduce-overhead "
            "(CUDA graphs) on a GPU, default on the CPU",
            choices=("auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs")),
    Setting("root", None, "folder holding the data files (default: the standard places)"),
    Setting("checkpoint_every", 500, "steps between checkpoints (also at every validation)",
            type=positive_int),
    Setting("log_interval", 30.0, "seconds between validation log lines (0: every validation)",
            type=nonneg_float),
    Setting("threads", None, "CPU threads for torch (default: {threads}, the fastest measured "
            "for {name}; torch's own default, all cores, was slower)", type=positive_int),
    Setting("resume", False, "continue the run in --out from last.pt with its settings "
            "(a larger --steps/--epochs trains longer)", flag_only=True),
    Setting("overwrite", False, "replace a run already in --out", flag_only=True),
    Setting("quiet", False, "no progress bar or log lines; the final summary line stays",
            flag_only=True),
)
_BY_KEY = {s.key: s for s in COMMON}


# ------------------------------------------------------------------ the parser
class SettingsParser(argparse.ArgumentParser):
    """A parser whose namespace holds only the flags given explicitly (the defaults are
    kept in :attr:`defaults` and written into each flag's help), so that a resumed run can
    tell a flag given from a default. Only public ``argparse`` is used: the actions that
    ``add_argument`` returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.defaults: dict[str, Any] = {}
        self.added: list[argparse.Action] = []  # actions not yet taken by suppress_defaults
        super().__init__(*args, **kwargs)  # (adds --help through add_argument)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.added.append(action)
        return action

    def _recording(self, group: Any) -> Any:
        add = group.add_argument

        def add_argument(*args: Any, **kwargs: Any) -> argparse.Action:
            action = add(*args, **kwargs)
            self.added.append(action)
            return action

        setattr(group, "add_argument", add_argument)  # noqa: B010  (the group's own method)
        return group

    def add_argument_group(self, *args: Any, **kwargs: Any) -> Any:
        return self._recording(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *args: Any, **kwargs: Any) -> Any:
        return self._recording(super().add_mutually_exclusive_group(*args, **kwargs))

    @staticmethod
    def _shows_default(action: argparse.Action) -> None:
        help_, default = action.help, action.default
        if not help_ or help_ is argparse.SUPPRESS or default is argparse.SUPPRESS:
            return
        if "%(default)" in help_:
            action.help = help_.replace("%(default)s", str(default))
        elif "default" not in help_ and action.nargs != 0 and default is not None:
            shown = repr(default) if isinstance(default, str) else str(default)
            action.help = f"{help_} (default: {shown})"

    def suppress_defaults(self, actions: list[argparse.Action]) -> None:
        """Record the defaults of ``actions``, show them in their help and take them out of
        the parsed namespace."""
        for action in actions:
            if action.dest in (argparse.SUPPRESS, "help"):
                continue
            if action.dest in self.defaults:
                raise ValueError(f"{flag(action.dest)} is defined twice")
            self._shows_default(action)
            self.defaults[action.dest] = action.default
            action.default = argparse.SUPPRESS
        self.added = [a for a in self.added if a not in actions]


def _add_common(p: argparse.ArgumentParser, kind: ModelKind) -> list[argparse.Action]:
    budget_group = p.add_mutually_exclusive_group()
    actions = []
    for s in COMMON:
        where = budget_group if s.key in BUDGET else p
        default = s.default_for(kind)
        help_ = s.help.format(threads=kind.default_threads, name=kind.name)
        if s.flag_only:
            action = where.add_argument(flag(s.key), action="store_true", help=help_)
        elif s.choices is not None:
            action = where.add_argument(flag(s.key), choices=s.choices, default=default,
                                        help=help_, metavar="{" + ",".join(s.choices) + "}")
        elif s.type is not None:
            action = where.add_argument(flag(s.key), type=s.type, default=default, help=help_)
        else:
            action = where.add_argument(flag(s.key), default=default, help=help_)
        actions.append(action)
    return actions


def add_train_arguments(p: SettingsParser, kind: ModelKind) -> dict[str, Any]:
    """Add the engine's common ``train`` flags and ``kind``'s own to ``p``; return every
    setting's default (the parsed namespace then holds only explicitly given flags). A
    kind adds its flags with ``p.add_argument``, ``p.add_argument_group(...).add_argument``
    or ``p.add_mutually_exclusive_group(...).add_argument``."""
    common = _add_common(p, kind)
    p.suppress_defaults(common)
    scratch = argparse.ArgumentParser(add_help=False)
    kind.add_arguments(scratch)
    own = vars(scratch.parse_args([]))
    clash = set(own) & set(p.defaults)
    if clash:
        raise ValueError(f"model {kind.name!r} redefines the engine's flags "
                         f"{', '.join(flag(k) for k in sorted(clash))}")
    p.added.clear()
    kind.add_arguments(p)
    p.suppress_defaults(list(p.added))
    hidden = sorted(set(own) - set(p.defaults))
    if hidden:
        raise ValueError(f"model {kind.name!r} adds {', '.join(flag(k) for k in hidden)} in a way "
                         f"this parser cannot see; add its flags with parser.add_argument")
    return dict(p.defaults)


def default_settings(kind: ModelKind) -> dict[str, Any]:
    """Every setting of ``kind`` with its default: the engine's common settings and the
    kind's own (``data`` is ``None``: it must be given)."""
    p = SettingsParser(add_help=False)
    defaults = add_train_arguments(p, kind)
    return {key: v for key, v in defaults.items() if key not in INVOCATION}


# ------------------------------------------------------------------- the checks
def check_settings(s: Mapping[str, Any], kind: ModelKind | None = None) -> None:
    """Raise ``ValueError`` naming the flag and what was expected, for complete settings
    (and, given the ``kind``, its :attr:`ModelKind.check_settings` of their combination)."""
    if s.get("data") is None:
        raise ValueError("--data: a data set is required (one of " + ", ".join(DATASETS) + ")")
    if s.get("steps") is not None and s.get("epochs") is not None:
        raise ValueError("give --steps or --epochs, not both")
    for key, setting in _BY_KEY.items():
        if key in INVOCATION or key not in s:
            continue
        v = s[key]
        if v is None and setting.default is None:
            continue
        if setting.choices is not None and v not in setting.choices:
            raise ValueError(f"{flag(key)}: unknown value {v!r}; expected one of "
                             f"{', '.join(setting.choices)}")
        check = getattr(setting.type, "check", None)
        if check is not None:
            check(key, v)
    device = str(s["device"])
    if device != "cpu":
        if not device.startswith("cuda"):
            raise ValueError(f"--device: expected 'cpu' or 'cuda[:N]', got {device!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} requested but CUDA is not available")
    if kind is not None and kind.check_settings is not None:
        kind.check_settings(s)


def settings_for(kind: ModelKind, given: Mapping[str, Any]) -> dict[str, Any]:
    """A new run's settings: ``given`` over the defaults; unknown keys are an error."""
    defaults = default_settings(kind)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown settings for {kind.name}: {', '.join(unknown)}; expected "
                         f"some of {', '.join(sorted(defaults))}")
    return {**defaults, **given}


def resume_settings(kind: ModelKind, given: Mapping[str, Any], state: Mapping[str, Any],
                    where: Path) -> dict[str, Any]:
    """The settings of a resumed run: the checkpoint's, with a new budget and new run
    control; any other given setting that differs is an error naming it and both values."""
    if state["kind"] != kind.name:
        raise ValueError(f"--resume: the run in {where} trains {state['kind']!r}, not {kind.name!r}")
    saved = dict(state["settings"])
    settings = dict(saved)
    for key, value in given.items():
        if key in BUDGET or key in RUN_CONTROL:
            continue
        if key not in saved:
            raise ValueError(f"--resume: {flag(key)} is not a setting of the run in {where}")
        if value != saved[key]:
            raise ValueError(
                f"--resume: {flag(key)} {value!r} differs from the checkpoint's {saved[key]!r}; "
                f"a resumed run keeps its settings (leave {flag(key)} out)"
            )
    for key in RUN_CONTROL:
        if key in given:
            settings[key] = given[key]
    if any(given.get(key) is not None for key in BUDGET):
        for key in BUDGET:
            settings[key] = given.get(key)
    return settings


def budget(s: Mapping[str, Any], steps_per_epoch: int) -> int:
    """The run's total steps: ``steps``, or ``epochs`` (default 10) whole epochs."""
    if s.get("steps") is not None:
        return int(s["steps"])
    epochs = s.get("epochs")
    return (10 if epochs is None else int(epochs)) * steps_per_epoch
