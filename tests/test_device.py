"""The GPU path, checked without a GPU.

A run on a GPU fails where a CPU run cannot: a draw on a GPU tensor refuses a CPU
generator, an operation refuses operands on two devices, and every read of a value (or
copy between host and device) inside a training step makes the host wait for the device.
On a CPU-only machine these are caught by

* the ``meta`` device: tensors with a device and no data, so arithmetic that mixes them
  with CPU tensors fails and nothing can be read back (``FakeTensorMode``'s fake ``cuda``
  tensors cannot run autograd on a CPU-only build, where its device guard aborts the
  process);
* :class:`FollowsDevice`, a torch function mode that records every random draw whose
  generator is on another device than its result and every copy between devices, with
  ``torch.Generator`` replaced by a CPU generator that reports the device it was made for
  (a CPU generator on a ``meta`` tensor would otherwise pass unnoticed, as it does under
  ``FakeTensorMode``);
* :func:`no_host_reads`: ``Tensor.item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``,
  ``__float__`` and ``__int__`` raise inside a CPU training step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from pyro_genext import engine
from pyro_genext.checks import data_checks
from pyro_genext.data import load_dataset
from pyro_genext.engine.settings import settings_for
from pyro_genext.engine.trainer import Trainer

#: The kinds of the command line, each small: flows on images and on vectors, the VAE with
#: every posterior and prior flow and both objectives.
KINDS = {
    "nice": ("nice", {"data": "digits", "num_layers": 2, "hidden": 16}),
    "realnvp-images": ("realnvp", {"data": "digits", "hidden": 8, "num_blocks": 1}),
    "realnvp-vectors": ("realnvp", {"data": "moons", "num_layers": 2, "hidden": 8}),
    "vae": ("vae", {"data": "digits", "z_dim": 2, "hidden": [16]}),
    "vae-gaussian": ("vae", {"data": "digits", "z_dim": 2, "hidden": [16], "likelihood": "gaussian"}),
    "vae-realnvp-flows": ("vae", {"data": "digits", "z_dim": 2, "hidden": [16], "posterior_flow": "realnvp",
                                  "prior_flow": "realnvp", "flow_hidden": [8], "num_flows": 2}),
    "vae-nice-flows-particles": ("vae", {"data": "digits", "z_dim": 2, "hidden": [16],
                                         "posterior_flow": "nice", "prior_flow": "nice",
                                         "flow_hidden": [8], "num_flows": 2, "particles": 3}),
    "vae-iwae": ("vae", {"data": "digits", "z_dim": 2, "hidden": [16], "objective": "iwae",
                         "posterior_flow": "realnvp", "flow_hidden": [8], "num_flows": 2}),
    "vae-conv-kl-warmup-free-bits": ("vae", {"data": "digits", "z_dim": 2, "hidden": [16], "encoder": "conv",
                                             "conv_channels": [4], "kl_warmup": 5, "free_bits": 0.1}),
}


class _Generator(torch.Generator):
    """A CPU generator that reports the device it was asked for (a ``meta`` generator
    cannot be made), so that :class:`FollowsDevice` can tell where it would draw."""

    def __new__(cls, device: Any = "cpu") -> _Generator:
        return super().__new__(cls)  # a CPU generator, whatever the device

    def __init__(self, device: Any = "cpu") -> None:
        super().__init__()
        self.claimed = torch.device(device)

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self.claimed


def _devices(values: Any) -> set[torch.device]:
    """The devices of the tensors among ``values``, leaving out 0-d CPU tensors (which
    every device takes as scalars)."""
    found = set()
    for v in tree_flatten(values)[0]:
        if isinstance(v, torch.Tensor) and not (v.device.type == "cpu" and v.dim() == 0):
            found.add(v.device)
    return found


class FollowsDevice(TorchFunctionMode):
    """Records, in ``problems``, every torch call that draws with a generator on another
    device than its result, or whose tensors (arguments and results) are on more than
    one device: a copy between host and device, or mixed-device arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
        gen = kwargs.get("generator")
        if gen is not None and isinstance(out, torch.Tensor) and gen.device.type != out.device.type:
            self.problems.append(f"{name} draws on {out.device} with a generator on {gen.device}")
        devices = _devices((args, kwargs, out))
        if len(devices) > 1:
            self.problems.append(f"{name} moves or mixes tensors on {sorted(map(str, devices))}")
        return out


