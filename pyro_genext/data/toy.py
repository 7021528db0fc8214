r"""Seeded toy densities in two dimensions, the usual test bed for flows.

Each function draws ``n`` points as a ``float32`` tensor of shape ``(n, 2)``, centred and
of unit scale: the points lie within about ``[-3, 3]^2`` and each coordinate's standard
deviation is between 0.75 and 1.3. Draws use NumPy's legacy
``RandomState(seed)``, whose stream NumPy keeps fixed across versions: a seed names the
same points on every machine. The shapes follow those used to show off FFJORD
(Grathwohl et al., 2019, arXiv:1810.01367) and neural spline flows (Durkan et al., 2019,
arXiv:1906.04032); the code and the scales are our own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

__all__ = ["moons", "eight_gaussians", "checkerboard", "rings", "spirals", "TOY_DENSITIES"]


def _rng(n: int, seed: int) -> np.random.RandomState:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"expected a non-negative number of points, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise ValueError(f"expected an integer seed in [0, 2**32), got {seed!r}")
    return np.random.RandomState(seed)


def _tensor(points: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))


def _polar(radius: np.ndarray, angle: np.ndarray) -> np.ndarray:
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)


def moons(n: int, seed: int = 0, noise: float = 0.1) -> torch.Tensor:
    r"""Two interleaving half circles with Gaussian noise.

    The upper moon is :math:`(\cos t, \sin t)`, the lower :math:`(1 - \cos t, \tfrac12 -
    \sin t)`, :math:`t \sim U(0, \pi)`, each point on either with probability 1/2; noise of
    standard deviation ``noise`` is added, then the picture is centred and scaled by 1.5.

    Example:
        >>> x = moons(1000, seed=0)
        >>> x.shape, bool(torch.equal(x, moons(1000, seed=0)))
        (torch.Size([1000, 2]), True)
    """
    rng = _rng(n, seed)
    t = rng.uniform(0.0, np.pi, size=n)
    lower = rng.uniform(size=n) < 0.5
    points = _polar(np.ones(n), t)
    points[lower] = np.array([1.0, 0.5]) - points[lower]
    points += noise * rng.standard_normal((n, 2))
    return _tensor(1.5 * (points - np.array([0.5, 0.25])))


def eight_gaussians(n: int, seed: int = 0, std: float = 0.1) -> torch.Tensor:
    r"""A mixture of eight equally weighted Gaussians on a circle.

    Centres at radius :math:`\sqrt 2` and angles :math:`k\pi/4`, :math:`k = 0..7`, each with
    standard deviation ``std``, so each coordinate has variance :math:`1 + \text{std}^2`.

    Example:
        >>> x = eight_gaussians(4000, seed=1)
        >>> round(float(x.norm(dim=1).mean()), 1)
        1.4
    """
    rng = _rng(n, seed)
    k = rng.randint(0, 8, size=n)
    points = _polar(np.full(n, np.sqrt(2.0)), k * np.pi / 4)
    return _tensor(points + std * rng.standard_normal((n, 2)))


def checkerboard(n: int, seed: int = 0) -> torch.Tensor:
    """Uniform on the black squares of a 4x4 checkerboard covering ``[-2, 2]^2``.

    Each coordinate is marginally uniform on ``[-2, 2]`` (standard deviation 1.15); the
    density has jumps, which smooth flows can only approximate.

    Example:
        >>> x = checkerboard(1000, seed=0)
        >>> bool(((x.floor().sum(dim=1) % 2) == 0).all())
        True
    """
    rng = _rng(n, seed)
    column = rng.randint(0, 4, size=n)
    row = 2 * rng.randint(0, 2, size=n) + column % 2  # same parity as the column
    cells = np.stack([column, row], axis=-1) - 2.0
    return _tensor(cells + rng.uniform(size=(n, 2)))


def rings(n: int, seed: int = 0, noise: float = 0.04) -> torch.Tensor:
    r"""Four concentric circles of radii 0.5, 1, 1.5 and 2, equally weighted.

    Points are uniform in angle on a ring chosen uniformly, with radial Gaussian noise of
    standard deviation ``noise``; each coordinate has variance :math:`\mathbb{E}[r^2]/2
    \approx 0.94`.

    Example:
        >>> x = rings(1000, seed=0)
        >>> r = x.norm(dim=1)
        >>> bool((r > 0.3).all()) and bool((r < 2.2).all())
        True
    """
    rng = _rng(n, seed)
    radius = 0.5 * rng.randint(1, 5, size=n) + noise * rng.standard_normal(n)
    return _tensor(_polar(radius, rng.uniform(0.0, 2 * np.pi, size=n)))


def spirals(n: int, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    r"""Two interleaved Archimedean spiral arms, one the other turned by :math:`\pi`.

    Along an arm :math:`r = \theta / (1.5\pi)` for :math:`\theta = 3\pi\sqrt{u}`,
    :math:`u \sim U(0, 1)` (one and a half turns, points spread roughly evenly along the
    arm, radius at most 2), plus isotropic Gaussian noise of standard deviation ``noise``.

    Example:
        >>> x = spirals(1000, seed=0)
        >>> x.shape, bool(torch.isfinite(x).all())
        (torch.Size([1000, 2]), True)
    """
    rng = _rng(n, seed)
    theta = 3 * np.pi * np.sqrt(rng.uniform(size=n))
    arm = rng.randint(0, 2, size=n)
    points = _polar(theta / (1.5 * np.pi), theta + np.pi * arm)
    return _tensor(points + noise * rng.standard_normal((n, 2)))


#: The toy densities by their data-set name.
TOY_DENSITIES: dict[str, Callable[..., torch.Tensor]] = {
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "rings": rings,
    "spirals": spirals,
}
