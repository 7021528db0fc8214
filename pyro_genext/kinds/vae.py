r"""``vae``: the variational auto-encoder (:class:`~pyro_genext.models.VAE`) as a model kind of
the training engine.

::

    pyro-genext train vae --data fashion-mnist --epochs 10 --z-dim 32 --out runs/vae
    pyro-genext train vae --data digits --posterior-flow realnvp --num-flows 4 \
        --objective iwae --particles 5 --out runs/vae-flow
    pyro-genext evaluate runs/vae --num-samples 5000 --json     # {"elbo": ..., "iwae": ..., ...}
    pyro-genext sample runs/vae --out samples.png --latent

**Data.** Images come as grey levels :math:`0 .. L-1`. With the Bernoulli likelihood
(default) the model sees binary images (:mod:`pyro_genext.data.binarization`): training
batches are binarised afresh each time they are used (dynamic binarisation, a Bernoulli
draw with the pixel's intensity :math:`v/(L-1)` as probability, as Burda et al. 2016), and
validation and test images once, from a generator seeded by the run's seed and the split
(:func:`~pyro_genext.engine.split_seed`), so every validation pass, ``evaluate`` and every
run with the same seed score the same binary images and log-likelihoods in nats are
comparable. With ``--likelihood gaussian`` the model sees the intensities in
:math:`[0, 1]` (images) or the raw values (toy data).

**Objectives** (``--objective``, ``--particles K``):

* ``elbo`` (default): the ELBO, with ``TraceMeanField_ELBO`` (the closed-form KL) for the
  Gaussian posterior and ``Trace_ELBO`` for a flow posterior, averaged over ``K`` draws
  (default 1);
* ``iwae``: the importance-weighted bound :math:`\mathcal{L}_K` with ``K`` samples
  (default 5), :class:`~pyro_genext.models.ImportanceWeightedELBO` (Pyro's
  ``RenyiELBO(alpha=0, num_particles=K)`` with a differentiable loss).

``--kl-warmup N`` weights the KL term by :math:`\min(1, s/N)` in step :math:`s`
(:func:`~pyro_genext.models.vae.kl_warmup_weight`, set before each step through the
engine's ``on_step`` hook, so ``--resume`` mid-warm-up is exact); ``--free-bits LAMBDA``
exempts each latent dimension's first :math:`\lambda` nats of batch-mean KL (Gaussian
posterior and prior); both need ``--objective elbo``. ``--prior-flow nice|realnvp`` learns
the prior :math:`p(z)` as a flow density over the latent space.

Validation reports ``nelbo``, minus the ELBO in nats per example (one draw per example),
and selects ``best.pt`` by it. ``evaluate`` reports the test ELBO (``--elbo-particles``
draws) and the IWAE estimate of :math:`\log p(x)` with ``--num-samples K`` (default 5000),
both in nats per example (higher is better), with seeded latent draws, so the numbers are
reproducible; ``--num-examples N`` scores the first ``N``
images only (5000 importance samples per image are slow on a CPU). ``sample`` writes a
grid of samples (the decoder's means at prior draws), one of test images above their
reconstructions, and with ``--latent`` a scatter of the test set's latent means coloured
by label (the first two principal components when ``--z-dim`` is above 2).

Example::

    >>> from pyro_genext.engine import fit
    >>> result = fit("vae", {"data": "digits", "steps": 30, "z_dim": 2, "hidden": [32]},
    ...              progress=False, log=lambda line: None)
    >>> result["steps"], 0 < result["best"]["nelbo_mean"] < 64 * 0.7   # below 0.69 nats/pixel
    (30, True)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from ..data import Dataset, binarize, intensities
from ..engine.kind import ModelKind
from ..engine.settings import nonneg_float, nonneg_int, positive_float, positive_int
from ..engine.validation import generator, module_device, per_example_metrics, split_seed
from ..models import VAE, ImportanceWeightedELBO, kl_warmup_weight

__all__ = ["build", "loss", "prepare", "VAE_KIND"]


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--z-dim", type=positive_int, default=32, help="size of the latent code")
    p.add_argument("--hidden", type=positive_int, nargs="*", default=[512, 256],
                   help="widths of the encoder's dense layers, the decoder mirrors them "
                        "(none given: a linear VAE)")
    p.add_argument("--encoder", choices=("mlp", "conv"), default="mlp",
                   help="dense layers, or stride-2 convolutions first (images)")
    p.add_argument("--conv-channels", type=positive_int, nargs="+", default=[32, 64],
                   help="channels of the convolutional encoder's layers")
    p.add_argument("--activation", choices=("relu", "softplus", "elu", "tanh"), default="relu",
                   help="the hidden layers' non-linearity")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian"), default="bernoulli",
                   help="p(x|z): Bernoulli on binarised images, or Gaussian")
    p.add_argument("--sigma", type=positive_float, default=None,
                   help="the Gaussian likelihood's fixed standard deviation (default: learned)")
    p.add_argument("--posterior-flow", choices=("none", "nice", "realnvp"), default="none",
                   help="push the Gaussian posterior through conditional couplings")
    p.add_argument("--prior-flow", choices=("none", "nice", "realnvp"), default="none",
                   help="the prior p(z): N(0, I), or its image under a NICE/RealNVP flow trained jointly")
    p.add_argument("--num-flows", type=positive_int, default=4,
                   help="couplings of each flow (posterior and prior)")
    p.add_argument("--flow-hidden", type=positive_int, nargs="+", default=[128, 128],
                   help="widths of each coupling's conditioner")
    p.add_argument("--objective", choices=("elbo", "iwae"), default="elbo",
                   help="train the ELBO, or the importance-weighted bound with --particles samples")
    p.add_argument("--particles", type=positive_int, default=None,
                   help="samples per example and step (default: 1 for elbo, 5 for iwae)")
    p.add_argument("--kl-warmup", type=nonneg_int, default=0,
                   help="KL warm-up: the KL term's weight rises linearly to 1 over this many steps "
                        "(default 0: no warm-up; --objective elbo)")
    p.add_argument("--free-bits", type=nonneg_float, default=0.0,
                   help="free bits: nats per latent dimension below which the batch-mean KL of a "
                        "dimension is not penalised (default 0; --objective elbo, Gaussian "
                        "posterior and prior)")


def _add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=positive_int, default=5000,
                   help="importance samples K of the IWAE log-likelihood (default: 5000)")
    p.add_argument("--elbo-particles", type=positive_int, default=10,
                   help="draws averaged for the ELBO of each example (default: 10)")
    p.add_argument("--num-examples", type=positive_int, default=None,
                   help="score only the first N examples of the split (default: all)")


def _add_sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--latent", action="store_true",
                   help="also a scatter of the test set's latent means, coloured by label")


def check_settings(s: Mapping[str, Any]) -> None:
    """Refuse settings that cannot train together (the engine's check, before any work)."""
    if s.get("objective", "elbo") != "elbo" and (s.get("kl_warmup") or s.get("free_bits")):
        raise ValueError(
            f"--kl-warmup and --free-bits change the ELBO; they need --objective elbo, got "
            f"--objective {s.get('objective')}"
        )


def build(s: dict[str, Any], data: Dataset) -> VAE:
    """The VAE a run's settings describe, for this data's shape."""
    if s.get("likelihood", "bernoulli") == "bernoulli" and data.levels is None:
        raise ValueError(
            f"--likelihood bernoulli needs images of grey levels to binarise; {data.name} is "
            f"continuous data: use --likelihood gaussian"
        )
    check_settings(s)
    flow, prior = s.get("posterior_flow", "none"), s.get("prior_flow", "none")
    vae = VAE(
        tuple(data.event_shape),
        int(s.get("z_dim", 32)),
        hidden_dims=tuple(s.get("hidden", (512, 256))),
        likelihood=s.get("likelihood", "bernoulli"),
        sigma=s.get("sigma"),
        posterior_flow=None if flow == "none" else flow,
        prior_flow=None if prior == "none" else prior,
        num_flows=int(s.get("num_flows", 4)),
        flow_hidden_dims=tuple(s.get("flow_hidden", (128, 128))),
        encoder=s.get("encoder", "mlp"),
        conv_channels=tuple(s.get("conv_channels", (32, 64))),
        activation=s.get("activation", "relu"),
        free_bits=float(s.get("free_bits", 0.0)),
    )
    vae.data_levels = data.levels
    return vae


def loss(s: dict[str, Any]) -> ELBO:
    """The training objective of ``--objective`` and ``--particles`` (see the module
    docstring)."""
    iwae = s.get("objective", "elbo") == "iwae"
    k = s.get("particles") or (5 if iwae else 1)
    vec = k > 1  # one vectorised pass over the K draws
    if iwae:
        return ImportanceWeightedELBO(num_particles=k, vectorize_particles=vec, max_plate_nesting=1)
    if s.get("posterior_flow", "none") == "none" and s.get("prior_flow", "none") == "none":
        return TraceMeanField_ELBO(num_particles=k, vectorize_particles=vec, max_plate_nesting=1)
    return Trace_ELBO(num_particles=k, vectorize_particles=vec, max_plate_nesting=1)


def prepare(m: Any, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Grey levels to what the model takes: binary images (Bernoulli, one draw from
    ``generator``: fresh each training step, seeded once for validation and test) or
    intensities in [0, 1] (Gaussian); continuous data unchanged."""
    levels = getattr(m, "data_levels", None)
    if levels is None:
        return x
    if m.likelihood == "bernoulli":
        return binarize(x, levels, generator)
    return intensities(x, levels)


def train_loss(m: Any, x: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    r"""The training loss per example of :func:`loss` without Pyro's tracing
    (``--compile``), the same estimator from the VAE's own distributions: with ``K`` draws
    :math:`z_k \sim q(z \mid x)` and the KL weight :math:`\beta`,

    * ``iwae``: :math:`-\log \frac1K \sum_k w_k`, :math:`w_k = p(x, z_k) / q(z_k \mid x)`;
    * ``elbo``, Gaussian posterior and prior (``TraceMeanField_ELBO``):
      :math:`-\frac1K \sum_k \log p(x \mid z_k) + \beta\,\mathrm{KL}(q \| p)` in
      closed form, plus the free-bits shortfall :math:`\beta \sum_j
      \max(0, \lambda - \overline{\mathrm{KL}}_j)`;
    * ``elbo`` with a flow (``Trace_ELBO``): :math:`-\frac1K \sum_k [\log p(x \mid z_k) +
      \beta (\log p(z_k) - \log q(z_k \mid x))]`;

    averaged over the batch."""
    iwae = s.get("objective", "elbo") == "iwae"
    k = int(s.get("particles") or (5 if iwae else 1))
    if iwae:
        return -(torch.logsumexp(m.log_weights(x, k), 0) - math.log(k)).mean()
    beta = m.kl_weight
    if m.flow is None and m.prior_flow is None:
        q = m.posterior(x)
        z = q.rsample((k,))
        ll = m.likelihood_dist(z).log_prob(x).mean(0)
        kl = torch.distributions.kl_divergence(q.base_dist, m.prior(x.shape[:1]).base_dist)
        loss = -(ll - beta * kl.sum(-1)).mean()
        if m.free_bits > 0:
            loss = loss + beta * torch.relu(m.free_bits - kl.mean(0)).sum()
        return loss
    z, log_q = m._rsample_and_log_q(x, k)
    log_p = m.prior(z.shape[:-1]).log_prob(z)
    return -(m.likelihood_dist(z).log_prob(x) + beta * (log_p - log_q)).mean()


def on_step(m: Any, step: int, s: dict[str, Any]) -> None:
    """Before each training step: the KL weight of ``--kl-warmup`` for this step
    (:func:`~pyro_genext.models.vae.kl_warmup_weight`, a function of the step alone)."""
    m.kl_weight = kl_warmup_weight(step, int(s.get("kl_warmup", 0)))


def check_data(m: Any, x: torch.Tensor) -> None:
    """A whole split, once: finite values, grey levels in range, and what the model takes
    after :func:`prepare`."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"expected finite data, got {int((~torch.isfinite(x)).sum())} NaN or "
                         f"infinite values")
    levels = getattr(m, "data_levels", None)
    if levels is not None and x.numel() and (float(x.min()) < 0 or float(x.max()) > levels - 1):
        raise ValueError(f"expected grey levels in [0, {levels - 1}], got values in "
                         f"[{float(x.min()):g}, {float(x.max()):g}]")
    m.check_data(prepare(m, x, torch.Generator().manual_seed(0)))


@contextmanager
def _fixed_noise(x: torch.Tensor) -> Iterator[None]:
    """Latent draws from a generator seeded afresh, with torch's global state restored
    afterwards: validation neither disturbs the training stream (which bit-exact
    ``--resume`` replays; an extra validation at the end of a shorter run would otherwise
    shift it) nor varies between passes, so checkpoints are compared on the same noise."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def metrics(m: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``nelbo``: minus the ELBO of each (prepared) example, nats, one seeded draw."""
    with _fixed_noise(x):
        return {"nelbo": -m.elbo(x)}


def progress(m: Any, value: float) -> tuple[str, float]:
    """The progress bar shows the training loss in nats per example."""
    return "loss/example", value


def evaluate(m: Any, data: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    """Test ELBO and IWAE log-likelihood in nats per example (higher is better)."""
    k, p = int(args.num_samples), int(args.elbo_particles)
    x = data.x if args.num_examples is None else data.x[: args.num_examples]

    def both(module: Any, xb: torch.Tensor) -> dict[str, torch.Tensor]:
        with _fixed_noise(xb):
            return {"elbo": module.elbo(xb, num_particles=p), "iwae": module.iwae_log_likelihood(xb, k)}

    # the same fixed binarisation as validation: the engine's per-example pass with its
    # seeded generator, with both scores as the metrics
    scoring = dataclasses.replace(VAE_KIND, metrics=both)
    values = per_example_metrics(scoring, m, x, args.settings["seed"], data.split or "test")
    elbo, iwae = values["elbo"].double(), values["iwae"].double()
    return {"elbo": float(elbo.mean()), "iwae": float(iwae.mean()), "num_samples": k,
            "elbo_particles": p, "num_examples": int(x.shape[0]),
            "gap": float((iwae - elbo).mean())}


def sample(m: Any, data: Dataset, args: argparse.Namespace) -> list[Path]:
    """Samples at ``args.out``; reconstructions (and with ``--latent`` the latent scatter)
    beside it, named ``<stem>_reconstructions.png`` (``<stem>_latent.png``)."""
    from ..plots import save_image_grid, save_latent_scatter

    out = Path(args.out)
    torch.manual_seed(args.seed)
    if len(m.input_shape) != 3:
        raise ValueError(
            f"pyro-genext sample draws image grids; this VAE models vectors of shape {m.input_shape}"
        )
    paths = [save_image_grid(m.sample(args.num, mean=True), out, title="samples (decoder means)")]
    device = module_device(m)  # the images go where the model is; the draws are made there
    gen = generator(device, split_seed(args.settings["seed"], data.split or "test"))
    cols = min(8, args.num, len(data))
    rows = max(1, min(args.num, len(data)) // (2 * cols))
    was = m.training
    m.eval()
    x = prepare(m, data.x[: rows * cols].to(device), gen)
    rec = m.reconstruct(x)
    grid = (rows, cols) + x.shape[1:]
    pairs = torch.stack([x.reshape(grid), rec.reshape(grid)], 1).reshape((-1,) + x.shape[1:])
    paths.append(save_image_grid(pairs, out.with_name(f"{out.stem}_reconstructions.png"), ncol=cols,
                                 title="test images (odd rows) and their reconstructions"))
    if getattr(args, "latent", False):
        xs = prepare(m, data.x.to(device), gen)
        z = torch.cat([m.encode(xs[i : i + 500]) for i in range(0, len(xs), 500)])
        paths.append(save_latent_scatter(z, out.with_name(f"{out.stem}_latent.png"), data.y,
                                         title="latent means of the test set"))
    m.train(was)
    return paths


VAE_KIND = ModelKind(
    name="vae",
    summary="VAE: Gaussian or NICE/RealNVP posterior, ELBO or IWAE objective (Kingma & Welling 2014)",
    add_arguments=_add_arguments,
    build=build,
    loss=loss,
    metrics=metrics,
    check_data=check_data,
    evaluate=evaluate,
    sample=sample,
    prepare=prepare,
    add_evaluate_arguments=_add_evaluate_arguments,
    add_sample_arguments=_add_sample_arguments,
    default_threads=1,
    progress=progress,
    on_step=on_step,
    check_settings=check_settings,
    train_loss=train_loss,
)
