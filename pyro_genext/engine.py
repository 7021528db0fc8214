r"""The training engine: one loop, one checkpoint format and one command line for every model.

A model joins by describing itself in a :class:`ModelKind` (how it is built from its
settings, its training objective, its validation metrics, what ``evaluate`` and
``sample`` report) and calling :func:`register`; the engine owns everything else:

* batching: a seeded permutation of the training split each epoch, ``batch_size``
  examples per step, the last incomplete batch of an epoch dropped;
* the step: one ``nn.Module``, :class:`Objective`, whose ``forward(x)`` returns the
  training loss per example, ``elbo.differentiable_loss(module.model, module.guide, x) /
  batch``, minimised by ``torch.optim.Adam`` over ``module.parameters()`` (the
  parameters live in the module; nothing is read from Pyro's global param store), with
  the gradient of each parameter tensor clipped to norm ``clip_norm`` (what Pyro's
  ``clip_args={"clip_norm": c}`` does; not the total norm over all tensors);
* a progress bar whose running figure is the median of the last 100 steps, so that one
  spike does not dominate it;
* validation at the end of every epoch and of the run: the kind's per-example metrics
  over the validation split, reported as mean, median and worst; ``best.pt`` holds the
  model with the lowest mean of the first metric;
* atomic checkpoints (a temporary file in the same folder, flushed, synced, renamed):
  ``last.pt`` every ``checkpoint_every`` steps, at every validation and on Ctrl-C;
* bit-exact resume: a checkpoint holds the model, the optimiser, every random number
  generator and the position in the epoch, so a run resumed from step ``k`` reproduces the
  uninterrupted run bit for bit (on CPU);
* errors with their whole message and no traceback on the command line.

A third model kind, a Gaussian with a learned mean and scale, trained by maximum
likelihood on a toy density (the guide is empty, so the ELBO is the log-likelihood)::

    >>> import argparse, math, pyro, pyro.distributions as dist, torch
    >>> from pyro.infer import Trace_ELBO
    >>> from pyro.nn import PyroModule, PyroParam
    >>> class Gaussian(PyroModule):
    ...     def __init__(self, dim):
    ...         super().__init__()
    ...         self.loc = PyroParam(torch.zeros(dim))
    ...         self.log_scale = PyroParam(torch.zeros(dim))
    ...     def dist(self):
    ...         return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)
    ...     def model(self, x):
    ...         with pyro.plate("data", x.shape[0]):
    ...             pyro.sample("x", self.dist(), obs=x)
    ...     def guide(self, x):
    ...         pass
    >>> def add_arguments(p: argparse.ArgumentParser) -> None:
    ...     pass  # this model has no settings of its own
    >>> kind = ModelKind(
    ...     name="gaussian", summary="a diagonal Gaussian by maximum likelihood",
    ...     add_arguments=add_arguments,
    ...     build=lambda settings, data: Gaussian(data.event_shape[0]),
    ...     loss=lambda settings: Trace_ELBO(),
    ...     metrics=lambda m, x: {"nll": -m.dist().log_prob(x)},
    ...     evaluate=lambda m, data, args: {"nll": float(-m.dist().log_prob(data.x).mean())},
    ...     sample=lambda m, data, args: [],
    ... )
    >>> register(kind)
    >>> result = fit("gaussian", {"data": "moons", "steps": 300, "lr": 0.02},
    ...              progress=False, log=lambda line: None)
    >>> result["steps"], result["best"]["nll_mean"] < 2.9  # N(0, I) scores about 3.1
    (300, True)

Once registered, ``pyro-genext train gaussian --data moons --out runs/g`` trains it, and
``evaluate`` and ``sample`` rebuild it from its checkpoints (in a new process, the module
defining the kind must be imported by :mod:`pyro_genext.kinds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import torch
from torch import nn

from . import distributed
from .checks import data_checks
from .data import DATASETS, SPLITS, Dataset, load_dataset

if TYPE_CHECKING:  # pragma: no cover
    from pyro.infer import ELBO
    from pyro.nn import PyroModule

__all__ = [
    "ModelKind",
    "KINDS",
    "register",
    "get_kind",
    "Objective",
    "fit",
    "default_settings",
    "add_train_arguments",
    "per_example_metrics",
    "summarize",
    "load_checkpoint",
    "save_checkpoint",
    "module_from_checkpoint",
    "data_stub",
    "CheckpointError",
    "RunExistsError",
    "CHECKPOINT_VERSION",
    "positive_int",
    "nonneg_int",
    "positive_float",
]

#: The version of the checkpoint format this library writes and reads.
CHECKPOINT_VERSION = 2
#: Settings that a resumed run may change: where the data are, the device, how often to
#: checkpoint and log. The budget (``steps``, ``epochs``) may be raised.
RUN_CONTROL = ("root", "device", "checkpoint_every", "log_interval")
#: On a GPU the training losses are read back every this many steps (a read is a sync).
SYNC_EVERY = 25
BUDGET = ("steps", "epochs")
#: Running figure of the progress bar: the median of this many recent steps.
RUNNING_WINDOW = 100


def _identity(module: Any, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """How one kind of model is built, trained, validated, evaluated and sampled.

    Fields: ``name`` (the command-line name), ``summary`` (one line for ``--help``),
    ``add_arguments`` (the model's own ``train`` flags; each ``dest`` is a key of the
    settings), ``build(settings, train_data)`` (a ``PyroModule`` with ``model(x)`` and
    ``guide(x)`` whose parameters live in the module), ``loss(settings)`` (a Pyro ELBO),
    ``metrics(module, x)``, ``evaluate(module, data, args)`` (a JSON-able dict for
    ``pyro-genext evaluate``), ``sample(module, data, args)`` (writes pictures, returns
    their paths), and optionally ``prepare``, ``initialize`` (data-dependent start-up on the
    first prepared training batch, before step 1, not on resume), ``add_evaluate_arguments``,
    ``add_sample_arguments``, ``default_threads`` (CPU threads without ``--threads``),
    ``default_warmup`` (learning-rate warm-up steps without ``--warmup``) and
    ``progress``. ``evaluate`` and ``sample`` get the checkpoint's data set (the split asked
    for, the test split for ``sample``) and the parsed flags, with ``args.kind`` and
    ``args.settings`` (the run's settings) added; the command line runs them without
    gradients. ``metrics`` returns per-example values, lower is better; the first key's
    mean selects the best checkpoint. ``prepare`` is called with the module in training
    mode for training batches (with the engine's training generator, each step) and in
    eval mode for validation and test batches (with a generator seeded from the run's
    seed and the split, so validation numbers are reproducible). ``progress`` (optional,
    an addition to the fixed fields) turns the training loss per example into the
    progress bar's figure, e.g. ``("bpd", loss / (D log 2))``. ``check_data`` (optional)
    raises ``ValueError`` for a split the model cannot take (NaN, values out of range); the
    engine calls it once per split when the data are loaded and then trains inside
    :func:`~pyro_genext.checks.data_checks` ``(False)``, so no step reads values back to
    the host. ``on_step`` (optional) is called as ``on_step(module, step, settings)`` right
    before each training step's loss, ``step`` the number of optimiser steps already taken
    (0-based), e.g. to set a schedule that is a function of the step alone.
    """

    name: str
    summary: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    build: Callable[[dict[str, Any], Dataset], PyroModule]
    loss: Callable[[dict[str, Any]], ELBO]
    metrics: Callable[[PyroModule, torch.Tensor], dict[str, torch.Tensor]]
    evaluate: Callable[[PyroModule, Dataset, argparse.Namespace], dict[str, Any]]
    sample: Callable[[PyroModule, Dataset, argparse.Namespace], list[Path]]
    prepare: Callable[[PyroModule, torch.Tensor, torch.Generator], torch.Tensor] = _identity
    initialize: Callable[[PyroModule, torch.Tensor], None] | None = None
    add_evaluate_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    add_sample_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    default_threads: int = 1
    default_warmup: int = 0
    progress: Callable[[PyroModule, float], tuple[str, float]] | None = None
    check_data: Callable[[PyroModule, torch.Tensor], None] | None = None
    on_step: Callable[[PyroModule, int, dict[str, Any]], None] | None = None


KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> None:
    """Add a model kind to :data:`KINDS` (the command line's ``MODEL`` choices)."""
    if not isinstance(kind, ModelKind):
        raise TypeError(f"expected a ModelKind, got {type(kind).__name__}")
    if not kind.name or kind.name.startswith("-"):
        raise ValueError(f"expected a model name usable on the command line, got {kind.name!r}")
    KINDS[kind.name] = kind


def get_kind(name: str | ModelKind) -> ModelKind:
    """The registered kind called ``name`` (the built-in kinds are registered on first use)."""
    if isinstance(name, ModelKind):
        return name
    from . import kinds  # noqa: F401  (registers the built-in kinds)

    if name not in KINDS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(sorted(KINDS))}")
    return KINDS[name]


# ---------------------------------------------------------------------------------- flags
def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {v}")
        return v

    parse.__name__ = f"whole number >= {low}"
    return parse


positive_int = _int_at_least(1)
nonneg_int = _int_at_least(0)


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return v


def nonneg_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def _common_arguments(p: argparse.ArgumentParser, kind: ModelKind) -> None:
    data = "{" + ",".join(DATASETS) + "}"
    p.add_argument("--data", choices=DATASETS, metavar=data,
                   help="the data set (required, except with --resume)", default=None)
    p.add_argument("--out", type=Path, help="the run folder for checkpoints (required)",
                   default=None)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=nonneg_int, default=None,
                        help="optimisation steps (0: save the untrained model; default: 10 epochs)")
    budget.add_argument("--epochs", type=nonneg_int, default=None,
                        help="passes over the training split (default: 10)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="examples per step; at most the size of the training split")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--warmup", type=nonneg_int, default=kind.default_warmup,
                   help="steps over which the learning rate rises linearly from lr/N to lr "
                        "(0: none)")
    p.add_argument("--clip-norm", type=positive_float, default=10.0,
                   help="before each update, clip the gradient of EACH parameter tensor to this "
                        "norm (as Pyro's clip_args; not the total norm); the loss is per example")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seeds the data split, the initialisation and every random draw")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="bf16: the networks compute in bfloat16 under torch.autocast, the "
                        "element-wise maps and log-determinants stay in float32")
    p.add_argument("--root", default=None,
                   help="folder holding the data files (default: the standard places)")
    p.add_argument("--checkpoint-every", type=positive_int, default=500,
                   help="steps between checkpoints (also at every validation)")
    p.add_argument("--log-interval", type=nonneg_float, default=30.0,
                   help="seconds between validation log lines (0: every validation)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"CPU threads for torch (default: {kind.default_threads}, the fastest "
                        f"measured for {kind.name}; torch's own default, all cores, was slower)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from last.pt with its settings "
                        "(a larger --steps/--epochs trains longer)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or log lines; the final summary line stays")


#: Flags that steer one invocation and are not settings of the run.
INVOCATION = ("out", "resume", "overwrite", "quiet", "threads")


def suppress_defaults(p: argparse.ArgumentParser, start: int = 0) -> dict[str, Any]:
    """Record the defaults of ``p``'s actions from index ``start`` on, show them in the
    help text, and replace them by ``argparse.SUPPRESS``, so that the parsed namespace
    holds only the flags given explicitly. Returns ``{dest: default}``."""
    defaults: dict[str, Any] = {}
    for action in p._actions[start:]:
        if action.dest in ("help", argparse.SUPPRESS) or isinstance(action, argparse._VersionAction):
            continue
        default = action.default
        defaults[action.dest] = default
        if action.help is not None and action.help is not argparse.SUPPRESS:
            said = "default" in action.help
            if not said and not isinstance(action, argparse._StoreTrueAction) and default is not None:
                shown = default if not isinstance(default, str) else repr(default)
                action.help = f"{action.help} (default: {shown})"
        action.default = argparse.SUPPRESS
    return defaults


def add_train_arguments(p: argparse.ArgumentParser, kind: ModelKind) -> dict[str, Any]:
    """Add the engine's common ``train`` flags and ``kind``'s own to ``p``; return every
    setting's default (the parsed namespace then holds only explicitly given flags)."""
    _common_arguments(p, kind)
    start = len(p._actions)
    kind.add_arguments(p)
    defaults = suppress_defaults(p)
    own = {a.dest for a in p._actions[start:]}
    clash = own & {a.dest for a in p._actions[:start]}
    if clash:  # pragma: no cover - a kind's bug
        raise ValueError(f"model {kind.name!r} redefines the engine's flags {sorted(clash)}")
    return defaults


def default_settings(kind: str | ModelKind) -> dict[str, Any]:
    """Every setting of ``kind`` with its default: the engine's common flags and the
    kind's own (``data`` is ``None``: it must be given)."""
    k = get_kind(kind)
    p = argparse.ArgumentParser(add_help=False)
    defaults = add_train_arguments(p, k)
    return {key: v for key, v in defaults.items() if key not in INVOCATION}


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# ----------------------------------------------------------------------------- objective
class Objective(nn.Module):
    """The training step's module: ``forward(x)`` is the kind's ELBO loss per example,
    ``elbo.differentiable_loss(module.model, module.guide, x) / x.shape[0]``.

    Holding the model as a submodule, it is the one module a data-parallel wrapper
    (``DistributedDataParallel(Objective(...))``) needs: its ``forward`` runs model and
    guide, so gradients flow through the wrapper."""

    def __init__(self, module: nn.Module, elbo: ELBO) -> None:
        super().__init__()
        self.module = module
        self.elbo = elbo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.module
        elbo: Any = self.elbo
        return elbo.differentiable_loss(m.model, m.guide, x) / x.shape[0]


def clip_per_tensor(params: list[torch.Tensor], clip_norm: float) -> None:
    """Scale the gradient of each tensor in ``params`` down to norm ``clip_norm`` where it
    is larger (each tensor on its own, as ``torch.nn.utils.clip_grad_norm_([p], c)`` for
    every ``p``, which is what Pyro's ``clip_args`` does)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [(clip_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


# ----------------------------------------------------------------------------- metrics
def split_seed(seed: int, split: str) -> int:
    """The seed of the generator ``prepare`` gets for a validation or test pass."""
    return 1234 + 3 * seed + SPLITS.index(split)


def per_example_metrics(
    kind: str | ModelKind, module: Any, x: torch.Tensor, seed: int, split: str,
    batch_size: int = 500,
) -> dict[str, torch.Tensor]:
    """The kind's metrics of every example of ``x`` (a split's raw data), in eval mode and
    without gradients, prepared with a generator seeded by :func:`split_seed`; returns
    ``{name: tensor of shape (N,)}`` on the CPU. The module's mode is restored."""
    k = get_kind(kind)
    was_training = module.training
    module.eval()
    gen = torch.Generator().manual_seed(split_seed(seed, split))
    device = _module_device(module)
    parts: dict[str, list[torch.Tensor]] = {}
    # torch's global stream is forked and seeded: whatever a kind's metrics draw (latents)
    # neither disturbs the training stream (bit-exact --resume replays it) nor varies
    # from one validation to the next
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(split_seed(seed, split))
            for i in range(0, x.shape[0], batch_size):
                xb = k.prepare(module, x[i : i + batch_size].to(device), gen)
                for name, v in k.metrics(module, xb).items():
                    parts.setdefault(name, []).append(v.detach().reshape(-1).cpu())
    finally:
        module.train(was_training)
    return {name: torch.cat(v) for name, v in parts.items()}


