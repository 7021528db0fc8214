"""Binary coupling masks. ``1`` marks the conditioning part (passed through unchanged),
``0`` the part that is transformed.

* vectors: :func:`half_mask` (contiguous halves, the fast default) and
  :func:`alternating_mask` (even/odd coordinates, as NICE partitioned its input);
* images (C, H, W): :func:`checkerboard_mask` and :func:`channel_mask` (RealNVP).

``parity`` flips a mask, so that a stack alternates which part is transformed.
"""

from __future__ import annotations

import torch

__all__ = ["half_mask", "alternating_mask", "checkerboard_mask", "channel_mask"]


def _check_positive(name: str, **sizes: int) -> None:
    for key, value in sizes.items():
        if int(value) < 1:
            raise ValueError(f"{name}: expected {key} >= 1, got {value}")


def half_mask(dim: int, parity: int = 0) -> torch.Tensor:
    """``[1]*ceil(dim/2) + [0]*floor(dim/2)`` (the first half conditions); flipped if
    ``parity`` is odd."""
    _check_positive("half_mask", dim=dim)
    if dim < 2:
        raise ValueError(f"half_mask: a coupling needs dim >= 2, got {dim}")
    mask = torch.zeros(dim)
    mask[: (dim + 1) // 2] = 1.0
    return 1.0 - mask if parity % 2 else mask


def alternating_mask(dim: int, parity: int = 0) -> torch.Tensor:
    """``[1, 0, 1, 0, ...]`` (even coordinates condition); flipped if ``parity`` is odd."""
    _check_positive("alternating_mask", dim=dim)
    if dim < 2:
        raise ValueError(f"alternating_mask: a coupling needs dim >= 2, got {dim}")
    mask = (torch.arange(dim) % 2 == 0).float()
    return 1.0 - mask if parity % 2 else mask


def checkerboard_mask(shape: tuple[int, int, int], parity: int = 0) -> torch.Tensor:
    """A (C, H, W) checkerboard: ``1`` where ``(h + w)`` is even; flipped if ``parity`` is
    odd."""
    if len(shape) != 3:
        raise ValueError(f"checkerboard_mask: expected a shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    _check_positive("checkerboard_mask", C=c, H=h, W=w)
    if h * w < 2:
        raise ValueError(f"checkerboard_mask: expected H * W >= 2, got shape {tuple(shape)}")
    grid = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == 0
    mask = grid.float().expand(c, h, w).clone()
    return 1.0 - mask if parity % 2 else mask


def channel_mask(shape: tuple[int, int, int], parity: int = 0) -> torch.Tensor:
    """A (C, H, W) channel-wise mask: the first ``ceil(C/2)`` channels condition; flipped
    if ``parity`` is odd."""
    if len(shape) != 3:
        raise ValueError(f"channel_mask: expected a shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    _check_positive("channel_mask", C=c, H=h, W=w)
    if c < 2:
        raise ValueError(f"channel_mask: expected C >= 2 channels, got shape {tuple(shape)}")
    mask = torch.zeros(c, h, w)
    mask[: (c + 1) // 2] = 1.0
    return 1.0 - mask if parity % 2 else mask
