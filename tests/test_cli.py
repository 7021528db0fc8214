"""The pyro-genext command line, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_genext.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--num-layers", "2", "--hidden", "16", "--batch-size", "100", "--quiet"]


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pyro_genext.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_evaluate_sample_end_to_end(tmp_path, capsys):
    """train as a separate process (the console entry point), then evaluate and sample its
    run (in this process: a new interpreter costs seconds and proves nothing more)."""
    out = tmp_path / "run"
    r = run("train", "realnvp", "--data", "moons", "--steps", "40", "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert main(["evaluate", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"bits_per_dim", "split", "step"}
    assert 0 < result["bits_per_dim"] < 10
    png = tmp_path / "s.png"
    assert main(["sample", str(out), "--num", "100", "--out", str(png)]) == 0
    assert png.stat().st_size > 1000


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "glow", "--data", "moons", "--out", "x"], "invalid choice: 'glow'"),
        (["train", "nice", "--data", "cifar", "--out", "x"], "invalid choice: 'cifar'"),
        (["train", "nice", "--data", "moons", "--out", "x", "--steps", "-3"], ">= 0"),
        (["train", "nice", "--data", "moons", "--out", "x", "--lr", "nan"], "finite number > 0"),
        (["train", "nice", "--data", "moons", "--out", "x", "--batch-size", "zero"], "whole number"),
        (["train", "nice", "--data", "moons", "--out", "x", "--steps", "1", "--epochs", "1"],
         "not allowed with"),
        (["train", "nice", "--data", "moons"], "required: --out"),
        (["sample", "x", "--num", "4", "--out", "s.jpg"], ".png"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err and "Traceback" not in err, err


def test_runtime_errors_exit_1_with_one_line(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad" / "best.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(bad.parent)]) == 1
    err = capsys.readouterr().err.strip()
    assert "corrupt" in err and "\n" not in err
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main(["train", "nice", "--data", "moons", "--out", str(blocked / "sub"), "--steps", "1",
                 *SMALL]) == 1
    assert "cannot be written" in capsys.readouterr().err
    assert main(["train", "nice", "--data", "moons", "--out", str(tmp_path / "r"), "--resume",
                 *SMALL]) == 1
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_checkpoint_of_another_model_version_is_refused_in_one_line(tmp_path, capsys):
    """A checkpoint whose parameters do not fit the model its settings build now (an
    older version's vector RealNVP had no actnorm) gets one clear line, for evaluate and
    for --resume."""
    out = tmp_path / "r"
    args = ["train", "realnvp", "--data", "moons", "--steps", "0", "--out", str(out), *SMALL]
    assert main(args) == 0
    for name in ("best.pt", "last.pt"):
        state = torch.load(out / name, weights_only=False)
        state["model"] = {k: v for k, v in state["model"].items() if "log_scale" not in k}
        torch.save(state, out / name)
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "does not match the model" in err and "missing" in err and "\n" not in err
    assert main([*args[:-len(SMALL)], "--resume", *SMALL]) == 1
    assert "does not match the model" in capsys.readouterr().err


def test_steps_0_writes_an_untrained_checkpoint(tmp_path):
    out = tmp_path / "r"
    assert main(["train", "nice", "--data", "moons", "--steps", "0", "--out", str(out), *SMALL]) == 0
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 0 and (out / "best.pt").exists()


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """Train 30 steps straight, and 12 + resume to 30: identical parameters and history."""
    common = ["train", "realnvp", "--data", "moons", *SMALL, "--checkpoint-every", "5"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*common, "--steps", "30", "--out", str(a)]) == 0
    assert main([*common, "--steps", "12", "--out", str(b)]) == 0
    assert main([*common, "--steps", "30", "--out", str(b), "--resume"]) == 0
    sa = torch.load(a / "last.pt", weights_only=False)
    sb = torch.load(b / "last.pt", weights_only=False)
    assert sa["step"] == sb["step"] == 30
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    assert sa["best"] == sb["best"] and sa["history"][-1] == sb["history"][-1]


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    """SIGKILL a training process mid-run; --resume from what it left reproduces the
    uninterrupted run exactly."""
    import signal
    import time

    from pyro_genext.training import load_checkpoint

    common = ["train", "realnvp", "--data", "moons", *SMALL, "--checkpoint-every", "5"]
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_genext.cli", *common, "--steps", "100000", "--out", str(killed)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if (killed / "last.pt").exists() and load_checkpoint(killed / "last.pt")["step"] >= 10:
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = load_checkpoint(killed / "last.pt")["step"]
    assert 10 <= step < 100000 and step % 5 == 0
    total = step + 12
    assert main([*common, "--steps", str(total), "--out", str(killed), "--resume"]) == 0
    straight = tmp_path / "straight"
    assert main([*common, "--steps", str(total), "--out", str(straight)]) == 0
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(killed / "last.pt")
    assert a["step"] == b["step"] == total
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from pyro_genext import training

    path = tmp_path / "ck.pt"
    training.save_checkpoint(path, {"format": "pyro_genext", "v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        training.save_checkpoint(path, {"v": 2})
    assert torch.load(path, weights_only=False)["v"] == 1  # the old checkpoint survives
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_resume_refuses_different_settings(tmp_path, capsys):
    out = tmp_path / "r"
    common = ["train", "nice", "--data", "moons", "--out", str(out), *SMALL]
    assert main([*common, "--steps", "3"]) == 0
    assert main([*common, "--steps", "6", "--resume", "--lr", "0.01"]) == 1
    assert "--lr 0.01 differs from the checkpoint's 0.001" in capsys.readouterr().err


def test_scale_bound_reaches_every_coupling(tmp_path):
    from pyro_genext.training import density_from_checkpoint, load_checkpoint
    from pyro_genext.transforms import MaskedCoupling

    out = tmp_path / "r"
    assert main(["train", "realnvp", "--data", "moons", "--steps", "0", "--scale-bound", "1.5",
                 "--out", str(out), *SMALL]) == 0
    density, cfg, _ = density_from_checkpoint(load_checkpoint(out))
    bounds = {m.scale_bound for m in density.modules() if isinstance(m, MaskedCoupling)}
    assert cfg.scale_bound == 1.5 and bounds == {1.5}


def _couplings(out):
    from pyro_genext.engine import load_checkpoint, module_from_checkpoint
    from pyro_genext.transforms import MaskedCoupling

    state = load_checkpoint(out / "last.pt")
    module = module_from_checkpoint(state)[0]
    return state, [m for m in module.modules() if isinstance(m, MaskedCoupling)]


IMAGE = ["--hidden", "4", "--num-blocks", "1", "--batch-size", "100", "--quiet"]


@pytest.mark.parametrize("flags,scale,inp", [
    ([], 2.0, 8.0),  # images: the conditioners' inputs bounded by default
    (["--input-bound", "0"], 2.0, None),
    (["--input-bound", "2.5", "--scale-bound=-1,2"], (-1.0, 2.0), 2.5),
])
def test_bounds_reach_every_image_coupling(tmp_path, flags, scale, inp):
    out = tmp_path / "r"
    assert main(["train", "realnvp", "--data", "digits", "--steps", "0", "--out", str(out),
                 *IMAGE, *flags]) == 0
    _, couplings = _couplings(out)
    assert couplings and {(m.scale_bound, m.input_bound) for m in couplings} == {(scale, inp)}


def test_checkpoint_without_input_bound_rebuilds_without_it(tmp_path, capsys):
    """Runs saved before the setting existed were trained without the bound; they are
    evaluated as they were trained."""
    from pyro_genext.engine import save_checkpoint

    out = tmp_path / "r"
    assert main(["train", "realnvp", "--data", "digits", "--steps", "0", "--out", str(out),
                 *IMAGE]) == 0
    state, _ = _couplings(out)
    del state["settings"]["input_bound"]
    save_checkpoint(out / "last.pt", state)
    _, couplings = _couplings(out)
    assert {m.input_bound for m in couplings} == {None}
    assert main(["evaluate", str(out / "last.pt"), "--json"]) == 0


@pytest.mark.parametrize("value,needle", [
    ("0", "got '0'"), ("1,-2", "got '1,-2'"), ("a", "got 'a'"), ("-1,2,3", "got '-1,2,3'"),
])
def test_bad_scale_bound_exits_2(value, needle, capsys):
    assert main(["train", "realnvp", "--data", "digits", f"--scale-bound={value}"]) == 2
    err = capsys.readouterr().err
    assert "expected a number B > 0 or a pair LOW,HIGH with LOW < 0 < HIGH" in err and needle in err


# ------------------------------------------------ what a new user hit (issue 8), one test each
def _train(out, *extra, model="nice", data="moons"):
    return ["train", model, "--data", data, "--out", str(out), *SMALL, *extra]


def test_multi_line_errors_keep_their_whole_message(tmp_path, monkeypatch, capsys):
    """Item 1: data found nowhere: the places looked and the "To fix it" line are printed,
    without a traceback (the old command line cut the message to its first line)."""
    import importlib

    mnist = importlib.import_module("pyro_genext.data.mnist")  # the module, not the function

    def offline(*args, **kwargs):
        raise OSError("mirror http://example.invalid/: network unreachable")

    monkeypatch.setattr(mnist, "_download", offline)
    monkeypatch.delenv("PYRO_GENEXT_DATA", raising=False)
    monkeypatch.setenv("PYRO_GENEXT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    assert main(["train", "realnvp", "--data", "mnist", "--root", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "r"), "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not found: looked for train-images-idx3-ubyte[.gz]" in err
    assert str(tmp_path / "empty") in err and "network unreachable" in err
    assert "To fix it:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) >= 5, err


def test_threads_default_to_the_models_fastest(tmp_path, capsys):
    """Item 2: without --threads, torch runs the model's default thread count (1 for the
    flows, measured fastest), not torch's choice; --threads overrides; --help says so."""
    from pyro_genext.engine import get_kind

    try:
        torch.set_num_threads(2)
        assert main(_train(tmp_path / "a", "--steps", "0")) == 0
        assert torch.get_num_threads() == get_kind("nice").default_threads == 1
        assert main(_train(tmp_path / "b", "--steps", "0", "--threads", "2")) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    capsys.readouterr()
    assert main(["train", "realnvp", "--help"]) == 0
    assert "default: 1, the fastest" in " ".join(capsys.readouterr().out.split())


