r"""Several processes on PyTorch's own engine: ``torchrun`` and ``DistributedDataParallel``.

Launch the same command under ``torchrun``; each process finds its rank in the
environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc_per_node=2 -m pyro_genext.cli train realnvp --data digits --out runs/ddp

What the training engine does with it (see :mod:`pyro_genext.engine`):

* the process group uses ``gloo`` on CPU and ``nccl`` on CUDA (each rank on
  ``cuda:LOCAL_RANK``);
* **the global batch** is ``--batch-size``: every step, all ranks draw the same global
  batch from the same seeded permutation and each takes its interleaved share,
  ``batch[rank::world_size]`` (what ``DistributedSampler`` does to an epoch's
  permutation), so one process and N processes see the same examples in the same steps;
  ``--batch-size`` must be divisible by the number of processes;
* **the learning rate** applies to that global batch unchanged: each rank's loss is the
  mean over its share, ``DistributedDataParallel`` averages the gradients, so a step is
  the step one process takes on the global batch and no rescaling is needed;
* the training step goes through ``DistributedDataParallel(Objective(module, elbo))``, so
  the gradients are averaged (Pyro's ``SVI.step`` calls the model and guide directly
  and would bypass it);
* data-dependent start-up (actnorm) pools its statistics over all ranks, so every rank
  starts with the same parameters; random streams (dequantization noise, latent draws)
  are per rank: seeded from ``(seed, rank)``;
* rank 0 alone writes checkpoints, logs and the progress bar; ``--resume`` works with the
  same or a different number of processes (with a different number, the data order
  continues exactly and each rank's random stream is re-seeded from the seed, its rank
  and the step);
* a rank that fails prints its one-line error and ends; ``torchrun`` then stops the
  others, and collective operations time out after ``PYRO_GENEXT_DIST_TIMEOUT`` seconds
  (default 300) rather than hang.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "teardown", "context", "shard", "barrier", "stream_seed"]


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a whole number, got {text!r}") from None


def context() -> Context:
    """The current process's :class:`Context` (one process unless a group is running or
    ``torchrun`` set ``WORLD_SIZE``)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return Context(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def setup(device: str = "cpu") -> tuple[Context, str]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Returns the context and the device this rank computes on (``cuda:LOCAL_RANK`` when
    ``device`` is ``"cuda"`` under several processes). One process: nothing is started."""
    ctx = context()
    if not ctx.distributed:
        return ctx, device
    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        raise RuntimeError("several processes requested but torch.distributed is not available")
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{ctx.local_rank}"
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("PYRO_GENEXT_DIST_TIMEOUT", 300)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return context(), device


def teardown() -> None:
    """Leave the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's interleaved share of a global batch of indices or examples."""
    return batch[ctx.rank :: ctx.world_size] if ctx.distributed else batch


def barrier(ctx: Context) -> None:
    """Wait for every rank (a no-op with one process)."""
    if ctx.distributed:
        dist.barrier()


def stream_seed(seed: int, rank: int, step: int, salt: int = 0) -> int:
    """A seed for rank ``rank``'s random stream at ``step``: distinct for every
    ``(seed, rank, step, salt)`` and the same on every run."""
    h = (seed * 1_000_003 + rank) * 1_000_033 + step
    return (h * 4 + salt) % (2**63 - 1)
