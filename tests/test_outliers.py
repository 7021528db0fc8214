"""Issue 8, item 3: no outlier images early in a Fashion-MNIST run.

The case the issue reported, reproduced: the multi-scale RealNVP (reduced width) trained
with the engine's step on Fashion-MNIST, seed 0. Without the conditioners' input bound one
validation image (641 of the validation split) scores 936, 8904 and 22077 bits/dim after
steps 5, 6 and 7 while the median is 6.4-6.7: each coupling's conditioner extrapolates on
the image's unusually large values and expands them more, and the next coupling sees
larger values still (docs/cli.rst, "Outlier images early in a run"). With the image
recipe's default input bound (8) the worst image stays within a few times the median.
Needs the Fashion-MNIST files (Debian's ``dataset-fashion-mnist`` or a folder in
``PYRO_GENEXT_DATA``); skipped without them.
"""

from __future__ import annotations

import pyro
import pytest
import torch

from pyro_genext.checks import data_checks
from pyro_genext.data import load_dataset
from pyro_genext.data.mnist import DatasetNotFoundError, find_files
from pyro_genext.engine import (
    Objective,
    clip_per_tensor,
    default_settings,
    get_kind,
    per_example_metrics,
)


@pytest.fixture(scope="module")
def fashion():
    try:  # never a download from the test suite
        find_files("fashion-mnist", "train", download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {str(e).splitlines()[0]}")
    return load_dataset("fashion-mnist", "train", seed=0), load_dataset(
        "fashion-mnist", "val", seed=0
    )


def _worst_images(fashion, input_bound: float, steps: int, at: set[int]) -> dict[int, tuple]:
    """(median, worst) bits/dim of the first 642 validation images after the steps in
    ``at``, training as the engine does (same batches, actnorm start-up, clipping)."""
    tr, va = fashion
    k = get_kind("realnvp")
    s = {**default_settings(k), "data": "fashion-mnist", "seed": 0, "hidden": 32,
         "num_blocks": 1, "input_bound": input_bound}
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    module = k.build(s, tr)
    objective = Objective(module, k.loss(s))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(tr), generator=gen)
    module.train()
    with torch.no_grad():
        x0 = k.prepare(module, tr.x[perm[:64]], torch.Generator().manual_seed(0))
    k.initialize(module, x0)
    seen = {}
    with data_checks(False):
        for step in range(1, steps + 1):
            xb = k.prepare(module, tr.x[perm[64 * (step - 1) : 64 * step]], gen)
            loss = objective(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            clip_per_tensor(params, 10.0)
            opt.step()
            if step in at:
                v = per_example_metrics(k, module, va.x[:642], 0, "val")["bpd"]
                seen[step] = (float(v.median()), float(v.max()), int(v.argmax()))
    return seen


def test_no_outlier_image_early_in_a_fashion_mnist_run(fashion):
    torch.set_num_threads(1)
    bounded = _worst_images(fashion, 8.0, 7, {5, 6, 7})
    for step, (median, worst, _) in bounded.items():
        assert worst < 5 * median, f"step {step}: worst image {worst:.1f}, median {median:.2f}"
    # the control: without the bound the reported outlier appears (if it stops appearing,
    # this test no longer tests anything and should be re-aimed)
    unbounded = _worst_images(fashion, 0.0, 7, {7})
    median, worst, index = unbounded[7]
    assert worst > 100 * median and index == 641, unbounded
