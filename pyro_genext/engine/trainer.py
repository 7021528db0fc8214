"""The training loop as an object: :class:`Trainer` holds one run's state (the model, the
optimiser, the data order, the random streams, the best validation so far), saves it whole
with :meth:`~Trainer.state_dict` and restores it with :meth:`~Trainer.load_state_dict`;
:func:`fit` sets a run up and runs it.

The loop, :meth:`Trainer.run`, reads at once::

    while step < total_steps:
        train_step()                      # on_step hook, batch, loss, clip, warm-up, update
        if the epoch ends or the budget is spent: validate()   # writes last.pt, best.pt
        elif step % checkpoint_every == 0: save last.pt
        every `every` steps: callback(trainer)
        after Ctrl-C: save last.pt and stop (after the last step: nothing to stop, the
                      run returns as if uninterrupted)

Ctrl-C is taken at a step boundary (the first one ends the step in progress; a second
interrupts at once), so the checkpoint it saves is the state between two steps and a
resumed run is bit for bit the uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from .. import distributed
from ..checks import data_checks
from ..data import Dataset, load_dataset
from .checkpoint import (
    CHECKPOINT_VERSION,
    load_model_state,
    open_run_folder,
    refuse_existing_run,
    resume_state,
    save_checkpoint,
)
from .kind import ModelKind
from .progress import Progress, RunningMedian, describe
from .registry import get_kind
from .settings import budget, check_settings, resume_settings, settings_for
from .step import Objective, clip_per_tensor, learning_rate, make_optimizer, update
from .validation import generator, per_example_metrics, summarize

__all__ = ["Trainer", "fit", "SYNC_EVERY"]

#: On a GPU the training losses are read back every this many steps (a read is a sync).
SYNC_EVERY = 25


@contextmanager
def _interrupt_between_steps() -> Iterator[list[bool]]:
    """Within the block, Ctrl-C (SIGINT) sets ``flag[0]`` for the loop to stop at the end of
    the step; a second Ctrl-C interrupts at once. Outside the main thread signals cannot be
    caught, and Ctrl-C interrupts at once."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """One training run of ``kind`` with complete, checked ``settings`` on the given splits.

    Attributes that callbacks and tests read: ``kind``, ``settings``, ``module``,
    ``optimizer``, ``step`` (optimiser steps taken), ``epoch``, ``total_steps``,
    ``history`` (one validation summary per validation), ``best``/``best_step``/
    ``best_summary``, ``last_loss`` (the latest training loss per example read back),
    ``compile_seconds`` (with ``--compile``: the first, compiling, step's time).
    ``out`` is the run folder (``None``: nothing is written).
    """

    def __init__(self, kind: ModelKind, settings: Mapping[str, Any], train_data: Dataset,
                 val_data: Dataset, *, out: Path | None = None,
                 ctx: distributed.Context | None = None, device: str = "cpu",
                 log: Callable[[str], None] | None = None) -> None:
        self.kind, self.settings = kind, dict(settings)
        self.ctx = ctx or distributed.Context()
        self.out, self.device = out, torch.device(device)
        self.train_data, self.val_data = train_data, val_data
        s, n = self.settings, len(train_data)
        self.seed, self.batch = int(s["seed"]), int(s["batch_size"])
        if self.batch > n:
            raise ValueError(
                f"--batch-size {self.batch} is larger than the training split of "
                f"{train_data.name} ({n} examples); expected at most {n}"
            )
        if self.batch % self.ctx.world_size:
            raise ValueError(
                f"--batch-size {self.batch} is the global batch and must be divisible by the "
                f"number of processes ({self.ctx.world_size})"
            )
        self.module: Any = kind.build(s, train_data).to(self.device)
        if kind.check_data is not None:  # once, here: the training step then checks no values
            kind.check_data(self.module, train_data.x)
            kind.check_data(self.module, val_data.x)
        self.objective = Objective(self.module, kind.loss(s))
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, float(s["lr"]), self.device)
        self.x_train = train_data.x.to(self.device)
        self.total_steps = budget(s, n // self.batch)
        # the data order and every draw of `prepare` (one process), on the data's device
        self.gen = generator(self.device, self.seed)
        self.step, self.epoch, self.pos = 0, 0, 0
        self.perm = torch.randperm(n, generator=self.gen, device=self.device)
        self.best, self.best_step = math.inf, -1
        self.best_summary: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.running = RunningMedian()
        self.progress = Progress(show=self.ctx.is_main, log=log,
                                 log_interval=float(s["log_interval"]))
        self.saved_step: int | None = None  # the step out/last.pt holds
        self.last_loss = math.nan
        self.pending: list[torch.Tensor] = []  # losses not read back yet
        self.read = 0  # steps whose losses have been read
        self.sync_every = 1 if self.device.type == "cpu" else SYNC_EVERY
        self.step_module: nn.Module = self.objective
        self.compile_mode: str | None = None
        self.compile_seconds: float | None = None  # the first compiled step's time
        self.compiled = self._compile() if s.get("compile") else None
        if self.ctx.distributed:  # gradients averaged over the ranks in backward
            from torch.nn.parallel import DistributedDataParallel

            self.step_module = DistributedDataParallel(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The whole run as a checkpoint (the format of ``last.pt`` and ``best.pt``)."""
        from .. import __version__

        tr = self.train_data
        return {
            "format": "pyro_genext", "version": CHECKPOINT_VERSION,
            "library_version": __version__, "kind": self.kind.name,
            "settings": dict(self.settings),
            "data_info": {"name": tr.name, "event_shape": tuple(tr.event_shape),
                          "levels": tr.levels, "num_train": len(tr)},
            "model": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "step": self.step, "epoch": self.epoch, "pos": self.pos, "perm": self.perm.cpu(),
            "gen": self.gen.get_state(), "gen_device": self.device.type,
            "rng": pyro.util.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "world_size": self.ctx.world_size,
            "best": self.best, "best_step": self.best_step, "best_summary": self.best_summary,
            "history": self.history, "running": list(self.running.values),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` (a :meth:`state_dict`) stopped. With several
        processes the random streams are not restored: they are re-seeded every step."""
        if state["step"] > self.total_steps:
            raise ValueError(
                f"--resume: the run is at step {state['step']}, past the budget of "
                f"{self.total_steps} steps; give a larger --steps or --epochs"
            )
        state = copy.deepcopy(dict(state))  # nothing shared with the trainer it came from
        load_model_state(self.module, state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.pos = state["step"], state["epoch"], state["pos"]
        self.perm = state["perm"].to(self.device)
        self._restore_streams(state)
        self.best, self.best_step = state["best"], state["best_step"]
        self.best_summary, self.history = state["best_summary"], state["history"]
        self.running = RunningMedian(values=state["running"])
        self.read = self.saved_step = self.step
        if not self.ctx.distributed:
            pyro.util.set_rng_state(state["rng"])

    def _restore_streams(self, state: Mapping[str, Any]) -> None:
        """The training generator (and the GPU's global stream) of a checkpoint. A generator
        state belongs to one kind of device (a CPU generator's is a Mersenne Twister, a
        GPU's a Philox counter), so a run resumed on another kind of device than it was
        saved on starts a fresh stream seeded from the run's seed and step, and says so:
        reproducible, though not the stream the run would have drawn where it started."""
        saved = state.get("gen_device", "cpu")  # checkpoints before it were all CPU streams
        if saved == self.device.type:
            self.gen.set_state(state["gen"])
        else:
            self.gen.manual_seed(distributed.stream_seed(self.seed, 0, self.step, salt=2))
            self.progress.say(f"resumed on {self.device.type} from a run saved on {saved}: the "
                              f"random streams are re-seeded from the seed and step {self.step}")
        cuda_rng = state.get("cuda_rng")
        if cuda_rng is not None and self.device.type == "cuda" and not self.ctx.distributed:
            if isinstance(cuda_rng, (list, tuple)):  # older checkpoints: every GPU's state
                index = self.device.index or 0
                cuda_rng = cuda_rng[index] if len(cuda_rng) > index else None
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)

    # ------------------------------------------------------------------ pieces
    def _stream(self, step: int) -> torch.Generator:
        """The generator ``prepare`` draws from at ``step``: the run's own with one process
        (its state travels in checkpoints); with several, a fresh one per rank and step, so
        every rank draws differently and a resumed run, with any number of processes,
        continues the same streams."""
        if not self.ctx.distributed:
            return self.gen
        return generator(self.device, distributed.stream_seed(self.seed, self.ctx.rank, step, salt=1))

    def initialize(self) -> None:
        """The kind's data-dependent start-up on the first prepared training batch (each
        rank its share; actnorm pools them)."""
        if self.kind.initialize is None:
            return
        self.module.train()
        idx = distributed.shard(self.perm[: self.batch], self.ctx)
        with torch.no_grad():
            x0 = self.kind.prepare(self.module, self.x_train[idx], self._stream(0))
        self.kind.initialize(self.module, x0)

    def next_batch(self) -> torch.Tensor:
        """The next training batch (this rank's share), prepared; a new epoch draws a new
        permutation when the current one cannot fill a batch."""
        if self.end_of_epoch:
            self.perm = torch.randperm(len(self.train_data), generator=self.gen, device=self.device)
            self.pos = 0
            self.epoch += 1
        idx = distributed.shard(self.perm[self.pos : self.pos + self.batch], self.ctx)
        self.pos += self.batch
        if self.ctx.distributed:  # per-rank random streams, a function of (seed, rank, step)
            pyro.set_rng_seed(distributed.stream_seed(self.seed, self.ctx.rank, self.step + 1))
        return self.kind.prepare(self.module, self.x_train[idx],
                                 self._stream(self.step + 1))

    @property
    def end_of_epoch(self) -> bool:
        """Whether the current permutation cannot fill another batch."""
        return self.pos + self.batch > len(self.train_data)

    def train_step(self) -> torch.Tensor:
        """One optimiser step on the next batch; returns its loss per example (detached,
        not read back to the host)."""
        s = self.settings
        xb = self.next_batch()
        if self.kind.on_step is not None:
            self.kind.on_step(self.module, self.step, s)
        lr = learning_rate(float(s["lr"]), self.step, int(s.get("warmup") or 0))
        if self.compiled is not None:  # loss, backward, clipping and update: one compiled call
            loss = self._compiled_step(xb, lr)  # (so the loss is read after its update)
            self.pending.append(loss)
            if len(self.pending) >= self.sync_every:
                self.flush()
            self.step += 1
            return loss
        with self._autocast():
            loss = self.step_module(xb)
        self.pending.append(loss.detach())
        if len(self.pending) >= self.sync_every:
            self.flush()  # on the CPU every step, before the update it would make
        update(self.optimizer, self.params, loss, float(s["clip_norm"]), lr)
        self.step += 1
        return loss.detach()

    def _autocast(self) -> Any:
        """``torch.autocast`` to bfloat16 with ``--autocast bf16``, nothing otherwise."""
        bf16 = self.settings.get("autocast", "none") == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def _compile(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The whole training step as one ``torch.compile``'d function of the batch (the
        kind's :attr:`~ModelKind.train_loss`, its backward pass, the clipping and Adam's
        update); ``None``, said in the log, where the step cannot be compiled."""
        s, loss_fn = self.settings, self.kind.train_loss
        if loss_fn is None or self.ctx.distributed:
            why = (f"{self.kind.name} has no train_loss" if loss_fn is None
                   else "several processes average gradients in backward")
            self.progress.say(f"--compile: the step runs eagerly ({why})")
            return None
        module, optimizer, params = self.module, self.optimizer, self.params
        clip = float(s["clip_norm"])

        def step(xb: torch.Tensor) -> torch.Tensor:  # (the gradients were set to None)
            with self._autocast():
                loss = loss_fn(module, xb, s)
            loss.backward()
            clip_per_tensor(params, clip)
            optimizer.step()
            return loss.detach()

        mode = str(s.get("compile_mode") or "auto")
        if mode == "auto":
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self.compile_mode = mode
        # fallback_random: inductor otherwise replaces torch's random draws (the
        # dequantization noise) with its own generator, and the compiled step would train
        # on other draws than the eager one (torch.compile takes mode or options, not both)
        options = {**torch._inductor.list_mode_options(mode),
                   "fallback_random": True}
        return torch.compile(step, options=options)

    def _compiled_step(self, xb: torch.Tensor, lr: float) -> torch.Tensor:
        """One compiled step at rate ``lr``. The rate is a tensor the compiled update reads
        (a Python number would be a constant of the compiled code, recompiled at every
        step of the warm-up); the first call compiles, and its time is logged."""
        for group in self.optimizer.param_groups:
            lr_t = group["lr"]  # a float, or a tensor a checkpoint loaded onto the host
            if not isinstance(lr_t, torch.Tensor) or lr_t.device != self.device:
                group["lr"] = torch.tensor(float(lr_t), device=self.device)
            group["lr"].fill_(lr)
        self.optimizer.zero_grad(set_to_none=True)  # outside: torch.compile will not trace it
        if self.compile_mode == "reduce-overhead":  # a new step of the CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()
        if self.compile_seconds is not None:
            # a copy: a CUDA graph's output is overwritten by its next replay, and the loss
            # waits in `pending` for the read-back
            return self.compiled(xb).clone()  # type: ignore[misc]
        start = time.perf_counter()
        loss = self.compiled(xb).clone()  # type: ignore[misc]
        self.compile_seconds = time.perf_counter() - start
        self.progress.say(f"--compile: the first step (compilation, mode {self.compile_mode}) took "
                          f"{self.compile_seconds:.1f} s")
        return loss

    def flush(self) -> None:
        """Read the pending losses back: check them, feed the progress figure."""
        if not self.pending:
            return
        values = torch.stack(self.pending).double().cpu().tolist()
        self.pending.clear()
        figure = self.progress.figure
        for value in values:
            self.read += 1
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss is {value} at step {self.read}"
                                         f"{self._last_checkpoint()}; try a lower --lr or --clip-norm")
            self.last_loss = value
            name, shown = (self.kind.progress(self.module, value) if self.kind.progress is not None
                           else ("loss", value))
            figure = (name, self.running.add(shown))
        self.progress.steps(len(values), figure)

    def _last_checkpoint(self) -> str:
        """Where a failed run can be resumed from, for its error message."""
        if self.out is None:
            return ""
        if self.saved_step is None:
            return "; no checkpoint was written"
        return (f"; the last checkpoint (step {self.saved_step}) is {self.out / 'last.pt'} "
                "(--resume continues from it)")

    def scores(self, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The kind's per-example metrics of ``x`` (default: the validation split), as
        validation computes them."""
        x = self.val_data.x if x is None else x
        return per_example_metrics(self.kind, self.module, x, self.seed, "val")

    def validate(self) -> None:
        """Score the validation split (rank 0), log, and write last.pt (and best.pt if the
        mean of the first metric improved)."""
        self.flush()
        if self.ctx.is_main:
            self._validate()
        distributed.barrier(self.ctx)

    def _validate(self) -> None:
        values = self.scores()
        first = next(iter(values))
        summary = summarize(values)
        mean = summary[f"{first}_mean"]
        if not math.isfinite(mean):
            raise FloatingPointError(f"validation {first} is {mean} at step {self.step}"
                                     f"{self._last_checkpoint()}")
        self.history.append({"step": self.step, "epoch": self.epoch, **summary})
        improved = mean < self.best
        if improved:
            self.best, self.best_step, self.best_summary = mean, self.step, summary
        self.progress.validation(
            f"step {self.step}/{self.total_steps} epoch {self.epoch}: val "
            f"{describe(first, summary)}" + (" (best)" if improved else ""), first, mean)
        if self.out is not None:
            state = self.state_dict()
            self.save(state)  # last.pt first: it names the best step (see open_run_folder)
            if improved:
                save_checkpoint(self.out / "best.pt", state)

    def save(self, state: Mapping[str, Any] | None = None) -> None:
        """Write ``last.pt`` (rank 0; nothing without a run folder)."""
        self.flush()
        if self.out is None or not self.ctx.is_main:
            return
        state = self.state_dict() if state is None else state
        save_checkpoint(self.out / "last.pt", state)
        self.saved_step = state["step"]

    def result(self) -> dict[str, Any]:
        """What :func:`fit` returns."""
        return {"steps": self.step, "total_steps": self.total_steps, "best": self.best_summary,
                "best_step": self.best_step, "last": self.history[-1] if self.history else {},
                "history": self.history, "out_dir": None if self.out is None else str(self.out),
                "module": self.module, "kind": self.kind.name, "settings": dict(self.settings),
                "compile_seconds": self.compile_seconds}

    # ------------------------------------------------------------------ the loop
    def run(self, callback: Callable[[Trainer], None] | None = None, every: int = 1,
            progress: bool = True) -> dict[str, Any]:
        """Train to ``total_steps``; ``callback(self)`` after every ``every``-th step (and at
        step 0 of a new run). Returns :meth:`result`."""
        if self.step == self.total_steps:  # nothing to train (--steps 0, or a resumed run)
            if not self.history or self.history[-1]["step"] != self.step:
                self.validate()  # the validation a run ends with, unless it has it
            return self.result()
        if progress:
            self.progress.open_bar(self.total_steps, self.step)
        checkpoint_every = int(self.settings["checkpoint_every"])
        self.module.train()
        try:
            # the splits were validated once, when they were loaded
            with data_checks(False), _interrupt_between_steps() as stop:
                if callback is not None and self.step == 0:
                    callback(self)
                while self.step < self.total_steps:
                    self.train_step()
                    if self.end_of_epoch or self.step == self.total_steps:
                        self.validate()
                    elif self.step % checkpoint_every == 0:
                        self.save()
                    if callback is not None and self.step % every == 0:
                        self.flush()
                        callback(self)
                    if stop[0] and self.step == self.total_steps:  # e.g. in the last validation
                        self.progress.say(f"Ctrl-C after the last step ({self.step}): the run is "
                                          "complete and saved")
                    elif stop[0]:  # Ctrl-C, at a step boundary: the state is consistent
                        if self.saved_step != self.step:
                            self.save()
                        raise KeyboardInterrupt
                self.flush()
        finally:
            self.progress.close()
        return self.result()


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
    callback: Callable[[Trainer], None] | None = None,
    every: int = 1,
) -> dict[str, Any]:
    """Train a model of ``kind`` with ``settings`` (any of
    :func:`~pyro_genext.engine.default_settings`; the missing ones take their defaults).

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
        overwrite: start afresh in a folder that holds a run (its checkpoints are removed
            once the new run is built, so a run that cannot start leaves them).
        progress: show a progress bar on stderr.
        log: called with each log line (default: stderr).
        train_data, val_data: the splits, instead of loading ``settings["data"]``.
        callback: called with the :class:`Trainer` after every ``every``-th step, and once
            before the first step of a new run (``trainer.step == 0``): to watch a run
            closely (``trainer.scores(x)``, ``trainer.last_loss``) without copying its step.
        every: steps between callbacks.

    Returns:
        ``{"steps", "total_steps", "best", "best_step", "last", "history", "out_dir",
        "module", "kind", "settings"}``: ``best`` and ``last`` are the validation summaries
        (``<metric>_mean``, ``_median``, ``_worst``) of the best and of the last
        validation, ``history`` one such dict (with ``step`` and ``epoch``) per validation,
        ``module`` the model after the last step (the best one is in ``out/best.pt``).
    """
    k = get_kind(kind)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected a whole number >= 1 of steps between callbacks, got {every!r}")
    outp = Path(out) if out is not None else None
    state = resume_state(outp) if resume else None
    if state is not None and outp is not None:
        s = resume_settings(k, settings, state, outp)
    else:
        s = settings_for(k, settings)
    check_settings(s, k)
    if outp is not None:  # before any work; the folder is opened once the run is built
        refuse_existing_run(outp, resume=state, overwrite=overwrite)
    ctx, device = distributed.setup(str(s["device"]))
    seed = int(s["seed"])
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    tr = train_data or load_dataset(s["data"], "train", root=s["root"], seed=seed)
    va = val_data or load_dataset(s["data"], "val", root=s["root"], seed=seed)
    trainer = Trainer(k, s, tr, va, out=outp, ctx=ctx, device=device, log=log)
    if outp is not None:  # once the run is built: --overwrite keeps a run that would not start
        open_run_folder(outp, resume=state, overwrite=overwrite, writer=ctx.is_main)
        distributed.barrier(ctx)
    if state is not None:
        trainer.load_state_dict(state)
        trainer.progress.say(f"resumed from {outp}/last.pt at step {trainer.step} of "
                             f"{trainer.total_steps}")
    else:
        trainer.initialize()
    return trainer.run(callback, every, progress)
