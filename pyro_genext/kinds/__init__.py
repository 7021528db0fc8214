"""The model kinds the engine trains, one module per family; importing a module registers
its kinds in :data:`pyro_genext.engine.KINDS` (one import line per model file)."""

from . import flows  # noqa: F401  (nice, realnvp)
from .vae import VAE_KIND  # noqa: F401  (vae)
