"""One section of the GPU check (``benchmarks/gpu_check.sh`` runs them all): each prints
its figures and appends one JSON line per row to ``--results``; ``summary`` prints the
table of every row.

Sections:

* ``cli``: every kind of the command line on the device through ``train`` (digits, a few
  steps), ``train --resume``, ``evaluate`` and ``sample``: NICE, RealNVP on images and on
  vectors, the VAE with each posterior and prior flow and both objectives, and RealNVP
  and the VAE with ``--compile``;
* ``realnvp``: the default image RealNVP (multi-scale, 64 channels, 2 blocks) on
  Fashion-MNIST at batch 256 with ``--autocast bf16`` for ``--seconds``, eager or with
  ``--compile``: steps/s, images/s (timed after the first step), test bits/dim;
* ``vae``: one epoch of the VAE on Fashion-MNIST (batch 100, RealNVP posterior and
  prior), timed, and its validation nats;
* ``guide``: ``fit_guide`` with ``AutoRealNVP`` on a logistic regression whose data live on
  the device, then ``diagnose``.

With ``--smoke`` everything is tiny (digits for Fashion-MNIST, seconds for minutes): a
check that the script runs, on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_genext import engine
from pyro_genext.checks import data_checks
from pyro_genext.cli import main as cli
from pyro_genext.data import load_dataset
from pyro_genext.engine.settings import settings_for
from pyro_genext.engine.trainer import Trainer

DIGITS_VAE = ["--z-dim", "4", "--hidden", "64", "--flow-hidden", "32", "--num-flows", "2"]
CLI_RUNS = {
    "nice": ["nice", "--data", "digits", "--hidden", "64"],
    "realnvp-images": ["realnvp", "--data", "digits", "--hidden", "16", "--num-blocks", "1"],
    "realnvp-vectors": ["realnvp", "--data", "moons", "--num-layers", "4", "--hidden", "32"],
    "vae": ["vae", "--data", "digits", *DIGITS_VAE],
    "vae-gaussian-conv": ["vae", "--data", "digits", *DIGITS_VAE, "--likelihood", "gaussian",
                          "--encoder", "conv", "--conv-channels", "8"],
    "vae-realnvp-realnvp": ["vae", "--data", "digits", *DIGITS_VAE, "--posterior-flow", "realnvp",
                            "--prior-flow", "realnvp"],
    "vae-nice-nice-particles": ["vae", "--data", "digits", *DIGITS_VAE, "--posterior-flow", "nice",
                                "--prior-flow", "nice", "--particles", "3"],
    "vae-iwae-realnvp": ["vae", "--data", "digits", *DIGITS_VAE, "--objective", "iwae",
                         "--posterior-flow", "realnvp"],
    "vae-kl-warmup-free-bits": ["vae", "--data", "digits", *DIGITS_VAE, "--kl-warmup", "10",
                                "--free-bits", "0.1"],
    "realnvp-images-compiled": ["realnvp", "--data", "digits", "--hidden", "16", "--num-blocks", "1",
                                "--compile"],
    "vae-realnvp-compiled": ["vae", "--data", "digits", *DIGITS_VAE, "--posterior-flow", "realnvp",
                             "--prior-flow", "realnvp", "--compile"],
}


def record(args: argparse.Namespace, row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def row_of(args: argparse.Namespace, section: str, name: str) -> Iterator[dict[str, Any]]:
    """A row of the table: filled by the block, which sets ``ok`` (and its figures); an
    exception marks it failed, with its message, and does not stop the section. The row
    (with its ``seconds``, unless the block set them) is recorded either way."""
    row: dict[str, Any] = {"section": section, "name": name}
    start = time.perf_counter()
    try:
        yield row
    except Exception as e:  # one run's failure does not stop the others
        row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        traceback.print_exc()
    row.setdefault("seconds", round(time.perf_counter() - start, 1))
    record(args, row)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def quiet_cli(argv: list[str]) -> tuple[int, str]:
    """``pyro-genext argv`` in this process (no start-up per command); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli(argv)
    return status, out.getvalue()


