"""Throughput of coupling flows: pyro_genext against its peers and against the floor.

For RealNVP (8 affine couplings) and NICE (4 additive couplings and a scaling), at each
vector size D and conditioner width, this times

* a training step: ``-log_prob(batch).mean()``, ``backward()``, ``zero_grad()``;
* a sampled batch under ``torch.no_grad()``;

for the floor (the conditioner networks alone, see ``_peers.build_floor``), ours
(``pyro_genext.realnvp`` / ``pyro_genext.nice``), nflows, normflows, zuko and Pyro's
``AffineCoupling``, all with the same architecture (see ``_peers``). Timings are
interleaved: every repeat visits every implementation in turn (the order rotates from
repeat to repeat), so a burst of load on the machine hits them all alike. Each timing is
the mean over enough back-to-back calls to last ``--min-time`` seconds; the tables give
the median over repeats and the interquartile range (IQR).

Usage::

    .venv/bin/python benchmarks/throughput.py                  # full run, a few minutes
    .venv/bin/python benchmarks/throughput.py --quick          # smoke test, < 60 s
    .venv/bin/python benchmarks/throughput.py --dims 784 --widths 1024 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _peers import BUILDERS, Config, Contender, Unavailable, library_versions

ROOT = Path(__file__).resolve().parents[1]
NUM_BATCHES = 4  # distinct data tensors, used in turn (see _run_config)


# ---------------------------------------------------------------------------- timing
Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def _sync() -> None:
    """Wait for queued GPU work (a no-op on the CPU), so that a timing covers it."""
    if torch.cuda.is_available() and torch.get_default_device().type == "cuda":
        torch.cuda.synchronize()


def _time_per_call(fn: Callable[[], None], calls: int, clock: Clock) -> float:
    """Mean seconds per call of ``fn()`` over ``calls`` back-to-back calls, GC paused."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        _sync()
        start = clock()
        for _ in range(calls):
            fn()
        _sync()
        return (clock() - start) / calls
    finally:
        if gc_was_on:
            gc.enable()


def _calls_for(fn: Callable[[], None], min_time: float, clock: Clock) -> int:
    """How many calls of ``fn`` last about ``min_time`` seconds."""
    once = min(_time_per_call(fn, 1, clock) for _ in range(2))
    return max(1, math.ceil(min_time / max(once, 1e-9)))


def _summary(ms: Sequence[float]) -> dict[str, Any]:
    if len(ms) == 1:
        q1 = med = q3 = ms[0]
    else:
        q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median_ms": med, "iqr_ms": q3 - q1, "min_ms": min(ms), "samples_ms": list(ms)}


def _run_config(
    cfg: Config,
    names: Sequence[str],
    repeats: int,
    min_time: float,
    warmup: int,
    clock: Clock,
) -> tuple[list[dict[str, Any]], list[str]]:
    contenders: list[Contender] = []
    notes: list[str] = []
    for name in names:
        torch.manual_seed(0)
        try:
            contenders.append(BUILDERS[name](cfg))
        except Unavailable as why:
            notes.append(f"{name}: skipped for {cfg.flow}: {why}")
    if not contenders:
        return [], notes
    # Several distinct data tensors, used in turn: Pyro's AffineCoupling caches its last
    # inverse by tensor identity and fails on the second step if it is fed the same
    # tensor again (see benchmarks/README.md).
    torch.manual_seed(1)
    batches = [torch.randn(cfg.batch, cfg.dim) for _ in range(NUM_BATCHES)]

    def tasks(c: Contender) -> dict[str, Callable[[], None]]:
        turn = itertools.cycle(batches)  # never the same tensor twice in a row
        return {"train": lambda: c.train_step(next(turn)), "sample": c.sample_batch}

    runs = {c.name: tasks(c) for c in contenders}
    calls: dict[tuple[str, str], int] = {}
    for c in contenders:
        for task, fn in runs[c.name].items():
            for _ in range(warmup):
                fn()
            calls[c.name, task] = _calls_for(fn, min_time, clock)

    times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for r in range(repeats):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            for task, fn in runs[c.name].items():
                seconds = _time_per_call(fn, calls[c.name, task], clock)
                times[c.name, task].append(1e3 * seconds)

    rows = []
    for c in contenders:
        rows.append({
            "flow": cfg.flow, "dim": cfg.dim, "width": cfg.width, "batch": cfg.batch,
            "layers": cfg.layers, "implementation": c.name, "params": c.params,
            "note": c.note,
            "train": {**_summary(times[c.name, "train"]), "calls": calls[c.name, "train"]},
            "sample": {**_summary(times[c.name, "sample"]), "calls": calls[c.name, "sample"]},
        })
        if c.note:
            notes.append(f"{c.name} ({cfg.flow}): {c.note}")
    return rows, notes


