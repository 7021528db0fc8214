"""The model kinds the engine trains, one module per family, and :data:`BUILTIN`, the
tuple of them that :func:`pyro_genext.engine.kinds` lists. Each module imports the
engine's core; nothing here registers anything by being imported."""

from .flows import NICE, REALNVP
from .vae import VAE_KIND

__all__ = ["BUILTIN", "NICE", "REALNVP", "VAE_KIND"]

#: The built-in kinds: ``nice``, ``realnvp``, ``vae``.
BUILTIN = (NICE, REALNVP, VAE_KIND)
