"""Data-parallel training on the CPU: two gloo processes started by the test itself under
torchrun end with identical parameters, on the same curve as one process with the same
global batch; the command line trains, resumes with another number of processes, and
fails with one line."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_genext.engine import fit

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_ddp_worker.py"

pytestmark = pytest.mark.slow


def _torchrun(args: list[str], nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PYRO_GENEXT_DIST_TIMEOUT="120")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={nproc}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_two_processes_match_each_other_and_one_process(tmp_path):
    r = _torchrun([str(WORKER), str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    p0 = torch.load(tmp_path / "rank0.pt")
    p1 = torch.load(tmp_path / "rank1.pt")
    assert p0.keys() == p1.keys()
    for key in p0:  # DistributedDataParallel keeps the ranks bit for bit in step
        assert torch.equal(p0[key], p1[key]), key
    sys.path.insert(0, str(ROOT / "tests"))
    from _ddp_worker import SETTINGS

    one = fit("realnvp", SETTINGS, progress=False, log=lambda line: None)
    # the same global batch each step: the same run up to rounding. Compared as functions,
    # not parameter by parameter: at the zero-initialised output layers the hidden layers'
    # gradients start at exactly zero, and Adam turns the rounding noise around zero into
    # full-size steps of either sign, which changes those weights but not the density.
    twin = copy.deepcopy(one["module"])
    twin.load_state_dict(p0)
    x = torch.randn(500, 2)
    with torch.no_grad():
        lp_ddp, lp_one = twin.log_prob(x), one["module"].log_prob(x)
    gap = float((lp_ddp - lp_one).abs().mean())
    print("mean |log p gap|, 2 processes vs 1:", gap)
    assert gap < 5e-3
    curve = [h["bpd_mean"] for h in json.loads((tmp_path / "history0.json").read_text())]
    ref = [h["bpd_mean"] for h in one["history"]]
    assert len(curve) == len(ref) and max(abs(a - b) for a, b in zip(curve, ref)) < 1e-3
    # and a run that did not average gradients would not be on that curve: one rank's
    # share of the batch alone gives another function
    half = fit("realnvp", {**SETTINGS, "batch_size": 32}, progress=False, log=lambda line: None)
    with torch.no_grad():
        other = float((half["module"].log_prob(x) - lp_one).abs().mean())
    print("mean |log p gap|, batch 32 vs 64:", other)
    assert other > 10 * gap


def test_cli_under_torchrun_trains_resumes_and_fails_in_one_line(tmp_path):
    out = tmp_path / "run"
    base = ["-m", "pyro_genext.cli", "train", "realnvp", "--data", "moons", "--batch-size",
            "64", "--num-layers", "2", "--hidden", "16", "--out", str(out)]
    r = _torchrun(base + ["--steps", "20", "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    summaries = [line for line in r.stderr.splitlines() if line.startswith("best validation")]
    assert len(summaries) == 1  # rank 0 alone reports
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == 20
    # resumed by one process, with a larger budget
    from pyro_genext.cli import main

    assert main(["train", "realnvp", "--out", str(out), "--resume", "--steps", "30",
                 "--quiet"]) == 0
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 30
    # a global batch that two processes cannot share: one clear line per rank, exit 1
    r = _torchrun(base[:-1] + [str(tmp_path / "bad"), "--steps", "5", "--batch-size", "63"])
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("pyro-genext: error")]
    assert lines and all("divisible by the number of processes (2)" in line for line in lines)
    assert "Traceback" not in "\n".join(lines)