def section_cli(args: argparse.Namespace) -> None:
    work = Path(args.work) / "cli"
    steps = 6 if args.smoke else 40
    for name, train in CLI_RUNS.items():
        if ("compiled" in name) != (args.compiled == "only") and args.compiled != "all":
            continue
        run = work / name
        with row_of(args, "cli", name) as row:
            pyro.clear_param_store()
            common = ["--device", args.device, "--batch-size", "32", "--quiet", "--out", str(run)]
            status, _ = quiet_cli(["train", *train, *common, "--steps", str(steps), "--overwrite"])
            assert status == 0, f"train: exit {status}"
            pyro.clear_param_store()
            resume = ["train", train[0], "--out", str(run), "--resume", "--steps", str(2 * steps),
                      "--device", args.device, "--quiet"]
            status, _ = quiet_cli(resume)
            assert status == 0, f"train --resume: exit {status}"
            extra = ["--num-samples", "20", "--num-examples", "50"] if train[0] == "vae" else []
            status, text = quiet_cli(["evaluate", str(run), "--device", args.device, "--json", *extra])
            assert status == 0, f"evaluate: exit {status}"
            figures = json.loads(text)
            status, _ = quiet_cli(["sample", str(run), "--device", args.device, "--num", "16",
                                   "--out", str(run / "samples.png")])
            assert status == 0, f"sample: exit {status}"
            key = "bits_per_dim" if "bits_per_dim" in figures else "iwae"
            row.update(ok=True, figure=f"{key} {figures[key]:.4f}")


def _trainer(kind: str, settings: dict[str, Any], args: argparse.Namespace) -> Trainer:
    data = "digits" if args.smoke else "fashion-mnist"
    s = settings_for(engine.get_kind(kind), {"data": data, "device": args.device, "root": args.root,
                                            **settings})
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    train = load_dataset(data, "train", root=args.root)
    val = load_dataset(data, "val", root=args.root)
    t = Trainer(engine.get_kind(kind), s, train, val, device=args.device)
    with data_checks(False):
        t.initialize()
    return t


def _train_for(t: Trainer, seconds: float, device: str) -> dict[str, Any]:
    """Train until ``seconds`` have passed (the first step, which may compile, apart)."""
    with data_checks(False):
        first = time.perf_counter()
        t.train_step()
        t.flush()
        sync(device)
        start = time.perf_counter()
        steps = 0
        while time.perf_counter() - start < seconds and t.step < t.total_steps:
            t.train_step()
            steps += 1
        t.flush()
        sync(device)
    elapsed = time.perf_counter() - start
    return {"first_step_s": round(start - first, 2), "steps": steps, "seconds": round(elapsed, 1),
            "steps_per_s": round(steps / elapsed, 2)}


def section_realnvp(args: argparse.Namespace) -> None:
    name = "realnvp-fmnist" + ("-compiled" if args.compile else "")
    with row_of(args, "realnvp", name) as row:
        batch = 32 if args.smoke else 256
        settings = {"batch_size": batch, "autocast": "none" if args.smoke else "bf16",
                    "epochs": 1000, "compile": args.compile, "compile_mode": args.compile_mode,
                    "hidden": 8 if args.smoke else 64, "num_blocks": 1 if args.smoke else 2}
        t = _trainer("realnvp", settings, args)
        row.update(_train_for(t, args.seconds, args.device))
        row["images_per_s"] = round(row["steps_per_s"] * batch)
        test = load_dataset("digits" if args.smoke else "fashion-mnist", "test", root=args.root)
        values = engine.per_example_metrics(t.kind, t.module, test.x, 0, "test")
        row.update(ok=True, epochs=round(t.step * batch / len(t.train_data), 2),
                   figure=f"test bpd {float(values['bpd'].double().mean()):.4f}")


