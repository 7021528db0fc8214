"""Checkpoints and run folders: the format, atomic writes, reading with one clear line on
any failure, and the rules of a run folder.

A run folder holds ``last.pt`` (written every ``checkpoint_every`` steps, at every
validation and on Ctrl-C) and ``best.pt`` (the model with the best validation so far). A
checkpoint is a dict (:meth:`~pyro_genext.engine.Trainer.state_dict`): the format and
its version, the kind and settings, the data's shape, the model, the optimiser, every
random number generator, the position in the epoch and the validation history. At a
validation that improves, ``last.pt`` is written first and then ``best.pt``: a crash
between the two leaves a ``last.pt`` whose ``best_step`` is its own step, and resuming
from it rewrites ``best.pt`` (:func:`open_run_folder`), so the pair always agrees.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Dataset

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "RunExistsError",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "data_stub",
    "resume_state",
    "open_run_folder",
    "refuse_existing_run",
]

#: The version of the checkpoint format this library writes and reads.
CHECKPOINT_VERSION = 2
#: The checkpoints of a run folder.
NAMES = ("last.pt", "best.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, not a pyro_genext checkpoint, of another
    format version, or does not fit the model this version builds."""


class RunExistsError(FileExistsError):
    """``fit`` was asked to start a run in a folder that already holds one."""


def _version() -> str:
    from .. import __version__

    return __version__


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file ``<name>.<random>.tmp`` in the
    same folder, flushed and synced, then renamed over ``path``. Errors name ``path``."""
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
            torch.save(dict(state), f)
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
            f"pyro_genext {_version()} reads format {CHECKPOINT_VERSION}: retrain, or use the "
            f"version that wrote it"
        )
    return state


def data_stub(state: Mapping[str, Any]) -> Dataset:
    """An empty :class:`~pyro_genext.data.Dataset` with the shape and levels of a
    checkpoint's data."""
    info = state["data_info"]
    return Dataset(name=info["name"], x=torch.zeros((0,) + tuple(info["event_shape"])), y=None,
                   levels=info["levels"])


def load_model_state(module: nn.Module, state: Mapping[str, Any]) -> None:
    """Load a checkpoint's parameters into ``module``, or say in one line why they do not fit."""
    wrote = state.get("library_version", "?")
    own, saved = set(module.state_dict()), set(state["model"])
    if own != saved:
        missing, unexpected = sorted(own - saved), sorted(saved - own)
        raise CheckpointError(
            f"checkpoint does not match the model this version of pyro_genext ({_version()}) "
            f"builds from its settings ({len(missing)} missing entries, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); it was written by "
            f"version {wrote}"
        )
    try:
        module.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"checkpoint does not match the model this version of pyro_genext ({_version()}) "
            f"builds: {str(e).strip().splitlines()[-1].strip().rstrip('.')}; it was written by "
            f"version {wrote}"
        ) from e


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {out} cannot be written ({e.strerror or e})") from e


def resume_state(out: Path | None) -> dict[str, Any]:
    """The state a run resumes from: ``out/last.pt`` (read only)."""
    if out is None or not (out / "last.pt").exists():
        raise CheckpointError(f"--resume: no checkpoint to resume from in {out}")
    return load_checkpoint(out / "last.pt")


def refuse_existing_run(out: Path, *, resume: dict[str, Any] | None,
                        overwrite: bool) -> list[str]:
    """The checkpoints ``out`` holds; a :class:`RunExistsError` if it holds a run and the
    new one neither resumes nor overwrites it (``overwrite``). Touches no file: a run can
    call it before loading its data and :func:`open_run_folder` once it is built."""
    held = [n for n in NAMES if (out / n).exists()]
    if held and resume is None and not overwrite:
        raise RunExistsError(
            f"{out} already holds a training run ({', '.join(held)}): pass --resume to "
            f"continue it or --overwrite to replace it, or choose another --out"
        )
    return held


def open_run_folder(out: Path, *, resume: dict[str, Any] | None, overwrite: bool,
                    writer: bool = True) -> None:
    """Apply the run-folder rules before a run starts in ``out`` (``resume``: the state it
    resumes from, :func:`resume_state`; ``None`` for a new run):

    * the folder must be writable (it is created if missing);
    * a folder holding a run (``last.pt`` or ``best.pt``) is refused
      (:class:`RunExistsError`) unless the run resumes or ``overwrite``; ``overwrite``
      removes its checkpoints;
    * when ``last.pt`` is itself the best model (``best_step == step``) it is written again
      as ``best.pt``, which a crash between the two writes may have left older;
    * the temporary files of a process killed while writing (``last.pt.*.tmp``,
      ``best.pt.*.tmp``) are removed.

    Only the ``writer`` (rank 0 of several processes) changes files.
    """
    _check_writable(out)
    held = refuse_existing_run(out, resume=resume, overwrite=overwrite)
    if not writer:
        return
    for name in NAMES:
        for stale in out.glob(f"{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    if resume is None:
        for name in held:
            (out / name).unlink()
    elif resume["best_step"] == resume["step"]:
        save_checkpoint(out / "best.pt", resume)
