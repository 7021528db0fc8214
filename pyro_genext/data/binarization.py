r"""Binarisation of grey-level images for Bernoulli models (the VAE's usual likelihood).

A pixel of level :math:`v \in \{0, \dots, L-1\}` becomes a Bernoulli draw with
probability :math:`v / (L - 1)`, its intensity. Two uses, as in Burda et al. (2016):

* **dynamic binarisation** for training: a fresh draw every time an image is used, which
  acts as data augmentation and keeps a Bernoulli model from overfitting one draw;
* **fixed binarisation** for validation and test: one draw from a generator seeded by the
  run's seed and the split, the same every time, so that log-likelihoods in nats are
  those of one fixed binary data set and comparable between runs and models.

Reference: Burda, Grosse, Salakhutdinov (2016), Importance weighted autoencoders,
arXiv:1509.00519, section 5.
"""

from __future__ import annotations

import torch

from ..checks import data_checks_enabled

__all__ = ["binarize", "intensities"]


def intensities(x: torch.Tensor, levels: int) -> torch.Tensor:
    r"""Grey levels :math:`0 .. L-1` as intensities :math:`v / (L - 1) \in [0, 1]`.

    Raises ``ValueError`` for ``levels < 2`` or values outside :math:`[0, L-1]`, before any
    computation; the values are not read inside :func:`~pyro_genext.checks.data_checks`
    ``(False)`` (data checked once, as the training engine does: on a GPU a read stalls
    the step).

    Example:
        >>> intensities(torch.tensor([0.0, 8.0, 16.0]), levels=17)
        tensor([0.0000, 0.5000, 1.0000])
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"expected levels an integer >= 2, got {levels!r}")
    if data_checks_enabled() and x.numel() and (
            not bool(torch.isfinite(x).all()) or float(x.min()) < 0 or float(x.max()) > levels - 1):
        raise ValueError(
            f"expected grey levels in [0, {levels - 1}] (levels={levels}), got values in "
            f"[{float(x.min()):g}, {float(x.max()):g}]"
        )
    return x / (levels - 1)


def binarize(x: torch.Tensor, levels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""One Bernoulli draw per pixel with probability :func:`intensities`; values 0. or 1.
    in ``x``'s dtype and shape. Pass a seeded ``generator`` for a fixed binarisation, on
    ``x``'s device (``torch.Generator(x.device)``: a draw on a GPU refuses a CPU one).

    Example:
        >>> x = torch.tensor([[0.0, 255.0, 128.0]])
        >>> g = torch.Generator().manual_seed(0)
        >>> b = binarize(x, 256, g)
        >>> b[0, :2].tolist(), torch.equal(b, binarize(x, 256, torch.Generator().manual_seed(0)))
        ([0.0, 1.0], True)
    """
    p = intensities(x, levels)
    return torch.bernoulli(p, generator=generator)
