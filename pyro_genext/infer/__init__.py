"""Flow autoguides for Pyro models: :class:`AutoRealNVP` and :class:`AutoNICE`."""

from .autoguide import AutoCouplingFlow, AutoNICE, AutoRealNVP, coupling_splits

__all__ = ["AutoCouplingFlow", "AutoNICE", "AutoRealNVP", "coupling_splits"]
