"""The training engine: the step's module, clipping, and a third model kind that joins
the command line without any change to the engine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.nn import PyroModule, PyroParam

from pyro_genext import engine
from pyro_genext.cli import main
from pyro_genext.data import load_dataset


def test_objective_is_the_negative_log_likelihood_per_example():
    """Objective(x) of a flow density (eval mode: no dequantization) is -mean log p(x),
    computed independently by the distribution, and its gradient reaches every parameter."""
    kind = engine.get_kind("realnvp")
    data = load_dataset("moons", "train", num_points=64)
    m = kind.build({**engine.default_settings("realnvp"), "num_layers": 2, "hidden": 8}, data)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)  # leave the identity start
    m.eval()
    obj = engine.Objective(m, kind.loss({}))
    assert isinstance(obj, torch.nn.Module) and set(obj.parameters()) == set(m.parameters())
    loss = obj(data.x)
    expected = -m.distribution.log_prob(data.x).mean()
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_clipping_is_per_parameter_tensor_as_pyro_clip_args():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q, scale in zip(a, b, (0.1, 3.0, 50.0)):
        g = scale * torch.randn(5)
        p.grad, q.grad = g.clone(), g.clone()
    engine.clip_per_tensor(a, 1.0)
    for q in b:
        torch.nn.utils.clip_grad_norm_([q], 1.0)
    for p, q in zip(a, b):
        assert torch.allclose(p.grad, q.grad)
    assert float(a[0].grad.norm()) < 1.0 and abs(float(a[2].grad.norm()) - 1.0) < 1e-5


class Gaussian(PyroModule):
    """A third model kind for the tests: a diagonal Gaussian by maximum likelihood."""

    def __init__(self, dim: int, init_scale: float) -> None:
        super().__init__()
        self.loc = PyroParam(torch.zeros(dim))
        self.log_scale = PyroParam(torch.full((dim,), float(init_scale)).log())

    def dist(self):
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", self.dist(), obs=x)

    def guide(self, x):
        pass


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-scale", type=float, default=1.0, help="starting scale")


def _sample(m, data, args):
    out = args.out.with_suffix(".pt")
    torch.save(m.dist().sample((args.num,)), out)
    return [out]


GAUSSIAN = engine.ModelKind(
    name="gaussian-test", summary="a diagonal Gaussian (test kind)", add_arguments=_add,
    build=lambda s, data: Gaussian(data.event_shape[0], s["init_scale"]),
    loss=lambda s: Trace_ELBO(),
    metrics=lambda m, x: {"nll": -m.dist().log_prob(x)},
    evaluate=lambda m, data, args: {"nll": float(-m.dist().log_prob(data.x).mean())},
    sample=_sample,
)


@pytest.fixture
def gaussian_kind():
    engine.register(GAUSSIAN)
    yield GAUSSIAN
    engine.unregister(GAUSSIAN.name)


def test_a_third_kind_trains_evaluates_and_resumes_through_the_cli(tmp_path, capsys, gaussian_kind):
    """A kind registered from outside gets train (with its own flag), validation with
    mean/median/worst, best checkpoint, bit-exact --resume, evaluate and sample."""
    out, straight = tmp_path / "g", tmp_path / "s"
    common = ["train", "gaussian-test", "--data", "moons", "--batch-size", "500", "--lr", "0.05",
              "--init-scale", "3", "--quiet"]
    assert main([*common, "--steps", "60", "--out", str(straight)]) == 0
    assert main([*common, "--steps", "25", "--out", str(out)]) == 0
    assert main(["train", "gaussian-test", "--out", str(out), "--resume", "--steps", "60", "--quiet"]) == 0
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(out / "last.pt", weights_only=False)
    assert a["kind"] == "gaussian-test" and a["settings"]["init_scale"] == 3.0
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    h = a["history"][-1]
    assert h["nll_median"] <= h["nll_worst"]
    # the fit is the data's own mean and scale: NLL near that of N(mean, sd) of the test split
    x = load_dataset("moons", "test").x
    gauss = dist.Normal(x.mean(0), x.std(0)).to_event(1)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "gaussian-test"
    assert abs(result["nll"] - float(-gauss.log_prob(x).mean())) < 0.05, result
    assert main(["sample", str(out), "--num", "7", "--out", str(tmp_path / "s.png")]) == 0
    assert torch.load(tmp_path / "s.pt").shape == (7, 2)
    r = main(["train", "gaussian-test", "--help"])
    assert r == 0 and "--init-scale" in capsys.readouterr().out


def test_validation_numbers_are_reproducible_and_prepare_sees_eval_mode(gaussian_kind):
    """prepare runs in eval mode for validation, with a generator seeded from (seed, split)."""
    seen = []

    def prepare(m, x, gen):
        seen.append(m.training)
        return x + 0.01 * torch.randn(x.shape, generator=gen)

    kind = engine.ModelKind(**{**GAUSSIAN.__dict__, "prepare": prepare})
    m = kind.build({"init_scale": 1.0}, load_dataset("moons", "val"))
    x = load_dataset("moons", "val").x
    v1 = engine.per_example_metrics(kind, m, x, seed=0, split="val")["nll"]
    v2 = engine.per_example_metrics(kind, m, x, seed=0, split="val")["nll"]
    v3 = engine.per_example_metrics(kind, m, x, seed=1, split="val")["nll"]
    assert torch.equal(v1, v2) and not torch.equal(v1, v3) and v1.shape == (len(x),)
    assert seen and not any(seen) and m.training


def test_fit_refuses_unknown_settings_and_batch_too_large():
    with pytest.raises(ValueError, match="unknown settings for realnvp: hiden"):
        engine.fit("realnvp", {"data": "moons", "hiden": 3})
    with pytest.raises(ValueError, match="larger than the training split"):
        engine.fit("nice", {"data": "moons", "batch_size": 20000}, progress=False)
    with pytest.raises(ValueError, match="every: expected a whole number >= 1"):
        engine.fit("nice", {"data": "moons"}, callback=print, every=0)


def test_a_kinds_own_evaluate_and_sample_flags_reach_it(tmp_path, capsys):
    """add_evaluate_arguments / add_sample_arguments: the flags are parsed once the
    checkpoint names the kind, and reach evaluate/sample; other kinds refuse them."""
    seen = {}

    def evaluate(m, data, args):
        seen["evaluate"] = (args.num_samples, args.split, args.settings["init_scale"])
        return {"nll": 0.0}

    def sample(m, data, args):
        seen["sample"] = args.latent
        return []

    kind = engine.ModelKind(**{
        **GAUSSIAN.__dict__, "name": "gaussian-flags", "evaluate": evaluate, "sample": sample,
        "add_evaluate_arguments": lambda p: p.add_argument("--num-samples", type=int, default=5),
        "add_sample_arguments": lambda p: p.add_argument("--latent", action="store_true"),
    })
    engine.register(kind)
    try:
        out = tmp_path / "g"
        assert main(["train", "gaussian-flags", "--data", "moons", "--steps", "0", "--out", str(out),
                     "--quiet"]) == 0
        assert main(["evaluate", str(out), "--num-samples", "7", "--split", "val"]) == 0
        assert main(["sample", str(out), "--latent", "--out", str(tmp_path / "x.png")]) == 0
        assert seen == {"evaluate": (7, "val", 1.0), "sample": True}
        flow = tmp_path / "f"
        assert main(["train", "nice", "--data", "moons", "--steps", "0", "--out", str(flow),
                     "--hidden", "8", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["evaluate", str(flow), "--num-samples", "7"]) == 2
        assert "unrecognized arguments: --num-samples 7" in capsys.readouterr().err
    finally:
        engine.unregister("gaussian-flags")


def test_warmup_raises_the_learning_rate_linearly_and_resumes_exactly(tmp_path, monkeypatch):
    """``warmup`` N: the k-th update (k = 1, 2, ...) uses lr * min(1, k / N); a run resumed
    inside the warm-up continues it exactly (the rate is a function of the step)."""
    seen = []
    step = torch.optim.Adam.step

    def recording(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording)
    settings = {"data": "moons", "num_layers": 2, "hidden": 8, "batch_size": 100, "lr": 0.01,
                "warmup": 4}
    whole = engine.fit("nice", {**settings, "steps": 6}, tmp_path / "a", progress=False,
                       log=lambda line: None)
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    seen.clear()
    engine.fit("nice", {**settings, "steps": 2}, tmp_path / "b", progress=False,
               log=lambda line: None)
    resumed = engine.fit("nice", {"steps": 6}, tmp_path / "b", resume=True, progress=False,
                         log=lambda line: None)
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    for key, value in whole["module"].state_dict().items():
        assert torch.equal(value, resumed["module"].state_dict()[key]), key


# ------------------------------------------- engine defects found in review (issue 17)
def _quiet(line: str) -> None:
    pass


def _same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key, value in sa.items():
        assert torch.equal(value, sb[key]), key


def test_ctrl_c_resumes_bit_exactly(tmp_path):
    """Ctrl-C (SIGINT) in the middle of step 7 (while its batch is being prepared, after
    the data position moved): the run finishes that step, saves last.pt and
    raises KeyboardInterrupt; resuming from last.pt gives the uninterrupted run's
    parameters bit for bit (the old snapshot held the moved position but not the step, so
    the resumed run skipped a batch)."""
    armed, calls = [False], [0]

    def prepare(m, x, gen):
        if m.training:  # training batches draw from the engine's training generator
            calls[0] += 1
            if armed[0] and calls[0] == 7:
                os.kill(os.getpid(), signal.SIGINT)
            return x + 0.01 * torch.randn(x.shape, generator=gen)
        return x

    kind = dataclasses.replace(GAUSSIAN, prepare=prepare)
    settings = {"data": "moons", "steps": 12, "batch_size": 500, "lr": 0.05, "init_scale": 3.0}
    straight = engine.fit(kind, settings, tmp_path / "a", progress=False, log=_quiet)
    armed[0], calls[0] = True, 0
    with pytest.raises(KeyboardInterrupt):
        engine.fit(kind, settings, tmp_path / "b", progress=False, log=_quiet)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 7
    armed[0] = False
    resumed = engine.fit(kind, {"steps": 12}, tmp_path / "b", resume=True, progress=False,
                         log=_quiet)
    _same_parameters(straight["module"], resumed["module"])
    assert straight["history"] == resumed["history"]


def _nan_from(first_bad: int):
    """GAUSSIAN whose training batches turn NaN from the ``first_bad``-th step on."""
    calls = [0]

    def prepare(m, x, gen):
        if m.training:
            calls[0] += 1
            if calls[0] >= first_bad:
                return x * math.nan
        return x

    return dataclasses.replace(GAUSSIAN, prepare=prepare)


def test_a_nan_loss_names_a_checkpoint_only_when_one_exists(tmp_path):
    settings = {"data": "moons", "steps": 10, "batch_size": 500, "init_scale": 1.0,
                "checkpoint_every": 2}
    with pytest.raises(FloatingPointError) as e:
        engine.fit(_nan_from(1), settings, tmp_path / "a", progress=False, log=_quiet)
    msg = str(e.value)
    assert "at step 1" in msg and "no checkpoint was written" in msg and "last.pt" not in msg
    assert not (tmp_path / "a" / "last.pt").exists()
    with pytest.raises(FloatingPointError) as e:
        engine.fit(_nan_from(6), settings, tmp_path / "b", progress=False, log=_quiet)
    msg = str(e.value)
    assert "at step 6" in msg and f"last checkpoint (step 4) is {tmp_path / 'b' / 'last.pt'}" in msg
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 4


def test_resume_and_overwrite_remove_a_killed_runs_temporary_files(tmp_path):
    """A process killed while writing a checkpoint leaves ``last.pt.<random>.tmp``:
    --resume and --overwrite remove those (and only those)."""
    out = tmp_path / "r"
    settings = {"data": "moons", "steps": 2, "batch_size": 500}
    engine.fit(GAUSSIAN, {**settings, "init_scale": 1.0}, out, progress=False, log=_quiet)
    for mode in ("resume", "overwrite"):
        stale = [out / "last.pt.k1ll3d.tmp", out / "best.pt.abc_12.tmp"]
        for path in stale:
            path.write_bytes(b"half a checkpoint")
        keep = out / "notes.tmp"
        keep.write_text("mine")
        given = {"steps": 3} if mode == "resume" else {**settings, "init_scale": 1.0}
        engine.fit(GAUSSIAN, given, out, progress=False, log=_quiet, **{mode: True})
        assert not any(p.exists() for p in stale) and keep.read_text() == "mine"


def test_a_crash_between_the_two_checkpoint_writes_leaves_no_stale_best(tmp_path, monkeypatch):
    """A validation that improves writes best.pt and last.pt; the process dies after the
    first of the two. Resuming must agree with best.pt: the run's best step is the step of
    the model in best.pt (the old order, best.pt first, left last.pt believing an older
    best, which a resumed run could replace by a worse model)."""

    class Crash(Exception):
        pass

    save, writes = torch.save, [0]

    def crashing_save(obj, f, *args, **kwargs):
        writes[0] += 1
        if writes[0] == 4:  # the second file of the second validation (steps 4 and 8)
            raise Crash
        return save(obj, f, *args, **kwargs)

    out = tmp_path / "r"
    settings = {"data": "moons", "steps": 8, "batch_size": 2500, "lr": 0.05, "init_scale": 3.0}
    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(Crash):
        engine.fit(GAUSSIAN, settings, out, progress=False, log=_quiet)
    monkeypatch.setattr(torch, "save", save)
    at = torch.load(out / "last.pt", weights_only=False)["step"]
    result = engine.fit(GAUSSIAN, {"steps": at}, out, resume=True, progress=False, log=_quiet)
    best = torch.load(out / "best.pt", weights_only=False)
    assert result["best_step"] == best["step"] and result["best"] == best["best_summary"]


def test_a_run_resumed_with_its_budget_already_spent_still_validates(tmp_path):
    """A run killed after a periodic checkpoint (step 5, no validation yet) and resumed with
    --steps 5: the run ends at once with the validation every run ends with (it returned no
    best, and the command line failed with KeyError: 'metric_mean')."""

    class Killed(Exception):
        pass

    def kill_at_7(trainer):
        if trainer.step == 7:
            raise Killed

    out = tmp_path / "r"
    settings = {"data": "moons", "steps": 20, "batch_size": 500, "init_scale": 1.0,
                "checkpoint_every": 5}
    with pytest.raises(Killed):
        engine.fit(GAUSSIAN, settings, out, progress=False, log=_quiet, callback=kill_at_7)
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]
    result = engine.fit(GAUSSIAN, {"steps": 5}, out, resume=True, progress=False, log=_quiet)
    assert (result["steps"], result["best_step"], result["last"]["step"]) == (5, 5, 5)
    assert engine.load_checkpoint(out / "best.pt")["step"] == 5
    assert engine.describe_result(result).startswith("best validation nll ")
    again = engine.fit(GAUSSIAN, {"steps": 5}, out, resume=True, progress=False, log=_quiet)
    assert again["history"] == result["history"]  # validated once, not at each resume


def test_on_step_runs_right_before_each_loss_with_the_steps_taken(tmp_path):
    """ModelKind.on_step(module, step, settings): before each training step's loss, after
    the batch is prepared, with the number of optimiser steps already taken (0 first); a
    resumed run continues the count. Not called for validation."""
    events = []

    class Recording(Gaussian):
        def model(self, x):
            if self.training:
                events.append("loss")
            super().model(x)

    def prepare(m, x, gen):
        if m.training:
            events.append("prepare")
        return x

    kind = dataclasses.replace(
        GAUSSIAN, build=lambda s, data: Recording(data.event_shape[0], s["init_scale"]),
        prepare=prepare,
        on_step=lambda m, step, s: events.append((step, s["init_scale"], m.training)))
    settings = {"data": "moons", "steps": 3, "batch_size": 500, "init_scale": 2.0}
    engine.fit(kind, settings, tmp_path / "r", progress=False, log=_quiet)
    assert events == [e for k in range(3) for e in ("prepare", (k, 2.0, True), "loss")]
    events.clear()
    engine.fit(kind, {"steps": 5}, tmp_path / "r", resume=True, progress=False, log=_quiet)
    assert [e[0] for e in events if isinstance(e, tuple)] == [3, 4]


# ----------------------------------------------------- the pieces, reached directly
def test_settings_defaults_checks_and_the_resume_merge(tmp_path):
    from pyro_genext.engine.settings import COMMON, INVOCATION, resume_settings

    s = engine.default_settings(GAUSSIAN)
    assert set(s) == {c.key for c in COMMON if c.key not in INVOCATION} | {"init_scale"}
    assert (s["batch_size"], s["lr"], s["warmup"], s["init_scale"]) == (64, 1e-3, 0, 1.0)
    assert engine.default_settings("realnvp")["warmup"] == 50  # the kind's default
    for bad, needle in [({"lr": -1}, "--lr: expected a finite number > 0, got -1"),
                        ({"batch_size": 2.5}, "--batch-size: expected a whole number >= 1"),
                        ({"autocast": "fp8"}, "--autocast: unknown value 'fp8'"),
                        ({"data": None}, "--data: a data set is required"),
                        ({"steps": 3, "epochs": 1}, "not both")]:
        with pytest.raises(ValueError, match=needle):
            engine.check_settings({**s, "data": "moons", **bad})
    saved = {"kind": "gaussian-test", "settings": {**s, "data": "moons", "steps": 10}}
    merged = resume_settings(GAUSSIAN, {"epochs": 3, "device": "cpu", "init_scale": 1.0},
                             saved, tmp_path)
    assert (merged["steps"], merged["epochs"], merged["data"]) == (None, 3, "moons")
    with pytest.raises(ValueError, match="--init-scale 2.0 differs from the checkpoint's 1.0"):
        resume_settings(GAUSSIAN, {"init_scale": 2.0}, saved, tmp_path)
    with pytest.raises(ValueError, match="trains 'gaussian-test', not 'nice'"):
        resume_settings(engine.get_kind("nice"), {}, saved, tmp_path)


def test_run_folder_rules(tmp_path):
    from pyro_genext.engine.checkpoint import open_run_folder

    out = tmp_path / "r"
    open_run_folder(out, resume=None, overwrite=False)  # created
    engine.save_checkpoint(out / "last.pt", {"step": 4, "best_step": 2})
    (out / "last.pt.x1.tmp").write_bytes(b"")
    with pytest.raises(engine.RunExistsError, match="--resume to continue it or --overwrite"):
        open_run_folder(out, resume=None, overwrite=False)
    open_run_folder(out, resume=None, overwrite=True, writer=False)  # another rank: no change
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "last.pt.x1.tmp"]
    open_run_folder(out, resume={"step": 4, "best_step": 4}, overwrite=False)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]  # best repaired
    open_run_folder(out, resume=None, overwrite=True)
    assert list(out.iterdir()) == []


def test_a_run_that_cannot_start_leaves_the_run_folder_alone(tmp_path):
    """--overwrite removes the old checkpoints only once the new run is built: a model the
    kind refuses to build (here, as the VAE refuses --free-bits with a flow) keeps the old
    run, and a new run that cannot start leaves no folder behind."""

    def refuse(s, data):
        raise ValueError("cannot build this model")

    out = tmp_path / "r"
    settings = {"data": "moons", "steps": 0, "batch_size": 500, "init_scale": 1.0}
    engine.fit(GAUSSIAN, settings, out, progress=False, log=_quiet)
    broken = dataclasses.replace(GAUSSIAN, build=refuse)
    with pytest.raises(ValueError, match="cannot build"):
        engine.fit(broken, settings, out, overwrite=True, progress=False, log=_quiet)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]
    with pytest.raises(ValueError, match="cannot build"):
        engine.fit(broken, settings, tmp_path / "new", progress=False, log=_quiet)
    assert not (tmp_path / "new").exists()


def test_a_run_folder_that_holds_a_run_is_refused_before_any_work(tmp_path):
    """Without --resume or --overwrite, a folder holding a run is refused before the data
    are loaded or the model is built (here a kind whose build would fail, and data that
    do not exist, would otherwise be the error)."""
    out = tmp_path / "r"
    settings = {"data": "moons", "steps": 0, "batch_size": 500, "init_scale": 1.0}
    engine.fit(GAUSSIAN, settings, out, progress=False, log=_quiet)

    def refuse(s, data):
        raise AssertionError("the model was built")

    broken = dataclasses.replace(GAUSSIAN, build=refuse)
    missing = {**settings, "data": "fashion-mnist", "root": str(tmp_path / "no-such-folder")}
    with pytest.raises(engine.RunExistsError, match="already holds a training run"):
        engine.fit(broken, missing, out, progress=False, log=_quiet)
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt"]


def _trainer(**settings):
    s = {**engine.default_settings(GAUSSIAN), "data": "moons", "batch_size": 100, "lr": 0.01,
         "init_scale": 2.0, **settings}
    tr, va = load_dataset("moons", "train"), load_dataset("moons", "val")
    return engine.Trainer(GAUSSIAN, s, tr, va, log=_quiet)


def test_one_training_step_is_adams_first_update_on_the_clipped_gradient():
    """The first step's loss is -mean log p of the first batch of the seeded permutation;
    Adam's first update moves each entry by -lr g / (|g| + eps) (Kingma & Ba 2015, with
    bias correction), g the gradient after clipping; with warm-up N the rate is lr / N."""
    t = _trainer(warmup=4, clip_norm=0.5)
    x = t.train_data.x[t.perm[:100]]
    before = {k: v.detach().clone() for k, v in t.module.named_parameters()}
    probe = Gaussian(2, 2.0)
    probe.load_state_dict(t.module.state_dict())
    expected = -probe.dist().log_prob(x).mean()
    expected.backward()
    loss = t.train_step()
    assert t.step == 1 and torch.allclose(loss, expected.detach())
    for name, p in probe.named_parameters():
        g = p.grad * (0.5 / (p.grad.norm() + 1e-6)).clamp(max=1.0)
        step = (0.01 / 4) * g / (g.abs() + 1e-8)
        got = dict(t.module.named_parameters())[name].detach()
        assert torch.allclose(got, before[name] - step, atol=1e-7), name


def test_a_trainers_state_restores_into_a_fresh_trainer_bit_for_bit():
    """state_dict() taken after 3 steps, loaded into a new trainer: both then take the same
    steps (across epoch boundaries: 4 steps an epoch) and end equal."""
    a = _trainer(batch_size=2500)
    for _ in range(3):
        a.train_step()
    b = _trainer(batch_size=2500)
    b.load_state_dict(a.state_dict())
    assert b.step == 3 and torch.equal(b.perm, a.perm)
    for _ in range(6):
        a.train_step()
        b.train_step()
    _same_parameters(a.module, b.module)
    assert (a.epoch, a.pos) == (b.epoch, b.pos) == (2, 2500)


def test_dependencies_run_one_way():
    """The engine's modules import only those before them in the documented order (the
    core knows no concrete kind); the kinds import the core, never the loop or the
    registry; the registry's one reference to the kinds is made when a name is asked for."""
    import ast
    from pathlib import Path

    root = Path(engine.__file__).parent
    order = ["kind", "settings", "checkpoint", "step", "validation", "progress", "registry",
             "trainer"]

    def imports(path: Path, top_level_only: bool) -> set[str]:
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        found = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                found.add("." * node.level + node.module)
            elif isinstance(node, ast.ImportFrom) and node.level:  # from . import x
                found.update("." * node.level + a.name for a in node.names)
        return found

    for i, name in enumerate(order):
        own = {m.lstrip(".") for m in imports(root / f"{name}.py", False) if m.startswith(".") and
               not m.startswith("..")}
        assert own <= set(order[:i]), (name, own - set(order[:i]))
        upward = {m for m in imports(root / f"{name}.py", True) if "kinds" in m}
        assert not upward, (name, upward)
    assert "..kinds" in imports(root / "registry.py", False)  # inside kinds(), at call time
    for kind_file in (root.parent / "kinds").glob("*.py"):
        engine_imports = {m for m in imports(kind_file, False) if m.startswith("..engine")}
        assert engine_imports <= {"..engine.kind", "..engine.settings", "..engine.validation"}, \
            (kind_file.name, engine_imports)