# ---------------------------------------------------------------------------- report
def _table(rows: list[dict[str, Any]]) -> str:
    floor = next((r for r in rows if r["implementation"].startswith("floor")), None)

    def ratio(row: dict[str, Any], task: str) -> str:
        if floor is None:
            return "-"
        return f"{row[task]['median_ms'] / floor[task]['median_ms']:.2f}"

    lines = [
        "| implementation | params | train ms/step | IQR | x floor "
        "| sample ms/batch | IQR | x floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        tr, sa = row["train"], row["sample"]
        lines.append(
            f"| {row['implementation']} | {row['params']:,} | {tr['median_ms']:.2f} "
            f"| {tr['iqr_ms']:.2f} | {ratio(row, 'train')} | {sa['median_ms']:.2f} "
            f"| {sa['iqr_ms']:.2f} | {ratio(row, 'sample')} |"
        )
    return "\n".join(lines)


def _verdict(rows: list[dict[str, Any]]) -> str:
    """Ours (eager) against issue 18's targets: a training step at most 1.10x the floor, a
    sampled batch at most 1.15x, faster than every peer."""
    by = {r["implementation"]: r for r in rows}
    ours = by.get("pyro_genext (ours)")
    floor = next((r for n, r in by.items() if n.startswith("floor")), None)
    if ours is None:
        return ""
    out = []
    for task, target in (("train", 1.10), ("sample", 1.15)):
        mine = ours[task]["median_ms"]
        parts = [f"{task}:"]
        if floor is not None:
            ratio = mine / floor[task]["median_ms"]
            verdict = "meets" if ratio <= target else "misses"
            parts.append(f"{ratio:.2f}x floor ({verdict} {target:.2f}x)")
        peers = [r for n, r in by.items()
                 if r is not floor and not n.startswith(("pyro_genext", "ours"))]
        if peers:
            best = min(peers, key=lambda r: r[task]["median_ms"])
            speed = best[task]["median_ms"] / mine
            parts.append(
                f"fastest peer {best['implementation']} {best[task]['median_ms']:.2f} ms "
                f"(ours is {speed:.2f}x as fast)"
            )
        out.append(" ".join(parts))
    return "; ".join(out)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _machine(threads: int) -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "versions": library_versions(),
        "loadavg_start": os.getloadavg(),
    }


