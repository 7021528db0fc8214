"""Data sets with fixed, seeded splits, behind one front door, :func:`load_dataset`.

=================  ==============  ===============================  ======  =============
name               ``x`` shape     splits (train / val / test)      levels  needs
=================  ==============  ===============================  ======  =============
``digits``         (N, 1, 8, 8)    1438 / 179 / 180 of 1797         17      scikit-learn
``fashion-mnist``  (N, 1, 28, 28)  50000 / 10000 / official 10000   256     the IDX files
``mnist``          (N, 1, 28, 28)  50000 / 10000 / official 10000   256     the IDX files
toy densities      (N, 2)          10000 / 2000 / 2000 fresh draws  None    nothing
=================  ==============  ===============================  ======  =============

The toy densities are ``moons``, ``8gaussians``, ``checkerboard``, ``rings`` and
``spirals``. Image values are the raw integer levels as ``float32``; dequantization and
rescaling are the model's business (see :mod:`pyro_genext.transforms`), and bits/dim need
the number of ``levels``.
"""

from __future__ import annotations

import os

from .binarization import binarize, intensities
from .dataset import SPLITS, Dataset, check_seed, check_split
from .digits import digits
from .idx import CorruptFileError, read_idx, write_idx
from .mnist import ChecksumError, DatasetNotFoundError, fashion_mnist, mnist, read_official
from .toy import TOY_DENSITIES, checkerboard, eight_gaussians, moons, rings, spirals

__all__ = [
    "DATASETS",
    "SPLITS",
    "TOY_SPLIT_SIZES",
    "Dataset",
    "load_dataset",
    "toy_split_seed",
    "digits",
    "fashion_mnist",
    "mnist",
    "read_official",
    "read_idx",
    "write_idx",
    "moons",
    "eight_gaussians",
    "checkerboard",
    "rings",
    "spirals",
    "binarize",
    "intensities",
    "CorruptFileError",
    "ChecksumError",
    "DatasetNotFoundError",
]

#: The names :func:`load_dataset` accepts.
DATASETS = ("digits", "fashion-mnist", "mnist", *TOY_DENSITIES)
#: Default number of points drawn for each split of a toy density.
TOY_SPLIT_SIZES = {"train": 10000, "val": 2000, "test": 2000}


def toy_split_seed(seed: int, split: str) -> int:
    """The seed a toy density's split is drawn with: ``3 * seed + {train: 0, val: 1, test: 2}``.

    Distinct for every ``(seed, split)`` pair, so splits are independent draws, and the
    train split of seed ``s`` is what the density function draws with ``seed=s``.

    Example:
        >>> toy_split_seed(0, "train"), toy_split_seed(0, "test"), toy_split_seed(1, "train")
        (0, 2, 3)
    """
    return 3 * seed + SPLITS.index(split)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
    num_points: int | None = None,
) -> Dataset:
    """Load one split of a data set by name.

    Splits are fixed by ``seed``:

    * ``digits``: a permutation of the 1797 images by ``RandomState(seed)`` gives 1438
      train, 179 val and 180 test images.
    * ``fashion-mnist``, ``mnist``: ``test`` is the official test set; the official 60000
      training images are split by a permutation from ``RandomState(seed)`` into 50000
      train and 10000 val. The files are looked for as described in
      :mod:`pyro_genext.data.mnist` (``root``, ``$PYRO_GENEXT_DATA``, a system location,
      the cache, then a download).
    * toy densities: each split is an independent draw, seeded by
      :func:`toy_split_seed`, of 10000 (train), 2000 (val) or 2000 (test) points.

    Args:
        name: one of :data:`DATASETS`.
        split: ``"train"``, ``"val"`` or ``"test"``.
        root: a folder holding the (Fashion-)MNIST files; ignored by the others.
        seed: chooses the split (images) or the draw (toy densities); ``0 <= seed < 2**30``.
        num_points: for toy densities, how many points to draw; for image data, keep the
            first ``num_points`` images of the split (quick runs). ``None``: all/defaults.

    Returns:
        A :class:`Dataset`.

    Raises:
        ValueError: for an unknown name or split, a bad seed or ``num_points``, before any
            loading; for data values that are not valid levels, naming the file.
        DatasetNotFoundError: (Fashion-)MNIST files found nowhere.

    Example:
        >>> data = load_dataset("digits", "val")
        >>> data.event_shape, len(data), data.levels
        (torch.Size([1, 8, 8]), 179, 17)
        >>> load_dataset("moons", "test", num_points=500).x.shape
        torch.Size([500, 2])
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {', '.join(map(repr, DATASETS))}")
    check_split(split)
    check_seed(seed)
    if num_points is not None and (
        isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1
    ):
        raise ValueError(f"expected num_points to be a positive integer or None, got {num_points!r}")

    if name in TOY_DENSITIES:
        n = TOY_SPLIT_SIZES[split] if num_points is None else num_points
        x = TOY_DENSITIES[name](n, seed=toy_split_seed(seed, split))
        return Dataset(name=name, x=x, y=None, levels=None, split=split)

    if name == "digits":
        data = digits(split, seed=seed)
    elif name == "fashion-mnist":
        data = fashion_mnist(split, root=root, seed=seed)
    else:
        data = mnist(split, root=root, seed=seed)
    if num_points is not None:
        if num_points > len(data):
            raise ValueError(
                f"num_points={num_points} is more than the {len(data)} images of {name}'s {split} split"
            )
        data.x = data.x[:num_points].clone()
        data.y = None if data.y is None else data.y[:num_points].clone()
    return data