def test_validation_reports_median_and_worst_and_keeps_the_mean_for_best(tmp_path, capsys):
    """Item 3: the validation summary says mean, median and worst image; evaluate too."""
    out = tmp_path / "r"
    assert main(_train(out, "--steps", "20", model="realnvp")) == 0
    err = capsys.readouterr().err
    assert "median" in err and "worst" in err
    state = torch.load(out / "last.pt", weights_only=False)
    h = state["history"][-1]
    assert h["bpd_median"] <= h["bpd_worst"] and h["bpd_mean"] <= h["bpd_worst"]
    assert state["best"] == min(e["bpd_mean"] for e in state["history"])
    assert main(["evaluate", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_dim_median"] <= result["bits_per_dim_worst"]
    assert result["bits_per_dim"] <= result["bits_per_dim_worst"]


def test_progress_figure_is_robust_to_one_spike():
    """Item 3: one step at 13 million does not move the running figure (the old running
    average, 0.98 r + 0.02 x, read 260000 after it and stayed above 400 for 300 steps)."""
    from pyro_genext.engine import RunningMedian

    running = RunningMedian()
    for _ in range(99):
        running.add(5.0)
    assert running.add(1.3e7) == 5.0
    assert running.add(4.0) == 5.0


def test_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    """Item 4: a second train into the same folder is refused unless --overwrite/--resume."""
    out = tmp_path / "r"
    assert main(_train(out, "--steps", "3")) == 0
    before = torch.load(out / "last.pt", weights_only=False)
    capsys.readouterr()
    assert main(_train(out, "--steps", "5")) == 1
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--overwrite" in err and "--resume" in err
    assert torch.load(out / "last.pt", weights_only=False)["step"] == before["step"] == 3
    assert main(_train(out, "--steps", "5", "--overwrite")) == 0
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 5


def test_resume_takes_its_settings_from_the_checkpoint(tmp_path, capsys):
    """Item 5: --resume with only the run folder and a larger budget continues the run
    exactly; a flag given explicitly that differs names itself and both values, even when
    the flag's value is the default (the checkpoint has --hidden 16, the default is 256)."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_train(a, "--steps", "20")) == 0
    assert main(_train(b, "--steps", "8")) == 0
    assert main(["train", "nice", "--out", str(b), "--resume", "--steps", "20", "--quiet"]) == 0
    sa, sb = (torch.load(p / "last.pt", weights_only=False) for p in (a, b))
    assert sb["settings"]["hidden"] == 16 and sb["step"] == 20
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    capsys.readouterr()
    assert main(["train", "nice", "--out", str(b), "--resume", "--steps", "30", "--hidden", "256"]) == 1
    err = capsys.readouterr().err
    assert "--hidden 256 differs from the checkpoint's 16" in err
    assert main(["train", "realnvp", "--out", str(b), "--resume", "--steps", "30"]) == 1
    assert "trains 'nice', not 'realnvp'" in capsys.readouterr().err


def test_unwritable_output_names_the_users_path(tmp_path, capsys):
    """Item 6: sample into a folder that cannot be written names the path given, not the
    temporary file (the old message named /proc/x.png.tmp.png)."""
    out = tmp_path / "r"
    assert main(_train(out, "--steps", "0")) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--num", "4", "--out", "/proc/x.png"]) == 1
    err = capsys.readouterr().err
    assert "/proc/x.png" in err and ".tmp" not in err, err


def test_version_defaults_batch_size_and_quiet(tmp_path, capsys):
    """Item 7: --version; defaults in --help; a batch larger than the training split is an
    error; --quiet still prints the final summary line."""
    from pyro_genext import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"pyro-genext {__version__}"
    assert main(["train", "nice", "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in shown and "(default: 0.001)" in shown
    assert main(["train", "nice", "--data", "digits", "--out", str(tmp_path / "r"),
                 "--batch-size", "2000", "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "--batch-size 2000 is larger than the training split of digits (1438 examples)" in err
    assert main(_train(tmp_path / "q", "--steps", "2")) == 0  # SMALL has --quiet
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("best validation bpd"), lines


def test_log_is_one_line_per_interval_and_one_summary(tmp_path, capsys):
    """Item 8: 8 epochs (8 validations) log the first validation and the final summary,
    not a line per validation (the default interval is 30 s; 600 here so that a slow
    machine cannot make it flaky); --log-interval 0 logs all."""
    common = ["train", "nice", "--data", "digits", "--epochs", "8", "--batch-size", "200",
              "--hidden", "8", "--num-layers", "2"]
    assert main([*common, "--out", str(tmp_path / "a"), "--log-interval", "600"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(("step ", "best "))]
    assert [ln.split()[0] for ln in lines] == ["step", "best"], lines
    assert main([*common, "--out", str(tmp_path / "b"), "--log-interval", "0"]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert len(lines) == 8


def test_demo_says_where_the_samples_went_once(tmp_path, capsys):
    from pyro_genext import demo

    assert demo.main(["--out", str(tmp_path / "demo"), "--steps", "3"]) == 0
    captured = capsys.readouterr()
    said = [ln for ln in (captured.out + captured.err).splitlines()
            if str(tmp_path / "demo" / "samples.png") in ln and not ln.startswith("$ ")]
    assert len(said) == 1, said
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 1000
    assert demo.main(["--out", str(tmp_path / "demo"), "--steps", "0"]) == 0  # make demo again


def test_checkpoint_of_another_format_gets_one_line(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_train(out, "--steps", "0")) == 0
    state = torch.load(out / "best.pt", weights_only=False)
    state["version"], state["library_version"] = 1, "0.0.9"
    torch.save(state, out / "best.pt")
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert "checkpoint format 1 (written by pyro_genext 0.0.9)" in err and "\n" not in err


# --------------------------------------------- what a user hit (issue 17), one test each
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """An untrained tiny VAE run (a kind with evaluate flags of its own)."""
    out = tmp_path_factory.mktemp("vae") / "v"
    assert main(["train", "vae", "--data", "digits", "--steps", "0", "--z-dim", "2",
                 "--hidden", "8", "--out", str(out), "--quiet"]) == 0
    return out


def test_a_kinds_flags_may_come_before_the_run_folder(vae_run, capsys):
    """`evaluate --num-samples 10 RUN --json` took 10 for the run folder."""
    capsys.readouterr()
    assert main(["evaluate", "--num-samples", "10", "--num-examples", "5", str(vae_run),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 10 and result["model"] == "vae"


def test_evaluate_json_counts_the_evaluated_examples_under_one_name(vae_run, tmp_path, capsys):
    """`num_examples` is the number of examples scored, in every kind (the VAE reported
    the split's size there and the scored count under another key)."""
    capsys.readouterr()
    assert main(["evaluate", str(vae_run), "--num-samples", "2", "--num-examples", "20",
                 "--json"]) == 0
    vae = json.loads(capsys.readouterr().out)
    assert vae["num_examples"] == 20 and "num_evaluated" not in vae
    flow = tmp_path / "f"
    assert main(_train(flow, "--steps", "0")) == 0
    capsys.readouterr()
    assert main(["evaluate", str(flow), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_examples"] == 2000  # the moons test split


def test_a_run_stopped_before_its_first_validation_evaluates_and_samples(tmp_path, capsys):
    """A folder holding only last.pt: evaluate and sample use it (as load_checkpoint
    documents); asking for best explicitly says it is missing."""
    out = tmp_path / "r"
    assert main(["train", "realnvp", "--data", "digits", "--steps", "0", "--out", str(out),
                 *IMAGE]) == 0
    (out / "best.pt").unlink()
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 0
    assert main(["sample", str(out), "--num", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["evaluate", str(out), "--checkpoint", "best"]) == 1
    assert f"no checkpoint at {out / 'best.pt'}" in capsys.readouterr().err


def test_missing_data_names_the_flag_on_the_command_line_and_the_argument_in_python(
        tmp_path, monkeypatch, capsys):
    import importlib

    from pyro_genext.data import DatasetNotFoundError, load_dataset

    mnist = importlib.import_module("pyro_genext.data.mnist")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(mnist, "_download", offline)
    monkeypatch.delenv("PYRO_GENEXT_DATA", raising=False)
    monkeypatch.setenv("PYRO_GENEXT_CACHE", str(tmp_path / "cache"))
    assert main(["train", "realnvp", "--data", "mnist", "--out", str(tmp_path / "r"),
                 "--steps", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pass --root FOLDER" in err and "--root: not given" in err and "root=" not in err, err
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("mnist", "train")
    assert "pass root=FOLDER" in str(e.value) and "--root" not in str(e.value)
