"""The encoder and decoder networks of :class:`~pyro_genext.models.VAE`: dense layers, or
stride-2 convolutions mirrored by transposed convolutions, built by ``VAE.__init__``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
}


def _mlp(widths: Sequence[int], activation: Callable[[], nn.Module], last_activation: bool) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _conv_sizes(h: int, w: int, n: int) -> list[tuple[int, int]]:
    """Spatial sizes after each of ``n`` stride-2, kernel-3, padding-1 convolutions."""
    sizes = [(h, w)]
    for _ in range(n):
        h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        sizes.append((h, w))
    return sizes


class _Encoder(nn.Module):
    """``x (*batch, *input_shape) -> (loc, scale, features)``."""

    def __init__(self, body: nn.Module, in_dims: int, features: int, z_dim: int, image: bool) -> None:
        super().__init__()
        self.body = body
        self.in_dims = in_dims
        self.image = image
        self.features = features
        self.loc = nn.Linear(features, z_dim)
        self.scale = nn.Linear(features, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.in_dims
        batch = x.shape[: x.dim() - k]
        x = x.reshape((-1,) + x.shape[x.dim() - k :]) if self.image else x.reshape(batch + (-1,))
        h = self.body(x)
        h = h.reshape(batch + (-1,))
        return self.loc(h), F.softplus(self.scale(h)) + 1e-5, h


class _Decoder(nn.Module):
    """``z (*batch, z_dim) -> parameters of p(x | z)`` of shape ``(*batch, *input_shape)``."""

    def __init__(self, head: nn.Module, tail: nn.Module | None, bridge: tuple[int, ...] | None,
                 input_shape: tuple[int, ...], log_sigma: float | None, learn_sigma: bool) -> None:
        super().__init__()
        self.head = head
        self.tail = tail
        self.bridge = bridge
        self.input_shape = input_shape
        if log_sigma is None:
            self.log_sigma = None
        elif learn_sigma:
            self.log_sigma = nn.Parameter(torch.tensor(float(log_sigma)))
        else:
            self.register_buffer("log_sigma", torch.tensor(float(log_sigma)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        out = self.head(z)
        if self.tail is not None:
            assert self.bridge is not None
            out = self.tail(out.reshape((-1,) + self.bridge))
        return out.reshape(batch + self.input_shape)
