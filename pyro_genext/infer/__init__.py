"""Flow autoguides for Pyro models (:class:`AutoRealNVP`, :class:`AutoNICE`) and a
fitting loop for any guide (:func:`fit_guide`); posteriordb's posteriors as Pyro models
(:func:`load_posterior`)."""

from .autoguide import AutoCouplingFlow, AutoNICE, AutoRealNVP, coupling_splits
from .fit import FitResult, fit_guide
from .objectives import ImportanceWeightedELBO
from .posteriordb import list_posteriors, load_posterior

__all__ = [
    "AutoCouplingFlow", "AutoNICE", "AutoRealNVP", "coupling_splits",
    "FitResult", "ImportanceWeightedELBO", "fit_guide", "list_posteriors", "load_posterior",
]