def section_vae(args: argparse.Namespace) -> None:
    t = None
    with row_of(args, "vae", "vae-fmnist-epoch-realnvp-flows") as row:
        settings = {"batch_size": 100, "epochs": 1, "posterior_flow": "realnvp", "prior_flow": "realnvp"}
        if args.smoke:
            settings.update(z_dim=4, hidden=[32], flow_hidden=[16])
        t = _trainer("vae", settings, args)
        row.update(_train_for(t, math.inf, args.device))
        row["seconds_per_epoch"] = round(row["seconds"] + row["first_step_s"], 1)
        values = t.scores()
        row.update(ok=True, figure=f"val nelbo {float(values['nelbo'].double().mean()):.2f}")
    if t is None:
        return
    with row_of(args, "vae", "vae-gap_decomposition") as row:
        from pyro_genext.data import binarize
        from pyro_genext.models.vae import gap_decomposition

        x = binarize(t.val_data.x[:8].to(args.device), t.val_data.levels,
                     torch.Generator(args.device).manual_seed(0))
        d = gap_decomposition(t.module, x, num_samples=200, elbo_samples=50,
                              steps=20 if args.smoke else 200)
        row.update(ok=True, figure=f"log p(x) {float(d.log_px.double().mean()):.2f} over 8 images")


def section_guide(args: argparse.Namespace) -> None:
    import pyro.distributions as dist

    from pyro_genext.diagnostics import diagnose
    from pyro_genext.infer import AutoRealNVP, fit_guide

    with row_of(args, "guide", "autorealnvp-fit_guide-diagnose") as row:
        start = time.perf_counter()
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        g = torch.Generator().manual_seed(0)
        X = torch.randn(500, 5, generator=g).to(args.device)
        w_true = torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5], device=args.device)
        y = torch.bernoulli(torch.sigmoid(X @ w_true)).to(args.device)

        def model(X: torch.Tensor, y: torch.Tensor | None = None) -> None:
            w = pyro.sample("w", dist.Normal(torch.zeros(5, device=X.device), 1.0).to_event(1))
            with pyro.plate("data", X.shape[0]):
                pyro.sample("y", dist.Bernoulli(logits=(w * X).sum(-1)), obs=y)

        guide = AutoRealNVP(model, num_layers=4, hidden_dims=(32,))
        fit = fit_guide(model, guide, X, y, num_steps=100 if args.smoke else 1500, lr=1e-2,
                        progress_bar=False)
        row["fit_seconds"] = round(time.perf_counter() - start, 1)
        d = diagnose(model, guide, X, y, num_samples=500 if args.smoke else 2000, verbose=False)
        row.update(ok=True, figure=f"loss {fit.losses[-1]:.2f}, {fit.num_steps} steps; log Z "
                                   f"{d.log_evidence:.2f}, k-hat {d.khat:.2f}")


def summary(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    if args.device.startswith("cuda") and torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()} , torch {torch.__version__}")
    print(f"{'section':<10} {'run':<36} {'ok':<4} {'seconds':>8} {'rate':>16}  figure / error")
    for r in rows:
        rate = (f"{r['images_per_s']} img/s" if "images_per_s" in r else
                f"{r['seconds_per_epoch']} s/epoch" if "seconds_per_epoch" in r else
                f"{r['steps_per_s']} steps/s" if "steps_per_s" in r else "")
        what = r.get("figure", "") if r.get("ok") else "FAILED " + r.get("error", "")
        if "first_step_s" in r:
            what += f" (first step {r['first_step_s']} s)"
        print(f"{r['section']:<10} {r['name']:<36} {'yes' if r.get('ok') else 'NO':<4} "
              f"{r.get('seconds', ''):>8} {rate:>16}  {what}")


SECTIONS = {"cli": section_cli, "realnvp": section_realnvp, "vae": section_vae,
            "guide": section_guide, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("section", choices=sorted(SECTIONS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--results", default="gpu_check.jsonl", help="JSON lines, one per row")
    p.add_argument("--work", default="gpu_check_runs", help="folder for the runs' checkpoints")
    p.add_argument("--root", default=None, help="folder holding Fashion-MNIST's files")
    p.add_argument("--seconds", type=float, default=150.0, help="training time of `realnvp`")
    p.add_argument("--compile", action="store_true", help="`realnvp` with --compile")
    p.add_argument("--compile-mode", default="auto", help="`realnvp`'s --compile-mode")
    p.add_argument("--compiled", choices=("skip", "only", "all"), default="all",
                   help="`cli`: the --compile runs too, alone, or not")
    p.add_argument("--smoke", action="store_true", help="tiny everything, for the CPU")
    args = p.parse_args(argv)
    torch.set_num_threads(2 if args.smoke else 8)
    SECTIONS[args.section](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
