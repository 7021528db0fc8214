"""Pictures of density models: image sample grids and 2-D densities (needs matplotlib)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .data import Dataset
from .models import FlowDensity

__all__ = ["save_samples", "image_grid"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "writing pictures needs matplotlib: pip install 'pyro-genext[plot]'"
        ) from e
    return plt


def image_grid(images: torch.Tensor, levels: int | None, ncol: int | None = None) -> torch.Tensor:
    """Tile ``(N, C, H, W)`` images into one ``(rows*H, cols*W[, C])`` array in [0, 1]."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    scale = float(levels - 1) if levels else 1.0
    x = (images / scale).clamp(0, 1)
    grid = torch.ones(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    return grid[0] if c == 1 else grid.permute(1, 2, 0)


def save_samples(density: FlowDensity, data: Dataset, num: int, out: str | os.PathLike[str]) -> None:
    """Write ``num`` samples to a PNG: a grid for images, or for 2-D data a scatter over
    a heat map of the model's density. Written to a temporary name, then renamed."""
    plt = _pyplot()
    out = Path(out)
    with torch.no_grad():
        x = density.sample(num, quantize=data.levels is not None)
    fig: Any
    if len(data.event_shape) == 3:
        grid = image_grid(x.reshape((num,) + tuple(data.event_shape)), data.levels)
        fig, ax = plt.subplots(figsize=(6, 6))
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_axis_off()
    else:
        pts = x.reshape(num, -1)[:, :2].numpy()
        fig, ax = plt.subplots(figsize=(6, 6))
        lim = 4.0
        g = torch.linspace(-lim, lim, 200)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        grid_pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
        with torch.no_grad():
            dens = density.log_prob(grid_pts).exp().reshape(200, 200)
        ax.imshow(dens.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
        ax.scatter(pts[:, 0], pts[:, 1], s=2, c="white", alpha=0.6)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_title("samples over the model density")
    tmp = out.with_name(out.name + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, out)
    except OSError as e:
        raise OSError(f"cannot write {out} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
