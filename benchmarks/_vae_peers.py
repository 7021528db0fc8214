"""The VAE benchmark's contenders that are not pyro_genext: Pyro's own example VAE, and a
plain-PyTorch VAE (the timing floor), plus a generic importance-weighted evaluator for
any Pyro model/guide pair with one data plate.

Pyro's example (``examples/vae/vae.py`` in the Pyro repository) is rebuilt here from its
description, not copied: encoder ``784 -> 400`` softplus, then a linear mean and
``exp`` of a linear log-scale; decoder ``z -> 400`` softplus ``-> 784`` sigmoid; a
Bernoulli likelihood with ``validate_args=False``; trained with ``SVI``, ``Trace_ELBO`` and
``pyro.optim.Adam({"lr": 1e-3})``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_genext.models import ImportanceWeightedELBO


class PyroExampleVAE(nn.Module):
    """Pyro's example VAE architecture, ``D -> hidden -> z`` with softplus units."""

    def __init__(self, input_dim: int, z_dim: int = 50, hidden: int = 400) -> None:
        super().__init__()
        self.input_dim, self.z_dim = input_dim, z_dim
        self.enc = nn.Linear(input_dim, hidden)
        self.enc_loc = nn.Linear(hidden, z_dim)
        self.enc_log_scale = nn.Linear(hidden, z_dim)
        self.dec = nn.Linear(z_dim, hidden)
        self.dec_out = nn.Linear(hidden, input_dim)
        self.encoder = nn.ModuleList([self.enc, self.enc_loc, self.enc_log_scale])
        self.decoder = nn.ModuleList([self.dec, self.dec_out])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = nn.functional.softplus(self.enc(x.reshape(-1, self.input_dim)))
        return self.enc_loc(h), torch.exp(self.enc_log_scale(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.dec_out(nn.functional.softplus(self.dec(z))))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        x = x.reshape(-1, self.input_dim)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros((x.shape[0], self.z_dim))
            z = pyro.sample("latent", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(self.decode(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.reshape(-1, self.input_dim).shape[0]):
            loc, scale = self.encode(x)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


class TorchVAE(nn.Module):
    """A VAE without Pyro, the same architecture as ``pyro_genext.models.VAE`` with an MLP
    (``D -> hidden... -> z`` ReLU, a linear mean and a softplus scale; the decoder mirrors
    it), trained on the closed-form KL and the Bernoulli log-likelihood of the logits."""

    def __init__(self, input_dim: int, z_dim: int, hidden: Sequence[int]) -> None:
        super().__init__()
        widths = (input_dim, *hidden)
        enc: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            enc += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*enc)
        self.loc = nn.Linear(widths[-1], z_dim)
        self.scale = nn.Linear(widths[-1], z_dim)
        back = (z_dim, *reversed(hidden), input_dim)
        dec: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(back[:-1], back[1:])):
            dec.append(nn.Linear(a, b))
            if i < len(back) - 2:
                dec.append(nn.ReLU())
        self.dec = nn.Sequential(*dec)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Minus the ELBO per example, averaged over the batch."""
        x = x.reshape(x.shape[0], -1)
        h = self.body(x)
        mu, sd = self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-5
        z = mu + sd * torch.randn_like(mu)
        rec = nn.functional.binary_cross_entropy_with_logits(self.dec(z), x, reduction="sum")
        kl = 0.5 * (sd**2 + mu**2 - 2 * torch.log(sd) - 1).sum()
        return (rec + kl) / x.shape[0]


def pyro_scores(model: Callable[..., Any], guide: Callable[..., Any], x: torch.Tensor,
                elbo_particles: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example ELBO and IWAE estimates of any model/guide pair with one data plate,
    through Pyro's own machinery (one example at a time, the ``K`` draws vectorised)."""
    elbo = Trace_ELBO(num_particles=elbo_particles, vectorize_particles=True, max_plate_nesting=1)
    iwae = ImportanceWeightedELBO(num_particles=num_samples, vectorize_particles=True,
                                  max_plate_nesting=1)
    e, w = [], []
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            e.append(-elbo.loss(model, guide, xi))
            w.append(-iwae.loss(model, guide, xi))
    return torch.tensor(e, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)
