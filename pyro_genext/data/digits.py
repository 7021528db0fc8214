"""scikit-learn's handwritten digits: 1797 images of 8x8 pixels with 17 grey levels.

The data ship inside scikit-learn (``sklearn.datasets.load_digits``), so they load
offline in milliseconds; scikit-learn is an optional dependency (the ``data`` extra).

Reference: E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI
Machine Learning Repository (1998).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .dataset import Dataset, check_seed, check_split, image_dataset, split_indices

__all__ = ["digits", "DIGITS_SPLIT_SIZES", "LEVELS"]

LEVELS = 17
#: Sizes of the train, val and test splits of the 1797 images.
DIGITS_SPLIT_SIZES = {"train": 1438, "val": 179, "test": 180}
_SOURCE = "scikit-learn's digits data (sklearn.datasets.load_digits)"


def _load_digits() -> Any:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the digits data set comes with scikit-learn, which is not installed: "
            "pip install scikit-learn (or pip install 'pyro-genext[data]')"
        ) from error
    return load_digits()


def digits(split: str = "train", seed: int = 0) -> Dataset:
    """One split of scikit-learn's 8x8 digits, with their 17 grey levels.

    The 1797 images are split by a seeded permutation (NumPy ``RandomState(seed)``) into
    1438 train, 179 val and 180 test images; each split keeps scikit-learn's order.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: the seed of the permutation; the default 0 is the split used throughout
            the project.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(N, 1, 8, 8)`` holding the levels
        ``0..16`` as ``float32``, ``y`` the digit ``0..9`` and ``levels=17``.

    Raises:
        ValueError: for an unknown split or a bad seed, before anything is loaded.
        ImportError: if scikit-learn is not installed.

    Example:
        >>> data = digits("train")
        >>> data.x.shape, data.levels, int(data.x.max())
        (torch.Size([1438, 1, 8, 8]), 17, 16)
    """
    check_split(split)
    check_seed(seed)
    bunch = _load_digits()
    images = np.asarray(bunch.images)
    labels = np.asarray(bunch.target)
    blocks = split_indices(images.shape[0], list(DIGITS_SPLIT_SIZES.values()), seed)
    keep = blocks[list(DIGITS_SPLIT_SIZES).index(split)]
    return image_dataset("digits", split, images[keep], labels[keep], LEVELS, _SOURCE)
