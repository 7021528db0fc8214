"""How much ``make demo``'s test bits/dim varies, and why.

Runs the demo (``python -m pyro_genext.demo``: RealNVP on digits, 1500 steps, one thread)
in fresh processes, repeated and with the CPU kernels that another machine would pick:
oneDNN's convolutions limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) and MKL's matrix
products on its AVX2 path (``MKL_CBWR=AVX2``). For each run it prints the best
validation step, the test bits/dim and whether the parameters equal the first run's bit
for bit, and the first validation at which the run departs from the first one.

Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/demo_variation.py --json benchmarks/results/demo_variation.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("default", {}), ("default, again", {}), ("oneDNN AVX2", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
            ("MKL AVX2", {"MKL_CBWR": "AVX2"})]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="1500")
    p.add_argument("--json", help="write the table's rows to this file")
    args = p.parse_args(argv)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in VARIANTS:
            out = Path(tmp) / re.sub(r"\W+", "_", name)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}
            r = subprocess.run([sys.executable, "-m", "pyro_genext.demo", "--out", str(out),
                                "--steps", args.steps], env=env, capture_output=True, text=True)
            m = re.search(r"step (\d+)\): bits_per_dim ([0-9.]+)", r.stdout + r.stderr)
            if r.returncode or m is None:
                raise SystemExit(f"{name}: the demo failed:\n{r.stderr[-2000:]}")
            state = torch.load(out / "last.pt", weights_only=False)
            if first is None:
                first = state
            same = all(torch.equal(v, first["model"][k]) for k, v in state["model"].items())
            departs = next((h["step"] for h, g in zip(state["history"], first["history"])
                            if h["bpd_mean"] != g["bpd_mean"]), None)
            row = {"run": name, "env": extra, "best_step": int(m.group(1)),
                   "test_bpd": float(m.group(2)), "bit_equal_to_first": same,
                   "first_differing_validation_step": departs}
            rows.append(row)
            print(f"{name:>16}: best step {row['best_step']}, test bits/dim {row['test_bpd']:.4f}, "
                  f"bit-equal to the first run: {same}, departs at validation step {departs}",
                  flush=True)
    tests = [r["test_bpd"] for r in rows]
    print(f"test bits/dim from {min(tests):.4f} to {max(tests):.4f} (torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()})")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