def summarize(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``{name_mean, name_median, name_worst}`` of per-example metrics (worst = largest)."""
    out: dict[str, float] = {}
    for name, values_ in values.items():
        v = values_.detach().double()
        out[f"{name}_mean"] = float(v.mean())
        out[f"{name}_median"] = float(v.median())
        out[f"{name}_worst"] = float(v.max())
    return out


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- checkpoints
class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, not a pyro_genext checkpoint, of another
    format version, or does not fit the model this version builds."""


class RunExistsError(FileExistsError):
    """``fit`` was asked to start a run in a folder that already holds one."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    and synced, then renamed over ``path``. Errors name ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(f"cannot write {path} ({e.strerror or e})") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints private
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(f"cannot write {path} ({e.strerror or e})") from e
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by the engine (a run folder means its ``best.pt``, or
    ``last.pt`` if there is no ``best.pt``), with one clear line if it is missing,
    corrupt, not a pyro_genext checkpoint, or of another format version."""
    from . import __version__

    p = Path(path)
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").exists() else p / "last.pt"
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {p} is corrupt or unreadable ({type(e).__name__})") from e
    if not isinstance(state, dict) or state.get("format") != "pyro_genext":
        raise CheckpointError(f"{p} is not a pyro_genext checkpoint")
    version = state.get("version")
    if version != CHECKPOINT_VERSION:
        wrote = state.get("library_version", "a version before 0.1.0's engine")
        raise CheckpointError(
            f"{p} has checkpoint format {version} (written by pyro_genext {wrote}); "
            f"pyro_genext {__version__} reads format {CHECKPOINT_VERSION}: retrain, or use the "
            f"version that wrote it"
        )
    return state


def data_stub(state: Mapping[str, Any]) -> Dataset:
    """An empty :class:`Dataset` with the shape and levels of a checkpoint's data."""
    info = state["data_info"]
    return Dataset(name=info["name"], x=torch.zeros((0,) + tuple(info["event_shape"])), y=None,
                   levels=info["levels"])


def _load_model_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Load a checkpoint's parameters, or say in one line why they do not fit."""
    from . import __version__

    wrote = state.get("library_version", "?")
    own, saved = set(module.state_dict()), set(state["model"])
    if own != saved:
        missing, unexpected = sorted(own - saved), sorted(saved - own)
        raise CheckpointError(
            f"checkpoint does not match the model this version of pyro_genext ({__version__}) "
            f"builds from its settings ({len(missing)} missing entries, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); it was written by "
            f"version {wrote}"
        )
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint does not match the model this version of pyro_genext ({__version__}) "
            f"builds: {str(e).strip().splitlines()[-1].strip()}"
        ) from e


