"""Flow autoguides for Pyro models (:class:`AutoRealNVP`, :class:`AutoNICE`) and a
fitting loop for any guide (:func:`fit_guide`)."""

from .autoguide import AutoCouplingFlow, AutoNICE, AutoRealNVP, coupling_splits
from .fit import FitResult, fit_guide
from .objectives import ImportanceWeightedELBO

__all__ = [
    "AutoCouplingFlow", "AutoNICE", "AutoRealNVP", "coupling_splits",
    "FitResult", "ImportanceWeightedELBO", "fit_guide",
]
