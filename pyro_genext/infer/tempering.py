r"""Likelihood tempering for a variational fit: the observed sites' log-density weighted by
:math:`\beta \in (0, 1]`, so that the fit targets :math:`p(z)\,p(x \mid z)^\beta`, which
for small :math:`\beta` is nearly the prior (spread over every mode the prior covers),
and :math:`\beta` rises to 1 over the first part of the fit
(:func:`~pyro_genext.infer.fit_guide`'s ``temper``).

An ``ELBO`` of the tempered model is the ELBO of a tempered posterior; Pyro's
``poutine.scale`` would weight the latent sites' prior too, :class:`TemperObserved`
weights only observed sites (``obs=...``, and ``pyro.factor``, an observed site).
"""

from __future__ import annotations

import math
from typing import Any

from pyro.poutine.messenger import Messenger

__all__ = ["TemperObserved", "tempering_weight"]


class TemperObserved(Messenger):
    """Multiply the ``scale`` of every observed sample site by ``weight`` (read at each
    site, so a fitting loop may change it between steps).

    Example::

        >>> import pyro, pyro.distributions as dist, pyro.poutine as poutine, torch
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.0))
        >>> tr = poutine.trace(TemperObserved(0.25)(model)).get_trace()
        >>> tr.nodes["z"]["scale"], tr.nodes["x"]["scale"]
        (1.0, 0.25)
    """

    def __init__(self, weight: float = 1.0) -> None:
        if not (isinstance(weight, (int, float)) and 0 < weight <= 1):
            raise ValueError(f"TemperObserved: expected weight in (0, 1], got {weight!r}")
        super().__init__()
        self.weight = float(weight)

    def _process_message(self, msg: Any) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.weight


def tempering_weight(step: int, steps: int, start: float) -> float:
    r"""The likelihood's weight at ``step`` of a schedule rising geometrically from
    ``start`` at step 0 to 1 at ``steps`` (and 1 after):
    :math:`\beta_t = \mathrm{start}^{\max(0,\,1 - t/T)}`.

    Example::

        >>> [round(tempering_weight(t, 4, 0.01), 4) for t in (0, 2, 4, 9)]
        [0.01, 0.1, 1.0, 1.0]
    """
    if step >= steps:
        return 1.0
    return math.exp(math.log(start) * (1 - step / steps))
