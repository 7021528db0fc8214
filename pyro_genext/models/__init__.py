"""Pyro models built on the bijectors: flow density models and variational auto-encoders."""

from .density import FlowDensity
from .vae import VAE, GapDecomposition, ImportanceWeightedELBO, gap_decomposition, kl_warmup_weight

__all__ = [
    "FlowDensity", "VAE", "ImportanceWeightedELBO", "kl_warmup_weight", "gap_decomposition",
    "GapDecomposition",
]