def module_from_checkpoint(state: Mapping[str, Any]) -> tuple[Any, ModelKind, dict[str, Any]]:
    """Rebuild the model of a checkpoint in eval mode: ``(module, kind, settings)``."""
    kind = get_kind(state["kind"])
    settings = dict(state["settings"])
    module = kind.build(settings, data_stub(state))
    _load_model_state(module, state)
    module.eval()
    return module, kind, settings


# --------------------------------------------------------------------------------- fit
def _check_settings(s: Mapping[str, Any]) -> None:
    if s.get("data") is None:
        raise ValueError("--data: a data set is required (one of " + ", ".join(DATASETS) + ")")
    if s["data"] not in DATASETS:
        raise ValueError(f"--data: unknown data set {s['data']!r}; expected one of {', '.join(DATASETS)}")
    if s.get("steps") is not None and s.get("epochs") is not None:
        raise ValueError("give --steps or --epochs, not both")
    for key in ("steps", "epochs", "seed"):
        v = s.get(key)
        if v is not None and (not isinstance(v, int) or v < 0):
            raise ValueError(f"{_flag(key)}: expected a whole number >= 0, got {v!r}")
    for key in ("batch_size", "checkpoint_every"):
        v = s[key]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{_flag(key)}: expected a whole number >= 1, got {v!r}")
    for key in ("lr", "clip_norm"):
        v = s[key]
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{_flag(key)}: expected a finite number > 0, got {v!r}")
    if s.get("autocast", "none") not in ("none", "bf16"):
        raise ValueError(f"--autocast: expected 'none' or 'bf16', got {s['autocast']!r}")
    device = str(s["device"])
    if device != "cpu":
        if not device.startswith("cuda"):
            raise ValueError(f"--device: expected 'cpu' or 'cuda[:N]', got {device!r}")
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} requested but CUDA is not available")


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {out} cannot be written ({e.strerror or e})") from e


