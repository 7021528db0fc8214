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


def test_train_evaluate_sample_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run("train", "realnvp", "--data", "moons", "--steps", "40", "--out", str(out), *SMALL)
    assert r.returncode == 0, r.stderr
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    r = run("evaluate", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result) >= {"bits_per_dim", "split", "step"}
    assert 0 < result["bits_per_dim"] < 10
    png = tmp_path / "s.png"
    r = run("sample", str(out), "--num", "100", "--out", str(png))
    assert r.returncode == 0, r.stderr
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