def test_a_kinds_flags_may_live_in_argument_groups():
    """A kind's add_arguments hook may use groups: their defaults are still settings
    defaults, and the parsed namespace still holds only the flags given."""
    from pyro_genext.engine.settings import SettingsParser

    def add(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--kl-warmup", type=int, default=0, help="KL warm-up steps")
        g.add_argument("--free-bits", type=float, default=0.0, help="nats per latent")
        p.add_argument_group("prior").add_argument("--prior-flow", default="none", help="the prior")

    kind = dataclasses.replace(GAUSSIAN, add_arguments=add)
    s = engine.default_settings(kind)
    assert (s["kl_warmup"], s["free_bits"], s["prior_flow"]) == (0, 0.0, "none")
    p = SettingsParser()
    engine.add_train_arguments(p, kind)
    assert vars(p.parse_args(["--free-bits", "0.5", "--lr", "0.01"])) == {"free_bits": 0.5,
                                                                          "lr": 0.01}
    shown = " ".join(p.format_help().split())
    assert "KL warm-up steps (default: 0)" in shown and "the prior (default: 'none')" in shown


def test_parameters_that_do_not_fit_are_refused_naming_both_versions():
    """Wrong names or wrong shapes: one line naming this version and the writer's."""
    from pyro_genext import __version__
    from pyro_genext.engine.checkpoint import load_model_state

    own = Gaussian(2, 1.0).state_dict()
    wider = {k: torch.zeros(3) for k in own}
    fewer = dict(list(own.items())[:1])
    for model in (wider, fewer):
        with pytest.raises(engine.CheckpointError) as e:
            load_model_state(Gaussian(2, 1.0), {"model": model, "library_version": "0.0.9"})
        msg = str(e.value)
        assert f"({__version__})" in msg and "written by version 0.0.9" in msg and "\n" not in msg


def _interrupted_in_last_validation():
    """GAUSSIAN whose validation sends Ctrl-C (SIGINT) on its ``fire_at[0]``-th batch:
    ``prepare`` counts the batches it sees in eval mode in ``seen[0]``."""
    seen, fire_at = [0], [0]

    def prepare(m, x, gen):
        if not m.training:
            seen[0] += 1
            if seen[0] == fire_at[0]:
                os.kill(os.getpid(), signal.SIGINT)
        return x

    return dataclasses.replace(GAUSSIAN, prepare=prepare), seen, fire_at


def test_ctrl_c_in_the_final_validation_of_a_completed_run_is_not_an_interruption(tmp_path):
    """Ctrl-C that lands while the last step's validation runs: the validation finishes,
    last.pt holds the final step and the run returns its result (the command line then
    exits 0 with its summary); before, it raised KeyboardInterrupt (exit 130, no summary)
    although nothing was left to do."""
    kind, seen, fire_at = _interrupted_in_last_validation()
    # moons has 10,000 training points: an epoch is 4 steps, validations at steps 4 and 6
    settings = {"data": "moons", "steps": 6, "batch_size": 2500, "lr": 0.05, "init_scale": 3.0}
    straight = engine.fit(kind, settings, tmp_path / "a", progress=False, log=_quiet)
    assert [h["step"] for h in straight["history"]] == [4, 6]
    lines: list[str] = []
    fire_at[0], seen[0] = seen[0], 0  # the last batch of the last validation
    done = engine.fit(kind, settings, tmp_path / "b", progress=False, log=lines.append)
    assert seen[0] == fire_at[0]  # the signal was sent
    assert done["steps"] == 6 and done["history"] == straight["history"]
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 6
    assert any("complete" in line for line in lines), lines
    # Ctrl-C in an earlier validation (step 4) still stops the run there
    fire_at[0], seen[0] = 1, 0
    with pytest.raises(KeyboardInterrupt):
        engine.fit(kind, settings, tmp_path / "c", progress=False, log=_quiet)
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=False)["step"] == 4


def test_a_nan_in_validation_names_the_checkpoint_to_resume_from(tmp_path):
    armed = [False]

    def metrics(m, x):
        nll = -m.dist().log_prob(x)
        return {"nll": nll * math.nan if armed[0] else nll}

    def arm(trainer):  # after step 6: the validation of step 8 is NaN
        armed[0] = trainer.step >= 6

    kind = dataclasses.replace(GAUSSIAN, metrics=metrics)
    # validations at steps 4 (last.pt), 8 (NaN); checkpoints every 3 steps: step 6 is the last
    settings = {"data": "moons", "steps": 12, "batch_size": 2500, "init_scale": 1.0,
                "checkpoint_every": 3}
    with pytest.raises(FloatingPointError) as e:
        engine.fit(kind, settings, tmp_path / "a", progress=False, log=_quiet, callback=arm)
    msg = str(e.value)
    saved = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["step"]
    assert msg.startswith("validation nll is nan at step 8") and saved == 6
    assert f"the last checkpoint (step {saved}) is {tmp_path / 'a' / 'last.pt'}" in msg, msg
    assert "--resume" in msg
