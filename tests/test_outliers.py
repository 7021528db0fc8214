"""Issue 8, item 3: no outlier images early in a Fashion-MNIST run.

The case the issue reported, reproduced: the multi-scale RealNVP (reduced width) trained
by the engine (:func:`~pyro_genext.engine.fit` with a per-step callback) on
Fashion-MNIST, seed 0. Without the conditioners' input bound one
validation image (641 of the validation split) scores 936, 8904 and 22077 bits/dim after
steps 5, 6 and 7 while the median is 6.4-6.7: each coupling's conditioner extrapolates on
the image's unusually large values and expands them more, and the next coupling sees
larger values still (docs/cli.rst, "Outlier images early in a run"). With the image
recipe's default input bound (8) the worst image stays within a few times the median.
Needs the Fashion-MNIST files (Debian's ``dataset-fashion-mnist`` or a folder in
``PYRO_GENEXT_DATA``); skipped without them.
"""

from __future__ import annotations

import pytest
import torch

from pyro_genext.data import Dataset, load_dataset
from pyro_genext.data.mnist import DatasetNotFoundError, find_files
from pyro_genext.engine import fit


@pytest.fixture(scope="module")
def fashion():
    try:  # never a download from the test suite
        find_files("fashion-mnist", "train", download=False)
    except DatasetNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {str(e).splitlines()[0]}")
    return load_dataset("fashion-mnist", "train", seed=0), load_dataset("fashion-mnist", "val", seed=0)


def _worst_images(fashion, input_bound: float, steps: int, at: set[int]) -> dict[int, tuple]:
    """(median, worst, index of the worst) bits/dim of the first 642 validation images
    after the steps in ``at``: the engine's own run (no warm-up, as when the outlier was
    reported), watched by a callback after every step."""
    tr, va = fashion
    seen = {}

    def watch(trainer):
        if trainer.step in at:
            v = trainer.scores(va.x[:642])["bpd"]
            seen[trainer.step] = (float(v.median()), float(v.max()), int(v.argmax()))

    settings = {"data": "fashion-mnist", "seed": 0, "hidden": 32, "num_blocks": 1,
                "input_bound": input_bound, "warmup": 0, "steps": steps}
    # the engine's own validation (at the last step) on one image: the callback scores
    one = Dataset(name=va.name, x=va.x[:1], y=None, levels=va.levels, split="val")
    fit("realnvp", settings, train_data=tr, val_data=one, callback=watch, every=1,
        progress=False, log=lambda line: None)
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
