"""Pictures of density models: image sample grids and 2-D densities (needs matplotlib)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .data import Dataset
from .models import FlowDensity

__all__ = ["save_samples", "image_grid", "save_image_grid", "save_latent_scatter"]


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
    _save(fig, out)


def _save(fig: Any, out: Path) -> Path:
    """Write ``fig`` to a temporary name, then rename it to ``out``; close it."""
    plt = _pyplot()
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
    return out


def save_image_grid(
    images: torch.Tensor,
    out: str | os.PathLike[str],
    levels: int | None = None,
    ncol: int | None = None,
    title: str | None = None,
) -> Path:
    """Write ``(N, C, H, W)`` images (values in ``[0, 1]``, or levels ``0 .. levels-1``) as
    one grid to a PNG; returns its path."""
    plt = _pyplot()
    images = images.detach().cpu().float()
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    grid = image_grid(images, levels, ncol)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1]))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _save(fig, Path(out))


def save_latent_scatter(
    z: torch.Tensor,
    out: str | os.PathLike[str],
    labels: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """Scatter 2-D codes ``z`` ``(N, 2)`` coloured by ``labels``; codes of more dimensions
    are shown by their first two principal components (axes say which). Returns the path."""
    plt = _pyplot()
    z = z.detach().cpu().double()
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"expected codes of shape (N, d) with d >= 2, got {tuple(z.shape)}")
    axes = ("$z_1$", "$z_2$")
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        share = (s[:2] ** 2 / (s**2).sum()).tolist()
        z = centred @ v[:2].T
        axes = (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%})")
    fig, ax = plt.subplots(figsize=(6, 5))
    c = None if labels is None else labels.detach().cpu().numpy()
    sc = ax.scatter(z[:, 0].numpy(), z[:, 1].numpy(), c=c, s=4, cmap="tab10", alpha=0.8)
    if labels is not None:
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    if title:
        ax.set_title(title)
    return _save(fig, Path(out))