def _resume_settings(kind: ModelKind, given: Mapping[str, Any], state: Mapping[str, Any],
                     where: Path) -> dict[str, Any]:
    """The settings of a resumed run: the checkpoint's, with a new budget and new run
    control; any other given setting that differs is an error naming it."""
    if state["kind"] != kind.name:
        raise ValueError(
            f"--resume: the run in {where} trains {state['kind']!r}, not {kind.name!r}"
        )
    saved = dict(state["settings"])
    settings = dict(saved)
    for key, value in given.items():
        if key in BUDGET or key in RUN_CONTROL:
            continue
        if key not in saved:
            raise ValueError(f"--resume: {_flag(key)} is not a setting of the run in {where}")
        if value != saved[key]:
            raise ValueError(
                f"--resume: {_flag(key)} {value!r} differs from the checkpoint's {saved[key]!r}; "
                f"a resumed run keeps its settings (leave {_flag(key)} out)"
            )
    for key in RUN_CONTROL:
        if key in given:
            settings[key] = given[key]
    if any(key in given and given[key] is not None for key in BUDGET):
        for key in BUDGET:
            settings[key] = given.get(key)
    return settings


def _budget(s: Mapping[str, Any], steps_per_epoch: int) -> int:
    if s.get("steps") is not None:
        return int(s["steps"])
    epochs = s.get("epochs")
    return (10 if epochs is None else int(epochs)) * steps_per_epoch


