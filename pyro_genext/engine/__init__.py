r"""The training engine: one loop, one checkpoint format and one command line for every model.

A model joins by describing itself in a :class:`ModelKind` (how it is built from its
settings, its training objective, its validation metrics, what ``evaluate`` and
``sample`` report) and, for the command line, :func:`register`; the engine owns
everything else:

* batching: a seeded permutation of the training split each epoch, ``batch_size``
  examples per step, the last incomplete batch of an epoch dropped;
* the step (:mod:`~pyro_genext.engine.step`): Pyro's ``ELBOModule`` on the model's
  ``model`` and ``guide``, per example, minimised by ``torch.optim.Adam`` (fused on a GPU)
  over the module's parameters (nothing is read from Pyro's global param store), each
  parameter tensor's gradient clipped to norm ``clip_norm`` (as Pyro's ``clip_args``),
  after a linear learning-rate warm-up of ``warmup`` steps; nothing in a step reads a
  value back to the host, every random draw is on the batch's device, and ``compile``
  compiles the whole step;
* validation (:mod:`~pyro_genext.engine.validation`) at the end of every epoch and of the
  run: the kind's per-example metrics over the validation split, reported as mean, median
  and worst; ``best.pt`` holds the model with the lowest mean of the first metric;
* checkpoints (:mod:`~pyro_genext.engine.checkpoint`), written atomically: ``last.pt``
  every ``checkpoint_every`` steps, at every validation and on Ctrl-C;
* bit-exact resume: a checkpoint holds the model, the optimiser, every random number
  generator and the position in the epoch, so a run resumed from step ``k`` reproduces the
  uninterrupted run bit for bit (on CPU);
* a progress bar whose running figure is the median of the last 100 steps
  (:mod:`~pyro_genext.engine.progress`), shown by rank 0 alone;
* errors with their whole message and no traceback on the command line.

The pieces, one idea per module, each importing only those before it: ``kind``
(:class:`ModelKind`), ``settings``, ``checkpoint``, ``step``, ``validation``,
``progress``, ``registry`` (which kinds there are) and ``trainer`` (:class:`Trainer`, the
loop as an object, and :func:`fit`). The docs' "How the engine is built" page walks
through them.

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
    >>> result = fit(kind, {"data": "moons", "steps": 300, "lr": 0.02},
    ...              progress=False, log=lambda line: None)
    >>> result["steps"], result["best"]["nll_mean"] < 2.9  # N(0, I), its start, scores 3.00
    (300, True)

``register(kind)`` makes ``fit("gaussian", ...)`` and ``pyro-genext train gaussian --data
moons --out runs/g`` train it; ``evaluate`` and ``sample`` rebuild it from its
checkpoints in any process that has registered it.
"""

from .checkpoint import (
    CHECKPOINT_VERSION,
    CheckpointError,
    RunExistsError,
    data_stub,
    load_checkpoint,
    save_checkpoint,
)
from .kind import ModelKind
from .progress import RunningMedian, describe_result
from .registry import default_settings, get_kind, kinds, module_from_checkpoint, register, unregister
from .settings import (
    INVOCATION,
    add_train_arguments,
    check_settings,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
)
from .step import Objective, clip_per_tensor, learning_rate
from .trainer import Trainer, fit
from .validation import per_example_metrics, split_seed, summarize

__all__ = [
    "ModelKind",
    "register",
    "unregister",
    "kinds",
    "get_kind",
    "Trainer",
    "fit",
    "Objective",
    "clip_per_tensor",
    "learning_rate",
    "default_settings",
    "check_settings",
    "add_train_arguments",
    "INVOCATION",
    "per_example_metrics",
    "split_seed",
    "summarize",
    "RunningMedian",
    "describe_result",
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
    "nonneg_float",
]
