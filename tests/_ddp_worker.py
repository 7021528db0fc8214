"""Run by tests/test_distributed.py under torchrun: one engine run, each rank saving what
it ended with (parameters, validation history) for the test to compare."""

import json
import sys
from pathlib import Path

import torch

from pyro_genext import distributed
from pyro_genext.engine import fit

SETTINGS = {"data": "moons", "steps": 30, "batch_size": 64, "num_layers": 2, "hidden": 16,
            "lr": 3e-3, "seed": 0}


def main(out: str) -> None:
    torch.set_num_threads(1)
    result = fit("realnvp", SETTINGS, progress=False, log=lambda line: None)
    rank = distributed.context().rank
    torch.save(result["module"].state_dict(), Path(out) / f"rank{rank}.pt")
    (Path(out) / f"history{rank}.json").write_text(json.dumps(result["history"]))
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