class _Running:
    """The median of the last ``window`` values: one spike moves it by one rank at most."""

    def __init__(self, window: int = RUNNING_WINDOW, values: list[float] | None = None) -> None:
        self.values: deque[float] = deque(values or [], maxlen=window)

    def add(self, v: float) -> float:
        self.values.append(v)
        return statistics.median(self.values)


def fit(
    kind: str | ModelKind,
    settings: Mapping[str, Any],
    out: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    train_data: Dataset | None = None,
    val_data: Dataset | None = None,
) -> dict[str, Any]:
    """Train a model of ``kind`` with ``settings`` (any of :func:`default_settings`; the
    missing ones take their defaults).

    Args:
        kind: a registered name (``"nice"``, ``"realnvp"``, ...) or a :class:`ModelKind`.
        settings: the run's settings. With ``resume=True`` only those to check or change:
            the run keeps the checkpoint's settings, takes a new budget (``steps``,
            ``epochs``) and new run control (``root``, ``device``, ``checkpoint_every``,
            ``log_interval``); any other setting given that differs is a ``ValueError``
            naming it and both values.
        out: the run folder (``best.pt``, ``last.pt``), or ``None`` to keep everything in
            memory. A folder that already holds a run is refused (:class:`RunExistsError`)
            unless ``resume`` or ``overwrite``.
        resume: continue from ``out/last.pt``, exactly where it stopped.
        overwrite: start afresh in a folder that holds a run (its checkpoints are removed).
        progress: show a progress bar on stderr.
        log: called with each log line (default: stderr).
        train_data, val_data: the splits, instead of loading ``settings["data"]``.

    Returns:
        ``{"steps", "total_steps", "best", "best_step", "last", "history", "out_dir",
        "module", "kind", "settings"}``: ``best`` and ``last`` are the validation summaries
        (``<metric>_mean``, ``_median``, ``_worst``) of the best and of the last
        validation, ``history`` one such dict (with ``step`` and ``epoch``) per validation,
        ``module`` the model after the last step (the best one is in ``out/best.pt``).
    """
    from . import __version__

    k = get_kind(kind)
    say = log or _default_log
    outp = Path(out) if out is not None else None
    state: dict[str, Any] | None = None
    if resume:
        if outp is None or not (outp / "last.pt").exists():
            raise CheckpointError(f"--resume: no checkpoint to resume from in {outp}")
        state = load_checkpoint(outp / "last.pt")
        state["_path"] = outp / "last.pt"
        s = _resume_settings(k, settings, state, outp)
    else:
        defaults = default_settings(k)
        unknown = sorted(set(settings) - set(defaults))
        if unknown:
            raise ValueError(
                f"unknown settings for {k.name}: {', '.join(unknown)}; expected some of "
                f"{', '.join(sorted(defaults))}"
            )
        s = {**defaults, **settings}
    _check_settings(s)
    ctx, device_name = distributed.setup(str(s["device"]))
    if not ctx.is_main:  # rank 0 alone logs, shows progress and writes checkpoints
        say = _silent
    if outp is not None:
        _check_writable(outp)
        held = [n for n in ("last.pt", "best.pt") if (outp / n).exists()]
        if held and not resume:
            if not overwrite:
                raise RunExistsError(
                    f"{outp} already holds a training run ({', '.join(held)}): pass --resume to "
                    f"continue it or --overwrite to replace it, or choose another --out"
                )
            if ctx.is_main:
                for name in held:
                    (outp / name).unlink()
            distributed.barrier(ctx)

    seed = int(s["seed"])
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    tr = train_data or load_dataset(s["data"], "train", root=s["root"], seed=seed)
    va = val_data or load_dataset(s["data"], "val", root=s["root"], seed=seed)
    n = len(tr)
    batch = int(s["batch_size"])
    if batch > n:
        raise ValueError(
            f"--batch-size {batch} is larger than the training split of {tr.name} ({n} examples); "
            f"expected at most {n}"
        )
    if batch % ctx.world_size:
        raise ValueError(
            f"--batch-size {batch} is the global batch and must be divisible by the number of "
            f"processes ({ctx.world_size})"
        )
    device = torch.device(device_name)
    module: Any = k.build(s, tr).to(device)
    if k.check_data is not None:  # once, here: the training step then checks no values
        k.check_data(module, tr.x)
        k.check_data(module, va.x)
    objective = Objective(module, k.loss(s))
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(s["lr"]))
    clip = float(s["clip_norm"])
    base_lr, warmup = float(s["lr"]), int(s.get("warmup") or 0)  # runs saved before: none
    x_train = tr.x.to(device)
    steps_per_epoch = n // batch
    total_steps = _budget(s, steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    step, epoch, pos = 0, 0, 0
    perm = torch.randperm(n, generator=gen)
    best, best_step = math.inf, -1
    best_summary: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    running = _Running()
    if state is not None:
        if state["step"] > total_steps:
            raise ValueError(
                f"--resume: the run in {outp} is at step {state['step']}, past the budget of "
                f"{total_steps} steps; give a larger --steps or --epochs"
            )
        _load_model_state(module, state)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, pos = state["step"], state["epoch"], state["pos"]
        perm = state["perm"]
        gen.set_state(state["gen"])
        best, best_step, best_summary = state["best"], state["best_step"], state["best_summary"]
        history = state["history"]
        running = _Running(values=state["running"])
        if not ctx.distributed:  # several processes re-seed every step instead
            pyro.util.set_rng_state(state["rng"])
            cuda_rng = state.get("cuda_rng")
            if cuda_rng is not None and device.type == "cuda":
                torch.cuda.set_rng_state_all(cuda_rng)
        say(f"resumed from {state['_path']} at step {step} of {total_steps}")
    elif k.initialize is not None:
        module.train()
        with torch.no_grad():  # each rank its share of the first batch; actnorm pools them
            x0 = k.prepare(module, x_train[distributed.shard(perm[:batch], ctx).to(device)],
                           _stream(gen, ctx, seed, 0))
        k.initialize(module, x0)
    step_module: nn.Module = objective
    if ctx.distributed:  # gradients averaged over the ranks in backward
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )

    def snapshot() -> dict[str, Any]:
        return {
            "format": "pyro_genext",
            "version": CHECKPOINT_VERSION,
            "library_version": __version__,
            "kind": k.name,
            "settings": dict(s),
            "data_info": {"name": tr.name, "event_shape": tuple(tr.event_shape),
                          "levels": tr.levels, "num_train": n},
            "model": {key: v.detach().cpu() for key, v in module.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "step": step, "epoch": epoch, "pos": pos, "perm": perm, "gen": gen.get_state(),
            "rng": pyro.util.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "world_size": ctx.world_size,
            "best": best, "best_step": best_step, "best_summary": best_summary,
            "history": history, "running": list(running.values),
        }

    last_log = -math.inf
    metric_name: list[str] = []

    def validate() -> None:
        flush()
        if ctx.is_main:
            _validate()
        distributed.barrier(ctx)

    def _validate() -> None:
        nonlocal best, best_step, best_summary, last_log
        values = per_example_metrics(k, module, va.x, seed, "val")
        first = next(iter(values))
        metric_name[:] = [first]
        summary = summarize(values)
        mean = summary[f"{first}_mean"]
        if not math.isfinite(mean):
            raise FloatingPointError(f"validation {first} is {mean} at step {step}")
        history.append({"step": step, "epoch": epoch, **summary})
        improved = mean < best
        if improved:
            best, best_step, best_summary = mean, step, summary
        now = time.monotonic()
        if now - last_log >= float(s["log_interval"]):
            last_log = now
            say(f"step {step}/{total_steps} epoch {epoch}: val {_describe(first, summary)}"
                + (" (best)" if improved else ""))
        if bar is not None:
            bar.set_postfix_str(_postfix(), refresh=False)
        if outp is not None:
            snap = snapshot()
            if improved:
                save_checkpoint(outp / "best.pt", snap)
            save_checkpoint(outp / "last.pt", snap)

    figure: list[Any] = ["loss", math.nan]

    def _postfix() -> str:
        text = f"{figure[0]}={figure[1]:.3f}"
        if history:
            name = metric_name[0] if metric_name else "val"
            text += f" val_{name}={history[-1][f'{name}_mean']:.3f}" if metric_name else ""
        return text

    # The losses stay on the device until they are needed (the progress bar, a check, a
    # checkpoint): reading one is a host synchronisation, a stall on a GPU.
    sync_every = 1 if device.type == "cpu" else SYNC_EVERY
    bf16 = s.get("autocast", "none") == "bf16"
    pending: list[torch.Tensor] = []
    done = [step]  # steps whose losses have been read

    def flush() -> None:
        if not pending:
            return
        values = torch.stack(pending).double().cpu().tolist()
        pending.clear()
        for value in values:
            done[0] += 1
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss is {value} at step {done[0]}"
                    + (f"; the last checkpoint is in {outp / 'last.pt'}" if outp is not None else "")
                    + "; try a lower --lr or --clip-norm"
                )
            name, shown = k.progress(module, value) if k.progress is not None else ("loss", value)
            figure[:] = [name, running.add(shown)]
        if bar is not None:
            bar.update(len(values))
            bar.set_postfix_str(_postfix(), refresh=False)

    bar = None
    if step == 0 and total_steps == 0:
        validate()
        return _result(k, s, step, total_steps, best_summary, best_step, history, outp, module)
    if progress and ctx.is_main:
        bar = _progress_bar(total_steps, step)

    def _train_loop() -> None:
        nonlocal step, epoch, pos, perm
        while step < total_steps:
            if pos + batch > n:
                perm = torch.randperm(n, generator=gen)
                pos = 0
                epoch += 1
            idx = distributed.shard(perm[pos : pos + batch], ctx)
            pos += batch
            if ctx.distributed:  # per-rank random streams, a function of (seed, rank, step)
                pyro.set_rng_seed(distributed.stream_seed(seed, ctx.rank, step + 1))
            xb = k.prepare(module, x_train[idx.to(device)], _stream(gen, ctx, seed, step + 1))
            if k.on_step is not None:
                k.on_step(module, step, s)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = step_module(xb)
            pending.append(loss.detach())
            if len(pending) >= sync_every:
                flush()  # on the CPU every step, before the update it would make
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_per_tensor(params, clip)
            if warmup:  # a function of the step alone, so --resume needs no state for it
                for group in optimizer.param_groups:
                    group["lr"] = base_lr * min(1.0, (step + 1) / warmup)
            optimizer.step()
            step += 1
            end_of_epoch = pos + batch > n
            if end_of_epoch or step == total_steps:
                validate()
            elif outp is not None and step % int(s["checkpoint_every"]) == 0:
                flush()
                if ctx.is_main:
                    save_checkpoint(outp / "last.pt", snapshot())
        flush()

    module.train()
    try:
        with data_checks(False):  # the splits were validated once, when they were loaded
            _train_loop()
    except KeyboardInterrupt:
        if outp is not None and ctx.is_main:
            save_checkpoint(outp / "last.pt", snapshot())
        raise
    finally:
        if bar is not None:
            bar.close()
    return _result(k, s, step, total_steps, best_summary, best_step, history, outp, module)


