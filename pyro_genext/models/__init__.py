"""Pyro models built on the bijectors: flow density models (and, elsewhere, VAEs)."""

from .density import FlowDensity

__all__ = ["FlowDensity"]