@contextmanager
def device_generators(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, ``torch.Generator(device)`` makes a :class:`_Generator`."""
    monkeypatch.setattr(torch, "Generator", _Generator)
    yield


def trainer(name: str, device: str = "cpu", **more: Any) -> Trainer:
    """A trainer of ``KINDS[name]`` (batch 32) on ``device``, initialised."""
    kind_name, s = KINDS[name]
    kind = engine.get_kind(kind_name)
    s = settings_for(kind, {**s, "steps": 10, "batch_size": 32, **more})
    train = load_dataset(s["data"], "train", seed=0, num_points=200 if s["data"] == "moons" else None)
    val = load_dataset(s["data"], "val", seed=0, num_points=100 if s["data"] == "moons" else None)
    t = Trainer(kind, s, train, val, device=device)
    if device != "meta":  # the actnorms' one-time start-up reads a flag (not a step's work)
        with data_checks(False):  # the data were checked when the trainer was built
            t.initialize()
    return t


@pytest.mark.parametrize("name", list(KINDS))
def test_training_step_follows_the_data_device(name, monkeypatch):
    """Every draw and every tensor of a training step is on the data's device (here
    ``meta``), and nothing is copied from or to the host: on today's code before this
    check, the batch indices came from the host every step and the VAE binarised a GPU
    batch with a CPU generator (the H200's "Expected a 'cuda' device type for generator")."""
    with device_generators(monkeypatch):
        t = trainer(name, "meta")
        t.sync_every = 10**9  # the periodic read-back is not part of the step
        mode = FollowsDevice()
        with data_checks(False), mode:
            for _ in range(2):
                t.train_step()
    assert t.gen.device.type == "meta"
    assert not mode.problems, mode.problems[:5]
    assert all(p.device.type == "meta" for p in t.module.parameters())


@contextmanager
def no_host_reads(exempt: tuple[torch.Tensor, ...] = ()) -> Iterator[None]:
    """Within the block, reading a tensor's value on the host raises (``exempt`` tensors
    aside)."""
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(n: str) -> Any:
        def method(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if any(self is e for e in exempt):
                return saved[n](self, *args, **kwargs)
            raise AssertionError(f"host read inside a training step: Tensor.{n}")
        return method

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("name", list(KINDS))
def test_training_step_never_reads_back_to_the_host(name):
    """No value is read back to the host inside a training step (on a GPU each read waits
    for every queued kernel); the losses are read every ``sync_every`` steps. On the code
    before this check, Pyro's Trace_ELBO read every site's log-density with ``.item()``
    and the VAE's binarisation read the batch's range. The CPU Adam's step count is a host
    tensor by design (the GPU's fused Adam keeps it on the device) and is exempt."""
    t = trainer(name)
    t.sync_every = 10**9
    with data_checks(False):
        t.train_step()  # Adam's state exists from the first step on
        counts = tuple(s["step"] for s in t.optimizer.state.values())
        with no_host_reads(exempt=counts):
            losses = [t.train_step() for _ in range(3)]
    assert len(t.pending) == 4
    t.flush()
    assert t.read == 4 and all(torch.isfinite(v) for v in losses)


def test_the_losses_are_still_checked_when_read_back():
    """The NaN guard survives the deferred read: a non-finite loss raises when the
    losses are read back, naming its step."""
    t = trainer("realnvp-vectors")
    t.sync_every = 3
    with data_checks(False):
        t.train_step()
        with torch.no_grad():
            next(t.module.parameters()).fill_(float("nan"))
        t.train_step()
        assert t.read == 0
        with pytest.raises(FloatingPointError, match="at step 2"):
            t.train_step()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", ["realnvp-images", "vae"])
def test_every_prepare_draws_with_a_generator_on_the_batch_device(name, monkeypatch):
    """The generator ``prepare`` gets, in training (the trainer's stream, with one process
    and with several) and in validation, is on the batch's device: a GPU run of the VAE
    failed before its first step with "Expected a 'cuda' device type for generator but
    found 'cpu'" when its binarisation drew on the GPU batch with the trainer's CPU
    generator."""
    seen: list[tuple[str, str]] = []
    with device_generators(monkeypatch):
        t = trainer(name, "meta")

        def spy(m: Any, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            seen.append((gen.device.type, x.device.type))
            raise _Stop

        t.kind = dataclasses.replace(t.kind, prepare=spy)
        validate = lambda: engine.per_example_metrics(t.kind, t.module, t.val_data.x, 0, "val")  # noqa: E731
        for call in (t.next_batch, validate):
            with pytest.raises(_Stop):
                call()
        t.ctx = dataclasses.replace(t.ctx, world_size=2)  # several processes: a stream per step
        assert t._stream(3).device.type == "meta"
    assert seen == [("meta", "meta")] * 2


@contextmanager
def saved_as_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within the block, ``torch.save`` tags every CPU tensor as ``cuda:0``, as a checkpoint
    written on a GPU is tagged: loading it without ``map_location`` on a CPU-only machine
    fails as such a checkpoint does."""
    import torch.serialization as ser

    monkeypatch.setattr(ser, "_package_registry", list(ser._package_registry))
    ser.register_package(0, lambda s: "cuda:0" if s.device.type == "cpu" else None,
                         lambda s, location: None)
    yield


def test_a_checkpoint_written_on_a_gpu_resumes_evaluates_and_samples_on_the_cpu(tmp_path, monkeypatch,
                                                                                capsys):
    """A run trained on a GPU goes on on the CPU: ``last.pt`` (every tensor tagged cuda,
    the training generator's state a GPU's) resumes with its streams re-seeded from the
    seed and step, the same way each time, and ``evaluate`` and ``sample`` read it."""
    import json

    from pyro_genext.cli import main
    from pyro_genext.engine.checkpoint import save_checkpoint

    out = tmp_path / "run"
    settings = {**KINDS["vae"][1], "steps": 4, "batch_size": 32}
    engine.fit("vae", settings, out, progress=False, log=lambda line: None)
    state = engine.load_checkpoint(out / "last.pt")
    state["gen"] = torch.zeros(16, dtype=torch.uint8)  # a GPU generator's state: a Philox seed and offset
    state["gen_device"] = "cuda"
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)
    with saved_as_on_a_gpu(monkeypatch):
        save_checkpoint(out / "last.pt", state)
        save_checkpoint(out / "best.pt", state)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(out / "last.pt", weights_only=False)  # the simulation is faithful
    said: list[str] = []
    results = []
    for _ in range(2):
        pyro.clear_param_store()
        copy = tmp_path / f"resumed{len(results)}"
        copy.mkdir()
        for name in ("last.pt", "best.pt"):
            (copy / name).write_bytes((out / name).read_bytes())
        r = engine.fit("vae", {"steps": 8}, copy, resume=True, progress=False, log=said.append)
        results.append(torch.cat([p.detach().reshape(-1) for p in r["module"].parameters()]))
    assert r["steps"] == 8
    assert torch.equal(results[0], results[1])  # re-seeded the same way each time
    assert any("re-seeded" in line and "saved on cuda" in line for line in said), said
    assert main(["evaluate", str(out), "--num-samples", "3", "--num-examples", "8", "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["elbo"])
    assert main(["sample", str(out), "--out", str(tmp_path / "s.png"), "--num", "4"]) == 0
    assert (tmp_path / "s.png").exists()


@pytest.mark.parametrize("name", list(KINDS))
def test_train_loss_is_the_objective_the_engine_trains(name):
    """A kind's ``train_loss`` (what ``--compile`` compiles, without Pyro's tracing) is the
    loss of Pyro's ELBO the eager step trains, value and gradient, on the same draws (both
    draw from torch's stream in the same order)."""
    t = trainer(name)
    with data_checks(False):
        xb = t.next_batch()
        t.kind.on_step(t.module, 2, t.settings) if t.kind.on_step else None  # mid-warm-up, if any
        pyro.set_rng_seed(1)
        eager = t.objective(xb)
        grads = torch.autograd.grad(eager, t.params, allow_unused=True)
        pyro.set_rng_seed(1)
        direct = t.kind.train_loss(t.module, xb, t.settings)
        direct_grads = torch.autograd.grad(direct, t.params, allow_unused=True)
    assert torch.allclose(direct, eager, rtol=1e-5), (direct, eager)
    for g, h in zip(grads, direct_grads):
        assert (g is None) == (h is None) or (g if h is None else h).abs().max() == 0
        if g is not None and h is not None:
            assert torch.allclose(g, h, rtol=1e-4, atol=1e-6)


def test_the_models_public_methods_follow_their_device(monkeypatch):
    """FlowDensity and VAE with their parameters and data on a device (``meta``): scoring,
    sampling, encoding and decoding create nothing on the host and read nothing back."""
    from pyro_genext import realnvp
    from pyro_genext.models import VAE, FlowDensity

    x_img = torch.randint(0, 17, (6, 1, 4, 4)).float()
    density = FlowDensity(realnvp((1, 4, 4), hidden_channels=4, num_blocks=1), levels=17)
    vae = VAE((1, 4, 4), 2, hidden_dims=(8,), posterior_flow="realnvp", prior_flow="nice",
              num_flows=2, flow_hidden_dims=(8,))
    vae._elements_per_draw(x_img)  # a one-time probe of the networks' sizes (reads hooks' counts)
    with device_generators(monkeypatch):
        density.to("meta")
        vae.to("meta")
        x = x_img.to("meta")
        mode = FollowsDevice()
        with data_checks(False), torch.no_grad(), mode:
            outputs = [density.log_prob(x), density.log_prob(x, dequantize=True),
                       density.sample(3), density.sample(3, quantize=True),
                       density.decode(density.encode(x)),
                       vae.elbo(x.div(16), num_particles=2), vae.iwae_log_likelihood(x.div(16), 4),
                       vae.log_weights(x.div(16), 2), vae.sample(3), vae.sample(3, mean=True),
                       vae.reconstruct(x.div(16)), vae.decode(vae.encode(x.div(16)))]
    assert not mode.problems, mode.problems[:5]
    assert all(o.device.type == "meta" for o in outputs)


@pytest.mark.parametrize("guide_class", ["AutoRealNVP", "AutoNICE"])
def test_the_flow_guides_follow_their_device(guide_class, monkeypatch):
    """AutoRealNVP/AutoNICE with the model's data on a device (``meta``): the guide builds
    its flow and parameters there, draws, scores with STL, and the ELBO's gradient reaches
    every parameter, each step creating nothing on the host (the engine's host-read-free loss;
    Pyro's own argument validation reads values, so it is off). Its median and quantiles
    draw from a generator on the data's device."""
    import pyro.distributions as dist

    from pyro_genext import infer
    from pyro_genext.engine.step import differentiable_loss

    def model(y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2, device=y.device), 1.0).to_event(1))
        s = pyro.sample("s", dist.LogNormal(torch.zeros((), device=y.device), 1.0))
        with pyro.plate("n", y.shape[0]):
            pyro.sample("y", dist.Normal(mu, s).to_event(1), obs=y)

    y = torch.randn(5, 2).to("meta")
    guide = getattr(infer, guide_class)(model)
    with pyro.validation_enabled(False):
        guide(y)  # the one-time set-up builds the flow on the host and moves it (not a step)
    mode = FollowsDevice()
    with device_generators(monkeypatch), pyro.validation_enabled(False), mode:  # a step
        draws = guide(y)
        loss = differentiable_loss(pyro.infer.Trace_ELBO(), model, guide, y)
        loss.backward()
    assert not mode.problems, mode.problems[:5]
    assert {v.device.type for v in draws.values()} == {"meta"}
    params = list(guide.parameters())
    assert params and all(p.device.type == "meta" and p.grad is not None for p in params)
    # median/quantiles: the generator is asked for on the data's device
    asked: list[torch.device] = []

    class Recording(_Generator):
        def __init__(self, device: Any = "cpu") -> None:
            super().__init__(device)
            asked.append(torch.device(device))

    monkeypatch.setattr(torch, "Generator", Recording)
    with pyro.validation_enabled(False):
        median = guide.median(y)
        quantiles = guide.quantiles([0.25, 0.5], y)
    assert asked and all(d.type == "meta" for d in asked)
    assert {v.device.type for v in [*median.values(), *quantiles.values()]} == {"meta"}
