r"""Metrics for density models of discrete data.

Bits per dimension
------------------

Image-model papers report negative log-likelihood in *bits per dimension*,

.. math::

    \text{bpd}(x) = -\frac{\log p(x)}{D \ln 2},

where :math:`p` is the density of the dequantized data on its **original discrete scale**:
each of the :math:`D` dimensions takes :math:`L` levels :math:`0, \dots, L-1` and a data
point :math:`x + u`, :math:`u \sim \mathcal{U}[0, 1)^D`, lies in :math:`[0, L)^D`. On that
scale every level owns a bin of unit width, so

* a density there is also a probability per unit bin: :math:`\int_{x + [0,1)^D} p` is the
  probability the model gives the discrete value :math:`x`, and by Jensen's inequality
  :math:`\mathbb{E}_u[-\log p(x + u)] \ge -\log P(x)`: the dequantized bpd bounds the
  discrete codelength from above, in bits, for any model;
* a model that knows nothing, the uniform density :math:`L^{-D}` on :math:`[0, L)^D`,
  scores exactly :math:`\log_2 L` bits per dimension (8 for 8-bit images with 256 levels,
  :math:`\log_2 17 \approx 4.09` for the 17-level scikit-learn digits), the cost of
  storing each value raw.

Numbers are therefore comparable across papers and pre-processings only on that scale. A
model that works on rescaled data (:math:`[0, 1)`, logits, ...) must add the log-Jacobian
of the pre-processing first, e.g. :math:`D \log L` for data divided by :math:`L`; a
:class:`~pyro_genext.models.FlowDensity` with ``levels`` set does so in its ``log_prob``.

Reference: Theis, van den Oord, Bethge (2016), A note on the evaluation of generative
models, arXiv:1511.01844, section 3.1; Dinh, Sohl-Dickstein, Bengio (2016), Density
estimation using Real NVP, arXiv:1605.08803, section 4.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["bits_per_dim", "num_dims"]


def num_dims(event_shape_or_num_dims: int | Sequence[int] | torch.Size) -> int:
    """The number of dimensions :math:`D` of one event: the int itself, or the product of
    an event shape. Raises ``ValueError`` unless it is a positive integer or a shape of
    positive integers."""
    arg = event_shape_or_num_dims
    if isinstance(arg, bool):
        raise ValueError(f"expected a number of dimensions or an event shape, got {arg!r}")
    if isinstance(arg, int):
        if arg < 1:
            raise ValueError(f"expected a number of dimensions >= 1, got {arg}")
        return arg
    if isinstance(arg, (tuple, list, torch.Size)):
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in arg):
            raise ValueError(f"expected an event shape of integers >= 1, got {tuple(arg)}")
        return math.prod(arg)
    raise ValueError(
        f"expected a number of dimensions (int) or an event shape (tuple of ints), "
        f"got {type(arg).__name__} {arg!r}"
    )


def bits_per_dim(
    log_prob: torch.Tensor | float, event_shape_or_num_dims: int | Sequence[int] | torch.Size
) -> torch.Tensor:
    r"""Negative log-likelihood in bits per dimension, :math:`-\log p(x) / (D \ln 2)`.

    ``log_prob`` must be the natural-log density of the (dequantized) data on its original
    discrete scale :math:`[0, L)^D` with unit-width bins, every pre-processing Jacobian
    included, one value per event; see the module docstring for why that scale makes the
    numbers comparable across papers.

    Args:
        log_prob: log-densities, any batch shape (one value per data point).
        event_shape_or_num_dims: :math:`D`, or the event shape whose product it is.

    Returns:
        The bits per dimension, of the shape of ``log_prob``; average it over a data set.

    Raises:
        ValueError: if ``log_prob`` holds NaN or :math:`+\infty`, if
            ``event_shape_or_num_dims`` is not a positive int or shape, or if ``log_prob``
            ends with a multi-dimensional event shape (per-element log-densities that
            were not summed over the event).

    Example: the uniform density :math:`L^{-D}` on :math:`[0, L)^D` costs
    :math:`\log_2 L` bits per dimension::

        >>> D, L = 64, 17
        >>> lp = torch.full((5,), -D * math.log(L))
        >>> bits_per_dim(lp, (1, 8, 8))
        tensor([4.0875, 4.0875, 4.0875, 4.0875, 4.0875])
        >>> round(math.log2(L), 4)
        4.0875
    """
    d = num_dims(event_shape_or_num_dims)
    lp = log_prob if isinstance(log_prob, torch.Tensor) else torch.as_tensor(log_prob)
    if lp.is_complex() or lp.dtype == torch.bool:
        raise ValueError(f"expected real log-densities, got a tensor of dtype {lp.dtype}")
    if not lp.is_floating_point():
        lp = lp.to(torch.get_default_dtype())
    shape = event_shape_or_num_dims
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape) >= 2:
        k = len(shape)
        if lp.dim() >= k and tuple(lp.shape[lp.dim() - k :]) == tuple(shape):
            raise ValueError(
                f"expected one log-density per event (summed over the event shape "
                f"{tuple(shape)}), got a tensor of shape {tuple(lp.shape)}"
            )
    if torch.isnan(lp).any():
        raise ValueError(f"expected log-densities without NaN, got {int(torch.isnan(lp).sum())} NaN")
    if (lp == math.inf).any():
        raise ValueError("expected finite or -inf log-densities, got +inf")
    return -lp / (d * math.log(2.0))
