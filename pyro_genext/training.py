"""Flow density models through the engine: the flow-specific front door of
:mod:`pyro_genext.engine`, kept for code written before the engine.

::

    >>> cfg = TrainConfig(model="realnvp", data="moons", steps=20, batch_size=64,
    ...                   num_layers=2, hidden=16)
    >>> result = train(cfg, out_dir=None, progress=False, log=lambda msg: None)
    >>> result["steps"], result["best_val_bpd"] < 3
    (20, True)

:func:`train` is :func:`pyro_genext.engine.fit` with the ``nice`` or ``realnvp`` kind
(:mod:`pyro_genext.kinds.flows`); everything it guarantees (atomic checkpoints, bit-exact
resume, validation each epoch) is the engine's. Unlike ``pyro-genext train``, it
replaces a run already in ``out_dir`` (as it always did).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import torch

from .data import DATASETS, Dataset
from .engine import (
    CheckpointError,
    default_settings,
    fit,
    load_checkpoint,
    module_from_checkpoint,
    per_example_metrics,
    save_checkpoint,
)
from .kinds import flows as _flows
from .models import FlowDensity
from .transforms.elementwise import check_bound

__all__ = [
    "MODELS",
    "TrainConfig",
    "CheckpointError",
    "build_density",
    "train",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "density_from_checkpoint",
]

MODELS = ("nice", "realnvp")


@dataclasses.dataclass
class TrainConfig:
    """The settings of a flow training run (``None``: the kind's default)."""

    model: str = "realnvp"
    data: str = "digits"
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    root: str | None = None
    num_layers: int | None = None
    hidden: int | None = None
    num_blocks: int = 2
    clip_norm: float = 10.0
    checkpoint_every: int = 500
    base: str | None = None
    scale_bound: float | tuple[float, float] = 2.0
    input_bound: float | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the expected values, before any work."""
        from .engine import check_settings

        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {', '.join(MODELS)}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data {self.data!r}; expected one of {', '.join(DATASETS)}")
        for name in ("num_layers", "hidden", "num_blocks"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"expected {name} >= 1, got {v}")
        self.scale_bound = check_bound(self.scale_bound, "scale-bound")  # type: ignore[assignment]
        if self.scale_bound is None:
            raise ValueError("expected scale-bound > 0 or a pair (low, high), got None")
        if self.base not in (None, "normal", "logistic"):
            raise ValueError(f"expected base 'normal' or 'logistic', got {self.base!r}")
        check_settings({**default_settings(self.model), **self.settings()})

    def settings(self) -> dict[str, Any]:
        """The engine settings of this run (those of its kind; ``None`` keeps a default)."""
        own = default_settings(self.model)
        given = {k: v for k, v in dataclasses.asdict(self).items() if k in own and k != "model"}
        return {k: v for k, v in given.items() if v is not None or k in ("steps", "epochs", "root")}


def build_density(cfg: TrainConfig, data: Dataset) -> FlowDensity:
    """The flow and density model a configuration describes, for this data's shape."""
    return _flows.build_density(cfg.model, dataclasses.asdict(cfg), data)


def evaluate(
    density: FlowDensity, x: torch.Tensor, batch_size: int = 500, seed: int = 1234
) -> float:
    """Bits/dim of ``x`` under ``density``: one uniform dequantization draw per image from a
    generator seeded with ``seed`` (so numbers are reproducible), averaged over the set.

    It is the engine's scoring loop, :func:`~pyro_genext.engine.per_example_metrics`; the
    default seed, 1234, is the one the engine gives the training split of a run seeded 0
    (:func:`~pyro_genext.engine.split_seed`), so ``evaluate(density, x)`` is the mean of
    ``per_example_metrics(kind, density, x, 0, "train")["bpd"]``."""
    if x.shape[0] == 0:
        return 0.0
    values = per_example_metrics(_flows.REALNVP, density, x, 0, "train", batch_size,
                                 generator_seed=seed)
    return float(values["bpd"].double().mean())


def density_from_checkpoint(state: dict[str, Any]) -> tuple[FlowDensity, TrainConfig, Dataset]:
    """Rebuild the density model of a flow checkpoint, its configuration and a data stub."""
    from .engine import data_stub

    density, kind, settings = module_from_checkpoint(state)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(model=kind.name, **{k: v for k, v in settings.items() if k in fields})
    return density, cfg, data_stub(state)


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str] | None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    train_data: Dataset | None = None,
    val_data: Dataset | None = None,
) -> dict[str, Any]:
    """Train a flow density model with :func:`pyro_genext.engine.fit`. Returns its result
    with, as before, ``best_val_bpd`` (mean validation bits/dim of the best checkpoint),
    ``density`` (the model after the last step) and each ``history`` entry's ``val_bpd``."""
    cfg.validate()
    result = fit(cfg.model, cfg.settings(), out_dir, resume=resume, overwrite=not resume,
                 progress=progress, log=log, train_data=train_data, val_data=val_data)
    for h in result["history"]:
        h["val_bpd"] = h["bpd_mean"]
    result["best_val_bpd"] = result["best"].get("bpd_mean", math.inf)
    result["density"] = result["module"]
    return result
