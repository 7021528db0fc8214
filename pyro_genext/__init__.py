"""pyro_genext: deep generative models for Pyro (NICE, RealNVP, flow density models, VAEs)."""

from . import transforms
from .flows import conditional_nice, conditional_realnvp, nice, realnvp

__version__ = "0.1.0"

__all__ = ["transforms", "nice", "realnvp", "conditional_nice", "conditional_realnvp", "__version__"]
