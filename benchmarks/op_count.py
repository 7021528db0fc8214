"""Count the operators one training step dispatches, on the CPU.

A GPU runs a training step at the device's speed only if the host keeps it fed: every
operator the step dispatches is a kernel launch and some microseconds of host work, and
every read of a value back to the host (``aten._local_scalar_dense``: ``.item()``,
``float(t)``, ``if t:``) waits for the device to finish all it was given. This script
counts both, with a ``TorchDispatchMode`` that sees every ATen operator of the forward
pass, the backward pass and the update, for

* ``realnvp-images``: the default multi-scale image RealNVP (64 channels, 2 blocks) on
  Fashion-MNIST-shaped batches, the engine's step;
* ``vae-flows``: the VAE with a RealNVP posterior and prior (the default sizes), on
  Fashion-MNIST-shaped batches, the engine's step;
* ``autorealnvp``: ``fit_guide``'s step with ``AutoRealNVP`` on a 10-dimensional model
  (its loss, its backward pass, its clipping and Adam), with Pyro's ``Trace_ELBO``
  ``differentiable_loss`` (what ``fit_guide`` calls) and with the engine's host-read-free
  :func:`~pyro_genext.engine.step.differentiable_loss`, where it exists.

Each engine step runs with the Adam a GPU run uses (fused since the GPU work; before,
torch's ``foreach`` default for GPU tensors), so the count is what a GPU would be given;
Adam's step counts that such a run keeps on the host are not device reads.

The counts do not depend on the batch size. Run it on two checkouts to compare::

    PYTHONPATH=. python benchmarks/op_count.py            # this tree
    PYTHONPATH=/path/to/old/tree python benchmarks/op_count.py

Compiled steps (``--compile``) are not counted: counted this way they gave 2432 and 957
operators for the two engine steps, about the eager figures, so what the mode sees is
not what the compiled code runs.
"""

from __future__ import annotations

import argparse
import collections
import sys
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pyro_genext
from pyro_genext import engine
from pyro_genext.checks import data_checks
from pyro_genext.data import Dataset

HOST_READ = "aten._local_scalar_dense.default"


class Count(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block, by name; a read of one of the
    ``host`` tensors (a step count that a GPU run keeps on the host) is not a device read
    and is counted apart, as ``host-side read``."""

    def __init__(self, host: tuple[torch.Tensor, ...] = ()) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.host = host

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if name == HOST_READ and any(args[0] is h for h in self.host):
            name = "host-side read"
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def gpu_optimizer(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The Adam the engine uses on a GPU: fused where the engine says so
    (``make_optimizer``), torch's default on a GPU (``foreach``) before it did."""
    step = pyro_genext.engine.step
    if hasattr(step, "make_optimizer"):
        return step.make_optimizer(params, lr, torch.device("cuda"))
    return torch.optim.Adam(params, lr=lr, foreach=True)


def host_counts(optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, ...]:
    """Adam's step counts that live on the host (none for the fused Adam on a GPU)."""
    return tuple(s["step"] for s in optimizer.state.values()
                 if "step" in s and not getattr(optimizer, "defaults", {}).get("fused"))


def fake_images(n: int, levels: int = 256) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, levels, (n, 1, 28, 28), generator=g).float()
    return Dataset(name="fashion-mnist", x=x, y=None, levels=levels)


def engine_step(kind_name: str, settings: dict[str, Any]) -> collections.Counter[str]:
    """The operators of the engine's third training step (the first two build Adam's state)."""
    from pyro_genext.engine.settings import settings_for
    from pyro_genext.engine.trainer import Trainer

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    kind = engine.get_kind(kind_name)
    s = settings_for(kind, {"data": "fashion-mnist", "steps": 10, "batch_size": 8, **settings})
    train, val = fake_images(64), fake_images(16)
    trainer_module = sys.modules[Trainer.__module__]
    if hasattr(trainer_module, "make_optimizer"):  # the optimiser of a GPU run, from the start
        trainer_module.make_optimizer = lambda params, lr, device: gpu_optimizer(params, lr)
        try:
            t = Trainer(kind, s, train, val)
        finally:
            trainer_module.make_optimizer = pyro_genext.engine.step.make_optimizer
    else:  # before the GPU work: replaced once built
        t = Trainer(kind, s, train, val)
        t.optimizer = gpu_optimizer(t.params, float(s["lr"]))
    t.initialize()
    t.sync_every = 10**9  # the periodic read-back is not part of a step
    with data_checks(False):
        t.train_step()
        t.train_step()
        with Count(host_counts(t.optimizer)) as c:
            t.train_step()
    return c.ops


def autorealnvp_step(own_loss: bool) -> collections.Counter[str]:
    """``fit_guide``'s step with AutoRealNVP (2 couplings, 32 units) on a 10-dimensional
    model with 100 observations."""
    from pyro.infer import Trace_ELBO

    from pyro_genext.infer import AutoRealNVP

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    y = torch.randn(100)

    def model(y: torch.Tensor) -> None:
        w = pyro.sample("w", dist.Normal(torch.zeros(10), 1.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("y", dist.Normal(w.sum(), 1.0), obs=y)

    guide = AutoRealNVP(model, num_layers=2, hidden_dims=(32,))
    elbo = Trace_ELBO()
    if own_loss:
        from pyro_genext.engine.step import differentiable_loss

        def loss_fn(y: torch.Tensor) -> torch.Tensor:
            return differentiable_loss(elbo, model, guide, y)
    else:
        loss_fn = elbo(model, guide)
    loss_fn(y)  # builds the guide's parameters
    params = [p for p in guide.parameters()]
    optim = torch.optim.Adam(params, lr=1e-3, foreach=True)  # fit_guide's

    def step() -> None:
        loss = loss_fn(y)
        float(loss.detach())  # fit_guide reads every step's loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0, foreach=True)
        optim.step()

    with data_checks(False):  # as a training loop runs: no per-step value checks
        step()
        with Count(host_counts(optim)) as c:
            step()
    return c.ops


CASES = {
    "realnvp-images": ("realnvp", {}),
    "vae-flows": ("vae", {"posterior_flow": "realnvp", "prior_flow": "realnvp"}),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=0, help="list the N most frequent operators of each")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    has_own = hasattr(pyro_genext.engine.step, "differentiable_loss")
    rows: list[tuple[str, collections.Counter[str]]] = []
    for name, (kind, s) in CASES.items():
        rows.append((f"{name} (engine step)", engine_step(kind, s)))
    rows.append(("autorealnvp (fit_guide step, Pyro's Trace_ELBO)", autorealnvp_step(False)))
    if has_own:
        rows.append(("autorealnvp (fit_guide step, engine's differentiable_loss)", autorealnvp_step(True)))
    where = f"pyro_genext at {pyro_genext.__file__}, torch {torch.__version__}"
    print(f"{where}, python {sys.version.split()[0]}")
    print(f"{'step':<62} {'operators':>10} {'device reads':>13}")
    for name, ops in rows:
        print(f"{name:<62} {sum(ops.values()):>10} {ops[HOST_READ]:>13}")
        for op, n in ops.most_common(args.top):
            print(f"    {n:>6}  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