def _silent(msg: str) -> None:
    pass


def _stream(gen: torch.Generator, ctx: distributed.Context, seed: int, step: int) -> torch.Generator:
    """The generator ``prepare`` draws from at ``step``: the run's own with one process (its
    state travels in checkpoints); with several, a fresh one per rank and step, so every
    rank draws differently and a resumed run, with any number of processes, continues the
    same streams."""
    if not ctx.distributed:
        return gen
    return torch.Generator().manual_seed(distributed.stream_seed(seed, ctx.rank, step, salt=1))


def _describe(name: str, summary: Mapping[str, float]) -> str:
    return (f"{name} {summary[f'{name}_mean']:.4f} (median {summary[f'{name}_median']:.4f}, "
            f"worst {summary[f'{name}_worst']:.4f})")


def describe_result(result: Mapping[str, Any]) -> str:
    """The one-line summary of a finished :func:`fit`."""
    best = result["best"]
    name = next(iter(best))[: -len("_mean")] if best else "metric"
    where = f"; checkpoints in {result['out_dir']}" if result["out_dir"] else ""
    return (f"best validation {_describe(name, best)} at step {result['best_step']}; "
            f"{result['steps']} of {result['total_steps']} steps{where}")


def _result(k: ModelKind, s: Mapping[str, Any], step: int, total: int, best: dict[str, float],
            best_step: int, history: list[dict[str, Any]], out: Path | None,
            module: Any) -> dict[str, Any]:
    return {"steps": step, "total_steps": total, "best": best, "best_step": best_step,
            "last": history[-1] if history else {}, "history": history,
            "out_dir": None if out is None else str(out), "module": module, "kind": k.name,
            "settings": dict(s)}


def _default_log(msg: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()  # in a log file, a line every 30 s rather than every update
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5 if tty else 30.0)
