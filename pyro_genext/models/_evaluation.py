"""Small helpers shared by the VAE's evaluation (:mod:`pyro_genext.models.vae`) and the
inference-gap analysis (:mod:`pyro_genext.models.gaps`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _chunks(total: int, size: int) -> Iterator[int]:
    size = max(1, size)
    while total > 0:
        yield min(size, total)
        total -= size


@contextmanager
def _evaluating() -> Iterator[None]:
    """No gradients, and out of inference mode: the results are ordinary tensors, usable
    inside and outside ``torch.inference_mode()`` (an inference tensor cannot enter a
    later autograd graph, e.g. as a target in a training loop)."""
    with torch.inference_mode(False), torch.no_grad():
        yield
