"""Conditioner networks for coupling layers.

A conditioner maps the conditioning part of the input (and, for conditional flows, a
context vector) to the parameters of an element-wise map. Both networks here start with a
zero output layer, so every coupling built on them starts as the identity map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "ConvResNet", "broadcast_context"]


def broadcast_context(
    h: torch.Tensor, context: torch.Tensor, event_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast the batch dimensions of ``h`` (event of ``event_dim`` dims) and of
    ``context`` (event of one dim) against each other."""
    batch = torch.broadcast_shapes(h.shape[: h.dim() - event_dim], context.shape[:-1])
    h = h.expand(batch + h.shape[h.dim() - event_dim :])
    context = context.expand(batch + context.shape[-1:])
    return h, context


class MLP(nn.Module):
    """A dense conditioner: ``in_features (+ context_features) -> hidden -> out_features``.

    Works on any number of leading batch dimensions. The last layer is zero-initialised.

    Example::

        >>> net = MLP(3, 8, hidden_features=(16,))
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 8])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: Sequence[int] = (256, 256),
        context_features: int = 0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.context_features = context_features
        layers: list[nn.Module] = []
        width = in_features + context_features
        for hidden in hidden_features:
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            h, context = broadcast_context(h, context, 1)
            h = torch.cat([h, context], dim=-1)
        return self.net(h)


class _ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.conv2(torch.relu(self.conv1(torch.relu(h))))


class ConvResNet(nn.Module):
    """A small convolutional ResNet conditioner for NCHW images.

    ``conv3x3(in -> hidden)``, ``num_blocks`` residual blocks of two 3x3 convolutions,
    ``conv3x3(hidden -> out)`` with zero initial weights. A context vector is broadcast
    over the image and appended as extra input channels. Leading batch dimensions of any
    number are flattened for the convolutions and restored afterwards. No batch
    statistics are used inside, so each image's output depends on that image alone.

    Example::

        >>> net = ConvResNet(1, 2, hidden_channels=8, num_blocks=1)
        >>> net(torch.randn(3, 4, 1, 8, 8)).shape
        torch.Size([3, 4, 2, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        num_blocks: int = 2,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.context_features = context_features
        self.inp = nn.Conv2d(in_channels + context_features, hidden_channels, 3, padding=1)
        self.blocks = nn.Sequential(*[_ResBlock(hidden_channels) for _ in range(num_blocks)])
        self.out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # type: ignore[arg-type]

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None:
            h, context = broadcast_context(h, context, 3)
            ctx = context[..., None, None].expand(context.shape + h.shape[-2:])
            h = torch.cat([h, ctx], dim=-3)
        batch = h.shape[:-3]
        h = h.reshape((-1,) + h.shape[-3:])
        h = self.out(torch.relu(self.blocks(self.inp(h))))
        return h.reshape(batch + h.shape[-3:])
