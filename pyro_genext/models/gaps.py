r"""Where a VAE's inference gap sits: :func:`gap_decomposition` splits
:math:`\log p(x) - \mathcal{L}(x)` per example into the approximation gap (the posterior
family) and the amortisation gap (the encoder), following Cremer, Li, Duvenaud (2018,
arXiv:1801.03558). Re-exported by :mod:`pyro_genext.models.vae` and
:mod:`pyro_genext.models`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from ._evaluation import _chunks

if TYPE_CHECKING:
    from .vae import VAE


@dataclass
class GapDecomposition:
    r"""Per-example terms of the inference-gap decomposition (nats, shape ``(N,)`` each),
    from :func:`gap_decomposition`.

    * ``log_px``: the importance-weighted estimate of :math:`\log p(x)`, and ``log_px_se``
      its standard error;
    * ``elbo_amortised``: the ELBO of the encoder's posterior :math:`q_\phi(z \mid x)`;
    * ``elbo_family``: the ELBO of the best posterior of the same family for this
      :math:`x` alone (optimised per example, the decoder and prior frozen);
    * ``elbo_flexible``: the ELBO of a locally optimised flexible posterior (a
      per-example RealNVP on a per-example Gaussian).

    Properties: ``approximation_gap`` :math:`= \log p(x) - \mathcal{L}[q^*]`,
    ``amortisation_gap`` :math:`= \mathcal{L}[q^*] - \mathcal{L}[q_\phi]`, their sum
    ``total_gap`` :math:`= \log p(x) - \mathcal{L}[q_\phi]`, and ``flexible_gap``
    :math:`= \log p(x) - \mathcal{L}[q_\text{flex}]` (what of the approximation gap a
    more expressive family would leave).
    """

    log_px: torch.Tensor
    log_px_se: torch.Tensor
    elbo_amortised: torch.Tensor
    elbo_family: torch.Tensor
    elbo_flexible: torch.Tensor

    @property
    def approximation_gap(self) -> torch.Tensor:
        return self.log_px - self.elbo_family

    @property
    def amortisation_gap(self) -> torch.Tensor:
        return self.elbo_family - self.elbo_amortised

    @property
    def total_gap(self) -> torch.Tensor:
        return self.log_px - self.elbo_amortised

    @property
    def flexible_gap(self) -> torch.Tensor:
        return self.log_px - self.elbo_flexible

    def summary(self) -> dict[str, float]:
        """Means over the examples (and the standard error of the mean of each), a
        JSON-able dict."""
        out: dict[str, float] = {"num_examples": int(self.log_px.shape[0])}
        for name in ("log_px", "elbo_amortised", "elbo_family", "elbo_flexible", "approximation_gap",
                     "amortisation_gap", "total_gap", "flexible_gap"):
            v = getattr(self, name).double()
            out[name] = float(v.mean())
            out[f"{name}_sem"] = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
        out["log_px_se_mean"] = float(self.log_px_se.double().mean())
        return out


class _LocalRealNVP(nn.Module):
    """One small affine-coupling flow *per example*: ``n`` independent sets of weights,
    applied with batched matrix products to draws of shape ``(S, n, d)``; layers alternate
    which half is transformed, the log-scale is bounded by ``2 tanh(./2)``, and the last
    layer of each conditioner starts at zero (the identity)."""

    def __init__(self, n: int, d: int, layers: int, hidden: int, like: torch.Tensor) -> None:
        super().__init__()
        self.d = d
        self.w1, self.b1, self.w2, self.b2 = (nn.ParameterList() for _ in range(4))
        for i in range(layers):
            a = d // 2 if i % 2 == 0 else d - d // 2
            b = d - a
            self.w1.append(nn.Parameter(like.new_empty(n, a, hidden).normal_(0, a**-0.5)))
            self.b1.append(nn.Parameter(like.new_zeros(n, hidden)))
            self.w2.append(nn.Parameter(like.new_zeros(n, hidden, 2 * b)))
            self.b2.append(nn.Parameter(like.new_zeros(n, 2 * b)))

    def _coupling(self, i: int, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The halves of ``z`` for layer ``i`` and the log-scale and shift of its other half."""
        a = self.d // 2 if i % 2 == 0 else self.d - self.d // 2
        za, zb = (z[..., :a], z[..., a:]) if i % 2 == 0 else (z[..., -a:], z[..., :-a])
        h = torch.tanh(torch.einsum("snd,ndh->snh", za, self.w1[i]) + self.b1[i])
        out = torch.einsum("snh,nho->sno", h, self.w2[i]) + self.b2[i]
        return za, zb, 2 * torch.tanh(out[..., : zb.shape[-1]] / 2), out[..., zb.shape[-1] :]

    @staticmethod
    def _join(i: int, za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return torch.cat([za, zb], -1) if i % 2 == 0 else torch.cat([zb, za], -1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T(z), log|det dT/dz|)``."""
        ladj = z.new_zeros(z.shape[:-1])
        for i in range(len(self.w1)):
            za, zb, log_s, shift = self._coupling(i, z)
            z = self._join(i, za, zb * log_s.exp() + shift)
            ladj = ladj + log_s.sum(-1)
        return z, ladj

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T^{-1}(z), log|det dT^{-1}/dz|)``."""
        ladj = z.new_zeros(z.shape[:-1])
        for i in reversed(range(len(self.w1))):
            za, zb, log_s, shift = self._coupling(i, z)
            z = self._join(i, za, (zb - shift) * (-log_s).exp())
            ladj = ladj - log_s.sum(-1)
        return z, ladj


def _optimise(params: list[torch.Tensor], log_w: Callable[[int], torch.Tensor], steps: int, lr: float,
              particles: int) -> None:
    """Adam on ``params`` (learning rate ``lr`` decayed linearly to zero), maximising the sum
    over examples of the ``particles``-draw mean of the log-weights (the per-example ELBOs:
    the examples do not interact)."""
    opt = torch.optim.Adam(params, lr=lr)
    for i in range(steps):
        for group in opt.param_groups:  # decayed linearly to zero, so the noisy steps settle
            group["lr"] = lr * (1 - i / steps)
        opt.zero_grad(set_to_none=True)
        (-log_w(particles).mean(0).sum()).backward()
        opt.step()


def _free_gaussian(loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Free per-example parameters ``(mu, rho)`` of a diagonal Gaussian, started at the
    encoder's ``(loc, scale)``; ``rho`` is the encoder's parametrisation of the scale,
    ``scale = softplus(rho) + 1e-5`` (see :func:`_gaussian`)."""
    rho = (scale.detach() - 1e-5).clamp(min=1e-6).expm1().log()  # softplus^-1
    return loc.detach().clone().requires_grad_(), rho.requires_grad_()


def _gaussian(mu: torch.Tensor, rho: torch.Tensor) -> dist.TorchDistribution:
    """The diagonal Gaussian of :func:`_free_gaussian`'s parameters, event shape ``(z_dim,)``."""
    return dist.Normal(mu, F.softplus(rho) + 1e-5).to_event(1)


def _mean_log_w(log_w: Callable[[int], torch.Tensor], total: int, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([log_w(c) for c in _chunks(total, chunk)]).mean(0)


def gap_decomposition(
    vae: VAE,
    x: torch.Tensor,
    *,
    num_samples: int = 1000,
    elbo_samples: int = 200,
    steps: int = 500,
    lr: float = 0.02,
    particles: int = 8,
    flow_layers: int = 4,
    flow_hidden: int = 16,
    seed: int = 0,
) -> GapDecomposition:
    r"""Where a VAE's gap :math:`\log p(x) - \mathcal{L}[q_\phi]` sits, per example
    (Cremer, Li, Duvenaud 2018): the **approximation gap**, from the posterior family, and
    the **amortisation gap**, from the encoder,

    .. math::

        \log p(x) - \mathcal{L}[q_\phi]
          = \underbrace{\log p(x) - \mathcal{L}[q^*]}_\text{approximation}
          + \underbrace{\mathcal{L}[q^*] - \mathcal{L}[q_\phi]}_\text{amortisation},
        \qquad q^* = \arg\max_{q \in \mathcal{Q}} \mathcal{L}[q] \text{ for this } x,

    with the decoder and the prior frozen. How each term is computed:

    * :math:`\mathcal{L}[q^*]`, the best posterior of the VAE's own family, found by
      ``steps`` of Adam (``lr`` decayed linearly to zero, ``particles`` reparameterised
      draws a step) on free
      per-example parameters started at the encoder's output: for the Gaussian posterior,
      the mean and the scale; for a flow posterior, the mean, the scale and the context
      :math:`h` the couplings are conditioned on (the flow's weights are shared by all
      examples, so the family is every :math:`T_h(\mathcal{N}(\mu, \sigma^2))`).
    * :math:`\mathcal{L}[q_\text{flex}]`, a more expressive posterior optimised the same
      way: a per-example RealNVP (``flow_layers`` affine couplings with ``flow_hidden``
      tanh units, weights of its own for every example) on a per-example diagonal
      Gaussian, started at the best diagonal Gaussian (also optimised here); where that
      Gaussian (the flow at the identity, a member of the family) scores higher than
      where the optimiser ended, its ELBO is kept.
    * every ELBO is then estimated afresh with ``elbo_samples`` draws;
    * :math:`\log p(x)`: the importance-weighted estimate with ``num_samples`` draws from
      each of the amortised and the flexible posterior, weighted against their mixture
      :math:`m = \frac12(q_\phi + q_\text{flex})` (multiple importance sampling with the
      balance heuristic, Veach & Guibas 1995): :math:`\hat p = \frac1{2K} \sum_k
      p(x, z_k) / m(z_k)` is unbiased for :math:`p(x)`, so :math:`\log \hat p` is a
      stochastic lower bound, at least as good as the better proposal's IWAE up to
      :math:`\log 2`, and usually much better than the amortised posterior's alone;
      ``log_px_se`` is its standard error by the delta method,
      :math:`\sqrt{\operatorname{Var}\hat p} / \hat p`.

    A large amortisation gap says the encoder is the limit (a wider or longer-trained
    encoder, or fine-tuning the posterior per example at test time, helps); a large
    approximation gap with a small flexible gap says the posterior family is (a flow
    posterior helps); a large flexible gap says that even a flexible posterior cannot
    reach :math:`\log p(x)` in ``steps`` (more steps, or the estimate of
    :math:`\log p(x)` is loose). Gaps are estimates: noise of a few hundredths of a nat
    can make one slightly negative.

    Cost: ``steps`` (twice, three times for a flow posterior) times ``particles`` decoder
    passes per example, plus ``2 num_samples`` and ``3 elbo_samples`` (4 for a flow
    posterior: its own family's ELBO too). The VAE's parameters are not changed; torch's
    global random stream is forked and seeded by ``seed``.

    Example::

        >>> from pyro_genext.models import VAE
        >>> vae = VAE(6, 2, hidden_dims=(8,))
        >>> gaps = gap_decomposition(vae, torch.rand(3, 6).bernoulli(), num_samples=50,
        ...                          elbo_samples=20, steps=10)
        >>> gaps.approximation_gap.shape, sorted(gaps.summary())[:3]
        (torch.Size([3]), ['amortisation_gap', 'amortisation_gap_sem', 'approximation_gap'])

    Reference: Cremer, Li, Duvenaud (2018), Inference suboptimality in variational
    autoencoders, arXiv:1801.03558.
    """
    x = vae._check_data(x, batched=True, force=True)
    if x.shape[0] == 0:
        raise ValueError("expected at least one example, got an empty batch")
    for name, value in (("num_samples", num_samples), ("elbo_samples", elbo_samples), ("steps", steps),
                        ("particles", particles), ("flow_layers", flow_layers), ("flow_hidden", flow_hidden)):
        vae._check_count(value, name)
    if not 0 < float(lr) < math.inf:
        raise ValueError(f"expected lr a finite number > 0, got {lr!r}")
    n, zd = x.shape[0], vae.z_dim
    chunk = max(1, vae._chunk(x))
    frozen = [(p, p.requires_grad) for p in vae.parameters()]
    was_training = vae.training
    vae.eval()

    def log_joint(z: torch.Tensor) -> torch.Tensor:
        return vae.prior(z.shape[:-1]).log_prob(z) + vae.likelihood_dist(z).log_prob(x)

    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
                torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            elbo_amortised = _mean_log_w(lambda k: vae.log_weights(x, k), elbo_samples, chunk)
            loc0, scale0, h0 = vae.encoder(x)
            mu, rho = _free_gaussian(loc0, scale0)

            def gaussian(k: int) -> tuple[torch.Tensor, torch.Tensor]:
                base = _gaussian(mu, rho)
                z0 = base.rsample((k,))
                return z0, base.log_prob(z0)

            def gaussian_log_w(k: int) -> torch.Tensor:
                z, log_q = gaussian(k)
                return log_joint(z) - log_q

            _optimise([mu, rho], gaussian_log_w, steps, lr, particles)
            elbo_gaussian = _mean_log_w(gaussian_log_w, elbo_samples, chunk)
            if vae.flow is None:
                elbo_family = elbo_gaussian
            else:
                mu_f, rho_f = _free_gaussian(loc0, scale0)
                h = h0.detach().clone().requires_grad_()
                flow = vae.flow

                def family_log_w(k: int) -> torch.Tensor:
                    base = _gaussian(mu_f, rho_f)
                    t = flow.condition(h)
                    z0 = base.rsample((k,))
                    z = t(z0)
                    return log_joint(z) - (base.log_prob(z0) - t.log_abs_det_jacobian(z0, z))

                _optimise([mu_f, rho_f, h], family_log_w, steps, lr, particles)
                elbo_family = _mean_log_w(family_log_w, elbo_samples, chunk)
            local = _LocalRealNVP(n, zd, flow_layers, flow_hidden, x.new_zeros(()).to(mu.dtype)) if zd > 1 \
                else None

            def flexible_log_w(k: int) -> torch.Tensor:
                z0, log_q = gaussian(k)
                if local is None:
                    return log_joint(z0) - log_q
                z, ladj = local(z0)
                return log_joint(z) - (log_q - ladj)

            _optimise([mu, rho, *(local.parameters() if local is not None else [])], flexible_log_w, steps,
                      lr, particles)
            # the best Gaussian is a member of the flexible family (the identity flow): keep
            # whichever of the two scored higher
            elbo_flexible = torch.maximum(_mean_log_w(flexible_log_w, elbo_samples, chunk), elbo_gaussian)
            def flexible_log_q(z: torch.Tensor) -> torch.Tensor:
                base = _gaussian(mu, rho)
                if local is None:
                    return base.log_prob(z)
                z0, ladj = local.inverse(z)
                return base.log_prob(z0) + ladj

            def mixture_log_w(k: int) -> torch.Tensor:
                """log p(x, z) - log m(z) for k draws of each proposal, shape (2k, N)."""
                za, _ = vae._rsample_and_log_q(x, k)
                zf, _ = gaussian(k)
                if local is not None:
                    zf = local(zf)[0]
                z = torch.cat([za, zf])
                log_m = torch.logaddexp(vae._posterior(x)[0].log_prob(z), flexible_log_q(z)) - math.log(2)
                return log_joint(z) - log_m

            with torch.no_grad():
                lw = torch.cat([mixture_log_w(c) for c in _chunks(num_samples, max(1, chunk // 2))]).double()
                shift = lw.max(0).values
                w = (lw - shift).exp()
                p_hat = w.mean(0)
                se = w.std(0) / math.sqrt(w.shape[0]) / p_hat
                log_px = (p_hat.log() + shift).to(x.dtype)
                log_px_se = se.to(x.dtype)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        vae.train(was_training)
    return GapDecomposition(log_px=log_px, log_px_se=log_px_se, elbo_amortised=elbo_amortised.detach(),
                            elbo_family=elbo_family.detach(), elbo_flexible=elbo_flexible.detach())