# ---------------------------------------------------------------------------- CLI
def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: D=16, width 32, 3 repeats (well under a minute)")
    p.add_argument("--flows", default="realnvp,nice", help="realnvp and/or nice")
    p.add_argument("--dims", type=_ints, default=None, help="vector sizes (default 64,784)")
    p.add_argument("--widths", type=_ints, default=None,
                   help="conditioner widths, 2 hidden layers each (default 256,1024)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=None, help="timings per implementation")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds each timing lasts at least (default 0.25)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu",
                   help="where every contender is built and run (torch.set_default_device), "
                        "e.g. cuda; timings then wait for the GPU (use --clock wall)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: elapsed time (default); cpu: CPU time of this process, which "
                        "other processes on a busy machine disturb less (use with --threads 1: "
                        "with more threads it adds up the time of all of them)")
    p.add_argument("--impls", default=",".join(BUILDERS),
                   help=f"implementations to run, from {','.join(BUILDERS)}")
    p.add_argument("--validate", action="store_true",
                   help="keep torch.distributions argument validation on (off by default)")
    p.add_argument("--json", type=Path, default=None, help="also save the results here")
    args = p.parse_args(argv)
    quick = args.quick
    args.dims = args.dims or ([16] if quick else [64, 784])
    args.widths = args.widths or ([32] if quick else [256, 1024])
    args.repeats = args.repeats or (3 if quick else 7)
    args.min_time = args.min_time if args.min_time is not None else (0.01 if quick else 0.25)
    args.warmup = 3
    args.flows = [f for f in args.flows.replace(",", " ").split()]
    args.impls = [n for n in args.impls.replace(",", " ").split()]
    for f in args.flows:
        if f not in ("realnvp", "nice"):
            p.error(f"--flows: expected realnvp or nice, got {f!r}")
    for n in args.impls:
        if n not in BUILDERS:
            p.error(f"--impls: expected names from {sorted(BUILDERS)}, got {n!r}")
    for d in args.dims:
        if d < 2 or d % 2:
            p.error(f"--dims: expected even sizes >= 2 (couplings split halves), got {d}")
    if args.repeats < 1 or args.batch < 1 or args.threads < 1:
        p.error("--repeats, --batch and --threads must be >= 1")
    if args.device != "cpu" and args.clock == "cpu":
        p.error("--clock cpu counts this process's CPU time, not the GPU's: use --clock wall")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:  # run from a checkout without installing the package
        sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    torch.set_default_device(args.device)
    torch.distributions.Distribution.set_default_validate_args(args.validate)
    import pyro

    pyro.enable_validation(args.validate)
    machine = _machine(args.threads)
    machine["device"] = args.device
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    print(f"# Coupling-flow throughput, batch {args.batch}")
    print(f"cpu: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), "
          f"torch threads: {args.threads}, python {machine['python']}, device {args.device}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()))
    print(f"load average at start: {', '.join(f'{v:.2f}' for v in machine['loadavg_start'])}")
    print(f"clock: {args.clock}; repeats: {args.repeats}, each timing >= {args.min_time} s, "
          f"interleaved; validation {'on' if args.validate else 'off'}\n")

    results: list[dict[str, Any]] = []
    notes: list[str] = []
    verdicts: list[str] = []
    start = time.perf_counter()
    for flow in args.flows:
        for dim in args.dims:
            for width in args.widths:
                cfg = Config(flow, dim, width, args.batch)
                gc.collect()
                rows, cfg_notes = _run_config(
                    cfg, args.impls, args.repeats, args.min_time, args.warmup, CLOCKS[args.clock]
                )
                results += rows
                notes += cfg_notes
                if not rows:
                    continue
                print(f"## {flow}: {cfg.layers} couplings, D={dim}, width {width}\n")
                print(_table(rows))
                verdict = _verdict(rows)
                if verdict:
                    print(f"\nours: {verdict}")
                    verdicts.append(f"{cfg.label()}: {verdict}")
                print(flush=True)
    machine["loadavg_end"] = os.getloadavg()
    machine["wall_s"] = time.perf_counter() - start
    if notes:
        print("Notes:")
        for note in dict.fromkeys(notes):
            print(f"- {note}")
    print(f"\nload average at end: {', '.join(f'{v:.2f}' for v in machine['loadavg_end'])}; "
          f"wall time {machine['wall_s']:.0f} s")
    if args.json is not None:
        payload = {
            "machine": machine,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results,
            "notes": list(dict.fromkeys(notes)),
            "verdicts": verdicts,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
