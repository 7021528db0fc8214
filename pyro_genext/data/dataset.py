"""The :class:`Dataset` record every loader returns, and the helpers the loaders share:
split names, seeded splits, and the check that image values are valid levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Dataset", "SPLITS"]

SPLITS = ("train", "val", "test")


@dataclass
class Dataset:
    """One split of one data set.

    Attributes:
        name: the data set's name, one of :data:`pyro_genext.data.DATASETS`.
        x: ``float32`` data. Images are ``(N, C, H, W)`` holding the raw integer levels
            ``0 .. levels - 1`` as floats (not rescaled, not dequantized); toy densities
            are continuous points ``(N, 2)``.
        y: ``int64`` class labels ``(N,)``, or ``None`` where the data set has none.
        levels: the number of discrete values a pixel can take (256 for (Fashion-)MNIST,
            17 for scikit-learn digits), or ``None`` for continuous data. Bits/dim of
            discrete data are only comparable when the dequantization uses these levels.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Example:
        >>> import torch
        >>> data = Dataset("toy", torch.zeros(5, 2), None, None, "train")
        >>> data.event_shape, len(data)
        (torch.Size([2]), 5)
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor | None
    levels: int | None
    split: str | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32:
            raise ValueError(f"Dataset {self.name!r}: expected x of dtype float32, got {self.x.dtype}")
        if self.x.dim() < 2:
            raise ValueError(
                f"Dataset {self.name!r}: expected x of shape (N, *event_shape), got {tuple(self.x.shape)}"
            )
        if self.y is not None and self.y.shape[:1] != self.x.shape[:1]:
            raise ValueError(
                f"Dataset {self.name!r}: expected {self.x.shape[0]} labels, got y of shape "
                f"{tuple(self.y.shape)}"
            )

    @property
    def event_shape(self) -> torch.Size:
        """The shape of one data point: ``(C, H, W)`` for images, ``(2,)`` for toy data."""
        return self.x.shape[1:]

    def __len__(self) -> int:
        return self.x.shape[0]


def check_split(split: str, choices: Sequence[str] = SPLITS) -> None:
    """Raise a ``ValueError`` naming the valid splits unless ``split`` is one of them."""
    if split not in choices:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(map(repr, choices))}")


def check_seed(seed: int) -> None:
    """Raise a ``ValueError`` unless ``seed`` is an integer the split generator accepts."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**30:
        raise ValueError(f"expected an integer seed in [0, 2**30), got {seed!r}")


def split_indices(n: int, sizes: Sequence[int], seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` into consecutive blocks of a seeded permutation.

    The permutation comes from NumPy's legacy ``RandomState(seed)``, whose stream NumPy
    keeps fixed across versions, so a split named by its seed stays the same split.
    Each block is returned sorted, so a split keeps the order of the source file.

    Example:
        >>> [block.tolist() for block in split_indices(5, [3, 2], seed=0)]
        [[0, 1, 2], [3, 4]]
    """
    if sum(sizes) != n:
        raise ValueError(f"split sizes {list(sizes)} add up to {sum(sizes)}, expected {n}")
    order = np.random.RandomState(seed).permutation(n)
    bounds = np.cumsum([0, *sizes])
    return [np.sort(order[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


def check_levels(values: np.ndarray, levels: int, source: str) -> None:
    """Raise a ``ValueError`` naming ``source`` unless ``values`` are integers in
    ``[0, levels - 1]`` (so no NaN either)."""
    if values.size == 0:
        return
    if values.dtype.kind == "f":
        if np.isnan(values).any():
            raise ValueError(f"{source}: expected pixel levels 0..{levels - 1}, found NaN")
        if not np.array_equal(values, np.round(values)):
            raise ValueError(f"{source}: expected integer pixel levels 0..{levels - 1}, found fractions")
    low, high = values.min(), values.max()
    if low < 0 or high > levels - 1:
        raise ValueError(f"{source}: expected pixel levels 0..{levels - 1}, found values in [{low}, {high}]")


def image_dataset(
    name: str,
    split: str,
    images: np.ndarray,
    labels: np.ndarray,
    levels: int,
    source: str,
) -> Dataset:
    """Check ``images`` ``(N, H, W)`` or ``(N, C, H, W)`` and wrap them with their labels.

    Values are converted straight from their stored dtype to ``float32`` (for uint8
    images no float64 copy is made: 50000 MNIST images take 157 MB).
    """
    check_levels(images, levels, source)
    if images.ndim == 3:
        images = images[:, None]
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32)
    y = torch.from_numpy(np.ascontiguousarray(labels)).to(torch.int64)
    return Dataset(name=name, x=x, y=y, levels=levels, split=split)
