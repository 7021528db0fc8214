"""What a run shows while it trains: a progress bar whose running figure is the median of
the last 100 steps (one spike does not dominate it), validation log lines at most every
``log_interval`` seconds, and the one-line summary at the end. Only rank 0 of several
processes shows anything (:class:`Progress` with ``show=False`` is silent)."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RunningMedian", "Progress", "describe", "describe_result", "RUNNING_WINDOW"]

#: Running figure of the progress bar: the median of this many recent steps.
RUNNING_WINDOW = 100


class RunningMedian:
    """The median of the last ``window`` values: one spike moves it by one rank at most.

    >>> r = RunningMedian(window=3)
    >>> [r.add(v) for v in (5.0, 1e7, 4.0, 3.0)]
    [5.0, 5000002.5, 5.0, 4.0]
    """

    def __init__(self, window: int = RUNNING_WINDOW, values: list[float] | None = None) -> None:
        self.values: deque[float] = deque(values or [], maxlen=window)

    def add(self, v: float) -> float:
        self.values.append(v)
        return statistics.median(self.values)


def describe(name: str, summary: Mapping[str, float]) -> str:
    """``"bpd 2.0040 (median 1.98, worst 3.1)"`` for a validation summary."""
    return (f"{name} {summary[f'{name}_mean']:.4f} (median {summary[f'{name}_median']:.4f}, "
            f"worst {summary[f'{name}_worst']:.4f})")


def describe_result(result: Mapping[str, Any]) -> str:
    """The one-line summary of a finished :func:`~pyro_genext.engine.fit`."""
    best = result["best"]
    name = next(iter(best))[: -len("_mean")] if best else "metric"
    where = f"; checkpoints in {result['out_dir']}" if result["out_dir"] else ""
    compiled = result.get("compile_seconds")
    first = "" if compiled is None else f" (the first, compiling, {compiled:.1f} s)"
    return (f"best validation {describe(name, best)} at step {result['best_step']}; "
            f"{result['steps']} of {result['total_steps']} steps{first}{where}")


def default_log(msg: str) -> None:
    """A log line on stderr that does not break the progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)


class Progress:
    """The progress bar and the log lines of one run (rank 0's; the others pass
    ``show=False`` and show nothing)."""

    def __init__(self, *, show: bool, log: Callable[[str], None] | None,
                 log_interval: float) -> None:
        self.show = show
        self.say = (log or default_log) if show else _silent
        self.log_interval = log_interval
        self.figure: tuple[str, float] = ("loss", math.nan)
        self.val: tuple[str, float] | None = None
        self.last_log = -math.inf
        self.bar: Any = None

    def open_bar(self, total: int, initial: int) -> None:
        """Show a bar from step ``initial`` to ``total`` on stderr."""
        if not self.show:
            return
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()  # in a log file, a line every 30 s, not every update
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                        dynamic_ncols=True, mininterval=0.5 if tty else 30.0)

    def steps(self, count: int, figure: tuple[str, float]) -> None:
        """``count`` steps were taken; ``figure`` is the running figure after them."""
        self.figure = figure
        if self.bar is not None and count:
            self.bar.update(count)
            self._postfix()

    def validation(self, line: str, name: str, mean: float) -> None:
        """A validation: its line goes to the log if ``log_interval`` seconds have passed."""
        self.val = (name, mean)
        now = time.monotonic()
        if now - self.last_log >= self.log_interval:
            self.last_log = now
            self.say(line)
        if self.bar is not None:
            self._postfix()

    def _postfix(self) -> None:
        text = f"{self.figure[0]}={self.figure[1]:.3f}"
        if self.val is not None:
            text += f" val_{self.val[0]}={self.val[1]:.3f}"
        self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _silent(msg: str) -> None:
    pass
