r"""The variational auto-encoder as a Pyro model/guide pair, with amortised flow posteriors.

From the auto-encoder to the VAE
--------------------------------

An auto-encoder squeezes ``x`` through a code ``z = e(x)`` and back, ``x' = f(z)``. The VAE
makes both ends probabilistic. The **model** is a generative story,

.. math::

    z \sim p(z) = \mathcal{N}(0, I), \qquad x \mid z \sim p_\theta(x \mid z)
    \quad\text{(the decoder)},

and the **guide** (encoder) is an amortised approximation of the posterior,
:math:`q_\phi(z \mid x) = \mathcal{N}(\mu_\phi(x), \operatorname{diag}\sigma_\phi^2(x))`,
sampled with the reparameterisation :math:`z = \mu + \sigma \odot \varepsilon`,
:math:`\varepsilon \sim \mathcal{N}(0, I)`, so gradients flow through the draw. Both are
trained together by maximising the evidence lower bound

.. math::

    \log p_\theta(x) \;\ge\; \mathcal{L}(x)
      = \mathbb{E}_{q}\bigl[\log p_\theta(x \mid z)\bigr]
        - \mathrm{KL}\bigl(q_\phi(z \mid x) \,\|\, p(z)\bigr),
    \qquad
    \log p_\theta(x) - \mathcal{L}(x) = \mathrm{KL}\bigl(q_\phi(z \mid x) \,\|\, p_\theta(z \mid x)\bigr),

so the gap is how far the guide is from the true posterior. For the diagonal Gaussian
guide the KL to the prior is in closed form,

.. math::

    \mathrm{KL}\bigl(\mathcal{N}(\mu, \operatorname{diag}\sigma^2) \,\|\, \mathcal{N}(0, I)\bigr)
      = \tfrac12 \sum_j \bigl(\sigma_j^2 + \mu_j^2 - \log \sigma_j^2 - 1\bigr),

and a Gaussian decoder :math:`\mathcal{N}(f(z), s^2 I)` on :math:`D` dimensions turns the
reconstruction term into a squared error,
:math:`\log p(x \mid z) = -\lVert x - f(z)\rVert^2 / (2 s^2) - \tfrac D2 \log(2\pi s^2)`.

Richer posteriors and tighter bounds
------------------------------------

With ``posterior_flow="nice"`` or ``"realnvp"`` the guide pushes the Gaussian draw through
``num_flows`` conditional coupling layers whose conditioners also see the encoder's
features :math:`h(x)`, :math:`z = T_{h(x)}(z_0)`, :math:`z_0 \sim \mathcal{N}(\mu, \sigma^2)`,
and scores it exactly by the change of variables,
:math:`\log q(z \mid x) = \log \mathcal{N}(z_0; \mu, \sigma^2) - \log|\det \partial T / \partial z_0|`
(Rezende & Mohamed 2015). The couplings start at the identity, so training starts from the
Gaussian VAE.

The importance-weighted bound of Burda et al. (2016),

.. math::

    \mathcal{L}_K(x) = \mathbb{E}\Bigl[\log \frac1K \sum_{k=1}^K
        \frac{p_\theta(x, z_k)}{q_\phi(z_k \mid x)}\Bigr],
    \qquad z_k \sim q_\phi(z \mid x),

satisfies :math:`\mathcal{L} = \mathcal{L}_1 \le \mathcal{L}_K \le \mathcal{L}_{K+1}
\to \log p_\theta(x)`: with large ``K`` (5000 in the paper) it estimates the
log-likelihood, and as an objective it trains the decoder against a tighter bound.

Which Pyro ELBO does what
-------------------------

* ``SVI(vae.model, vae.guide, optim, Trace_ELBO())``: the ELBO, one reparameterised draw.
* ``TraceMeanField_ELBO()``: the same ELBO with the closed-form KL above (Gaussian
  posterior only; with a flow posterior it falls back to Monte Carlo, as ``Trace_ELBO``).
* ``RenyiELBO(alpha=0, num_particles=K)``: the importance-weighted bound
  :math:`\mathcal{L}_K` (IWAE).
* :class:`~pyro_genext.infer.ImportanceWeightedELBO` ``(num_particles=K)``: the same bound, with the
  ``differentiable_loss`` a torch training loop needs, and unbiased for minibatches.

:meth:`VAE.elbo` and :meth:`VAE.iwae_log_likelihood` compute :math:`\mathcal{L}` and
:math:`\mathcal{L}_K` per example for evaluation, in nats.

A learned prior, KL warm-up, free bits, and where the gap sits
--------------------------------------------------------------

``prior_flow="realnvp"`` replaces :math:`\mathcal{N}(0, I)` by a flow density
:math:`p_\psi(z)` trained with the rest, so the prior can match the aggregate posterior
(Xu et al. 2019 report it gaining more than a flow posterior). ``kl_weight`` weights the
KL term (a linear warm-up from near 0 to 1 eases the early epochs, where the KL otherwise
switches latent dimensions off before the decoder uses them; Bowman et al. 2016,
Sønderby et al. 2016), and ``free_bits`` exempts each dimension's first :math:`\lambda`
nats (Kingma et al. 2016). :func:`gap_decomposition` measures, per example, how much of
:math:`\log p(x) - \mathcal{L}(x)` is due to the posterior family (the approximation
gap) and how much to the encoder (the amortisation gap), following Cremer, Li, Duvenaud
(2018, arXiv:1801.03558).

Writing one's own amortised flow guide
--------------------------------------

The guide of :class:`VAE` is the pattern for any model with local latents: an encoder gives
the base Gaussian and a context, a conditional flow is conditioned on the context, and the
flow **must be registered with** ``pyro.module`` (or be a submodule of a ``PyroModule``
whose parameters the optimiser sees), or its parameters never train::

    encoder = MyEncoder()                           # x -> loc, scale, features h
    flow = pyro_genext.conditional_realnvp(z_dim, context_dim=h_dim, num_layers=4)

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("flow", flow)                   # without this the flow stays the identity
        loc, scale, h = encoder(x)
        base = dist.Normal(loc, scale).to_event(1)
        q = dist.TransformedDistribution(base, [flow.condition(h)])
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q)                     # exact log q by the change of variables

Where the code lives
--------------------

This module holds the :class:`VAE` itself (model and guide, prior and posterior,
evaluation, encoding and decoding) and :func:`kl_warmup_weight`; the encoder and decoder
networks are in ``pyro_genext.models.vae_networks``, and the inference-gap analysis in
``pyro_genext.models.gaps``, whose :func:`gap_decomposition` and :class:`GapDecomposition`
are re-exported here.

References: Kingma, Welling (2014), Auto-encoding variational Bayes, arXiv:1312.6114;
Rezende, Mohamed, Wierstra (2014), Stochastic backpropagation, arXiv:1401.4082; Rezende,
Mohamed (2015), Variational inference with normalizing flows, arXiv:1505.05770; Burda,
Grosse, Salakhutdinov (2016), Importance weighted autoencoders, arXiv:1509.00519;
Tipping, Bishop (1999), Probabilistic principal component analysis; Lucas, Tucker, Grosse,
Norouzi (2019), Don't blame the ELBO! A linear VAE perspective on posterior collapse,
arXiv:1911.02469.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.params.param_store import param_with_module_name
from torch import nn

from ..checks import as_model_dtype, data_checks_enabled
from ..flows import ConditionalChain, conditional_nice, conditional_realnvp, nice, realnvp
from ..infer.objectives import ImportanceWeightedELBO  # the one implementation, re-exported
from ..transforms.base import Bijector
from ._evaluation import _chunks, _evaluating
from .gaps import GapDecomposition, gap_decomposition  # the inference-gap analysis, re-exported
from .vae_networks import _ACTIVATIONS, _conv_sizes, _Decoder, _Encoder, _mlp

__all__ = ["VAE", "ImportanceWeightedELBO", "kl_warmup_weight", "gap_decomposition", "GapDecomposition"]

Likelihood = Literal["bernoulli", "gaussian"]


class VAE(PyroModule):
    r"""A variational auto-encoder: :meth:`model` and :meth:`guide` for Pyro's ``SVI``.

    The maths, the choice of ELBO and how to write one's own flow guide are in the module
    docstring, :mod:`pyro_genext.models.vae`.

    * :meth:`model`: :math:`z \sim \mathcal{N}(0, I)` and :math:`x \mid z` from the
      decoder, both in a ``pyro.plate("data")`` that scales a minibatch to the full data
      set when ``size`` is given, so minibatch ELBOs are unbiased estimates of the full
      one.
    * :meth:`guide`: the encoder's diagonal Gaussian, reparameterised, optionally pushed
      through ``num_flows`` conditional NICE or RealNVP couplings conditioned on the
      encoder's features (an amortised flow posterior with exact :math:`\log q`).

    Likelihoods:

    * ``"bernoulli"``: :math:`x_i \mid z \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(f_i(z)))`.
      Data are binary or values in :math:`[0, 1]`; grey values act as soft targets (the
      log-density is then minus the binary cross-entropy, as in Pyro's own VAE example),
      which is **not** a normalised likelihood of grey images: log-likelihoods in nats
      are only meaningful on binarised data (see :mod:`pyro_genext.kinds.vae` for the
      dynamic and fixed binarisations used in training and evaluation).
    * ``"gaussian"``: :math:`x \mid z \sim \mathcal{N}(f(z), s^2 I)` with ``sigma`` =
      :math:`s` fixed, or learned (one scalar, started at 1) when ``sigma=None``. Data may
      be any finite values.

    Data of any real dtype are taken and converted to the dtype of the VAE's parameters
    (integer or boolean images, float64 data into a float32 VAE, float32 data into
    ``VAE(...).double()``); an empty batch is refused with a ``ValueError``.

    Architecture: ``encoder="mlp"`` (default) flattens ``x`` and applies dense layers of
    ``hidden_dims``; the decoder mirrors them. ``hidden_dims=()`` makes both linear: with a
    Gaussian likelihood the model is then probabilistic PCA, and the decoder's columns span
    the data's top ``z_dim`` principal subspace at the optimum (Tipping & Bishop 1999;
    Lucas et al. 2019). ``encoder="conv"`` (inputs ``(C, H, W)``) adds stride-2 3x3
    convolutions of ``conv_channels`` before the dense layers, and the decoder mirrors
    them with transposed convolutions.

    KL warm-up: the attribute ``kl_weight`` (:math:`\beta`, default 1) weights the latent
    site in :meth:`model` and :meth:`guide` alike (``poutine.scale``), so the training
    objective is :math:`\mathbb{E}_q[\log p(x \mid z)] - \beta\,\mathrm{KL}(q \| p)`; the
    command line's ``--kl-warmup N`` sets it to :func:`kl_warmup_weight` ``(step, N)`` before
    each step. ``kl_weight`` is not saved with the parameters; :meth:`elbo` and
    :meth:`iwae_log_likelihood` always use :math:`\beta = 1`.

    Cost per example: one encoder and one decoder pass per draw of :math:`z`; a flow
    posterior adds one pass through each coupling's conditioner per draw (sampling and
    scoring share it once the conditioned flow is cached). :meth:`iwae_log_likelihood`
    costs ``num_samples`` decoder passes.

    Args:
        input_shape: the shape of one data point, an int ``D`` or a tuple.
        z_dim: the size of the latent code.
        hidden_dims: widths of the encoder's dense layers (the decoder reverses them).
        likelihood: ``"bernoulli"`` or ``"gaussian"``.
        sigma: the Gaussian likelihood's fixed standard deviation, or ``None`` to learn it.
        posterior_flow: ``None``, ``"nice"`` or ``"realnvp"``.
        prior_flow: ``None`` (the prior :math:`\mathcal{N}(0, I)`), ``"nice"`` or
            ``"realnvp"``: the prior :math:`p(z)` is then the image of :math:`\mathcal{N}(0, I)`
            under a :func:`~pyro_genext.nice` (with its diagonal scaling) or
            :func:`~pyro_genext.realnvp` flow (couplings only) over the latent space, trained
            jointly with the rest (Xu et al. 2019, arXiv:1905.13452); usable with either
            posterior.
        num_flows: the number of coupling layers of each flow (posterior and prior).
        flow_hidden_dims: widths of each coupling's conditioner.
        encoder: ``"mlp"`` or ``"conv"``.
        conv_channels: channels of the convolutional encoder's layers.
        activation: ``"relu"``, ``"softplus"``, ``"elu"`` or ``"tanh"``.
        free_bits: :math:`\lambda \ge 0`, nats per latent dimension (Kingma et al. 2016,
            arXiv:1606.04934): the training objective (:meth:`model` with :meth:`guide`)
            replaces the KL by :math:`\sum_j \max(\lambda, \overline{\mathrm{KL}}_j)`, where
            :math:`\overline{\mathrm{KL}}_j` is the batch mean of the closed-form KL of
            dimension :math:`j`, so a dimension whose KL is below :math:`\lambda` is not
            pushed towards the prior (its KL gets no gradient). The per-dimension KL has no
            closed form for a flow posterior or a flow prior, so that combination is refused.
            The term is exact with ``TraceMeanField_ELBO`` (the closed-form KL); under
            ``Trace_ELBO`` it corrects the Monte Carlo KL in expectation. :meth:`elbo` and
            :meth:`iwae_log_likelihood` are unaffected.
        name: the Pyro name of this module, the prefix of its parameters in the param store.

    Example::

        >>> import pyro
        >>> from pyro.infer import SVI, TraceMeanField_ELBO
        >>> pyro.clear_param_store()
        >>> x = torch.rand(32, 1, 8, 8).bernoulli()
        >>> vae = VAE((1, 8, 8), z_dim=2, hidden_dims=(32,), posterior_flow="realnvp",
        ...           num_flows=2, flow_hidden_dims=(16,))
        >>> svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), TraceMeanField_ELBO())
        >>> loss = svi.step(x, size=1000)       # a minibatch of a data set of 1000 images
        >>> vae.elbo(x).shape, vae.iwae_log_likelihood(x, num_samples=50).shape
        (torch.Size([32]), torch.Size([32]))
        >>> vae.reconstruct(x).shape, vae.sample(5).shape, vae.encode(x).shape
        (torch.Size([32, 1, 8, 8]), torch.Size([5, 1, 8, 8]), torch.Size([32, 2]))
    """

    def __init__(
        self,
        input_shape: int | Sequence[int],
        z_dim: int,
        *,
        hidden_dims: Sequence[int] = (512, 256),
        likelihood: Likelihood = "bernoulli",
        sigma: float | None = None,
        posterior_flow: str | None = None,
        prior_flow: str | None = None,
        num_flows: int = 4,
        flow_hidden_dims: Sequence[int] = (128, 128),
        encoder: str = "mlp",
        conv_channels: Sequence[int] = (32, 64),
        activation: str = "relu",
        free_bits: float = 0.0,
        name: str = "",
    ) -> None:
        super().__init__(name)
        shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"expected input_shape a positive int or tuple of them, got {input_shape!r}")
        if isinstance(z_dim, bool) or not isinstance(z_dim, int) or z_dim < 1:
            raise ValueError(f"expected z_dim a positive integer, got {z_dim!r}")
        hidden = tuple(int(h) for h in hidden_dims)
        if any(h < 1 for h in hidden):
            raise ValueError(f"expected positive hidden_dims, got {tuple(hidden_dims)}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"expected likelihood in ['bernoulli', 'gaussian'], got {likelihood!r}")
        if sigma is not None and (likelihood != "gaussian" or not 0 < float(sigma) < math.inf):
            raise ValueError(
                f"sigma is the Gaussian likelihood's standard deviation: expected a finite sigma > 0 "
                f"with likelihood='gaussian', got sigma={sigma!r} with likelihood={likelihood!r}"
            )
        for role, kind in (("posterior_flow", posterior_flow), ("prior_flow", prior_flow)):
            if kind not in (None, "nice", "realnvp"):
                raise ValueError(f"expected {role} in [None, 'nice', 'realnvp'], got {kind!r}")
            if kind is not None and z_dim < 2:
                raise ValueError(f"a coupling flow ({role}={kind!r}) needs z_dim >= 2, got z_dim={z_dim}")
        flows = posterior_flow is not None or prior_flow is not None
        if flows and (isinstance(num_flows, bool) or int(num_flows) < 1):
            raise ValueError(f"expected num_flows >= 1, got {num_flows!r}")
        for role, widths in (("flow_hidden_dims", flow_hidden_dims), ("conv_channels", conv_channels)):
            if any(isinstance(w, bool) or int(w) < 1 for w in widths):
                raise ValueError(f"expected positive integers in {role}, got {tuple(widths)}")
        if not 0 <= float(free_bits) < math.inf:
            raise ValueError(f"expected free_bits a finite number of nats >= 0, got {free_bits!r}")
        if float(free_bits) > 0 and flows:
            raise ValueError(
                "free_bits needs the closed-form KL of each latent dimension, which exists for the "
                "Gaussian posterior and the N(0, I) prior only; got "
                f"posterior_flow={posterior_flow!r}, prior_flow={prior_flow!r}"
            )
        if encoder not in ("mlp", "conv"):
            raise ValueError(f"expected encoder in ['mlp', 'conv'], got {encoder!r}")
        if encoder == "conv" and (len(shape) != 3 or not conv_channels):
            raise ValueError(
                f"encoder='conv' needs input_shape (C, H, W) and conv_channels, "
                f"got input_shape {shape} and conv_channels {tuple(conv_channels)}"
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(f"expected activation in {sorted(_ACTIVATIONS)}, got {activation!r}")
        act = _ACTIVATIONS[activation]
        self.input_shape: tuple[int, ...] = shape
        self.z_dim = int(z_dim)
        self.hidden_dims = hidden
        self.likelihood: Likelihood = likelihood
        self.posterior_flow_kind = posterior_flow
        self.prior_flow_kind = prior_flow
        self.free_bits = float(free_bits)
        self.kl_weight = 1.0
        self._free_bits_term: tuple[torch.Tensor, torch.Tensor] | None = None
        self._per_draw: int | None = None
        self.encoder_kind = encoder
        d = math.prod(shape)

        if encoder == "mlp":
            body: nn.Module = _mlp((d, *hidden), act, last_activation=True)
            features = hidden[-1] if hidden else d
            head = _mlp((self.z_dim, *reversed(hidden), d), act, last_activation=False)
            tail, bridge = None, None
        else:
            c, hh, ww = shape
            chans = tuple(int(ch) for ch in conv_channels)
            sizes = _conv_sizes(hh, ww, len(chans))
            convs: list[nn.Module] = []
            for a, b in zip((c, *chans[:-1]), chans):
                convs += [nn.Conv2d(a, b, 3, stride=2, padding=1), act()]
            flat = chans[-1] * sizes[-1][0] * sizes[-1][1]
            body = nn.Sequential(*convs, nn.Flatten(), _mlp((flat, *hidden), act, last_activation=True))
            features = hidden[-1] if hidden else flat
            head = _mlp((self.z_dim, *reversed(hidden), flat), act, last_activation=True)
            ups: list[nn.Module] = []
            outs = (*reversed(chans[:-1]), c)
            for i, (a, b) in enumerate(zip(reversed(chans), outs)):
                (h_in, w_in), (h_out, w_out) = sizes[-1 - i], sizes[-2 - i]
                pad = (h_out - 2 * h_in + 1, w_out - 2 * w_in + 1)
                ups.append(nn.ConvTranspose2d(a, b, 3, stride=2, padding=1, output_padding=pad))
                if i < len(chans) - 1:
                    ups.append(act())
            tail = nn.Sequential(*ups)
            bridge = (chans[-1], *sizes[-1])
        self.encoder = _Encoder(body, len(shape), features, self.z_dim, image=encoder == "conv")
        log_sigma = None if likelihood == "bernoulli" else (0.0 if sigma is None else math.log(float(sigma)))
        self.decoder = _Decoder(head, tail, bridge, shape, log_sigma, learn_sigma=sigma is None)
        self.flow: ConditionalChain | None = None
        if posterior_flow == "nice":
            self.flow = conditional_nice(self.z_dim, features, num_layers=int(num_flows),
                                         hidden_dims=flow_hidden_dims, scaling=False)
        elif posterior_flow == "realnvp":
            self.flow = conditional_realnvp(self.z_dim, features, num_layers=int(num_flows),
                                            hidden_dims=flow_hidden_dims, norm=None)
        self.prior_flow: Bijector | None = None
        if prior_flow == "nice":
            self.prior_flow = nice(self.z_dim, num_layers=int(num_flows), hidden_dims=flow_hidden_dims)
        elif prior_flow == "realnvp":
            self.prior_flow = realnvp(self.z_dim, num_layers=int(num_flows), hidden_dims=flow_hidden_dims,
                                      norm=None)

    # ------------------------------------------------------------------ pieces
    @property
    def sigma(self) -> torch.Tensor | None:
        """The Gaussian likelihood's standard deviation now, detached (``None`` for
        Bernoulli)."""
        ls = self.decoder.log_sigma
        return None if ls is None else ls.detach().exp()

    def likelihood_dist(self, z: torch.Tensor) -> dist.TorchDistribution:
        r""":math:`p(x \mid z)` for latents ``z`` of shape ``(*batch, z_dim)``, batch shape
        ``batch``, event shape ``input_shape``."""
        out = self.decoder(z)
        k = len(self.input_shape)
        if self.likelihood == "bernoulli":
            # validate_args=False: grey values in [0, 1] are allowed as soft targets; the
            # inputs are checked by _check_data instead
            return dist.Bernoulli(logits=out, validate_args=False).to_event(k)
        sigma = self.decoder.log_sigma.exp()  # type: ignore[union-attr]
        return dist.Normal(out, sigma.expand_as(out)).to_event(k)

    def prior(self, batch_shape: Sequence[int] | torch.Size) -> dist.TorchDistribution:
        r"""The prior on ``z``, batch shape ``batch_shape``: :math:`\mathcal{N}(0, I)`, or
        with ``prior_flow`` its image under the flow :math:`T` (forward is base -> latent), a
        ``TransformedDistribution`` with :math:`\log p(z) = \log \mathcal{N}(T^{-1}(z); 0, I)
        + \log|\det \partial T^{-1} / \partial z|`."""
        p = next(self.encoder.parameters())
        loc = p.new_zeros(tuple(batch_shape) + (self.z_dim,))
        base = dist.Normal(loc, torch.ones_like(loc)).to_event(1)
        if self.prior_flow is None:
            return base
        return dist.TransformedDistribution(base, [self.prior_flow])

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        r"""The guide's :math:`q(z \mid x)` for data ``x`` of shape ``(*batch, *input_shape)``:
        the encoder's diagonal Gaussian, or its image under the conditioned flow, a
        ``TransformedDistribution`` whose ``log_prob`` is exact."""
        x = self._check_data(x)
        return self._posterior(x)[0]

    def _posterior(self, x: torch.Tensor) -> tuple[dist.TorchDistribution, Any]:
        loc, scale, h = self.encoder(x)
        base = dist.Normal(loc, scale).to_event(1)
        if self.flow is None:
            return base, None
        t = self.flow.condition(h)
        return dist.TransformedDistribution(base, [t]), (base, t)

    def _rsample_and_log_q(self, x: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``num`` reparameterised draws ``z`` of ``q(z | x)`` with their exact log-density,
        shapes ``(num, *batch, z_dim)`` and ``(num, *batch)``; one pass of each network."""
        q, parts = self._posterior(x)
        if parts is None:
            z = q.rsample((num,))
            return z, q.log_prob(z)
        base, t = parts
        z0 = base.rsample((num,))
        z = t(z0)
        return z, base.log_prob(z0) - t.log_abs_det_jacobian(z0, z)

    # ------------------------------------------------------------------ pyro
    def model(self, x: torch.Tensor, size: int | None = None) -> None:
        r"""The generative model: :math:`z \sim \mathcal{N}(0, I)` at site ``"z"``, then
        ``x`` observed under :math:`p(x \mid z)` at site ``"x"``, in
        ``pyro.plate("data", size)``.

        Args:
            x: a batch of data, shape ``(N, *input_shape)``: binary or in :math:`[0, 1]`
                (Bernoulli), finite (Gaussian); checked before any computation.
            size: the number of examples in the whole data set when ``x`` is a minibatch
                of it: the plate scales the batch's terms by ``size / N``, so the loss is
                an unbiased estimate of the full data set's. ``None``: ``N``.
        """
        given, x = x, self._check_data(x, batched=True)
        n = self._plate_size(x, size)
        self._register("decoder", self.decoder)
        if self.prior_flow is not None:
            self._register("prior_flow", self.prior_flow)
        term, self._free_bits_term = self._free_bits_term, None
        if term is not None and term[0] is given:  # the guide of this very ELBO evaluation left it
            pyro.factor("free_bits", term[1])
        with pyro.plate("data", n, subsample=torch.arange(x.shape[0], device=x.device)):
            with self._kl_scale():
                z = pyro.sample("z", self.prior((x.shape[0],)))
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x: torch.Tensor, size: int | None = None) -> None:
        r"""The amortised posterior :math:`q(z \mid x)` at site ``"z"`` (see
        :meth:`posterior`), in the same plate as :meth:`model`; takes the same arguments."""
        given, x = x, self._check_data(x, batched=True)
        n = self._plate_size(x, size)
        self._register("encoder", self.encoder)
        if self.flow is not None:
            self._register("flow", self.flow)
        with pyro.plate("data", n, subsample=torch.arange(x.shape[0], device=x.device)):
            q = self._posterior(x)[0]
            with self._kl_scale():
                pyro.sample("z", q)
        self._free_bits_term = None
        if self.free_bits > 0:
            # max(lambda, KL_j) in place of KL_j, on the batch-mean KL of each dimension:
            # the model adds  -beta * size * sum_j relu(lambda - mean_n KL_nj)  to the joint;
            # KL_nj is the closed form TraceMeanField_ELBO uses, dimension by dimension
            kl = torch.distributions.kl_divergence(q.base_dist, self.prior((x.shape[0],)).base_dist).mean(0)
            shortfall = torch.relu(self.free_bits - kl).sum()
            self._free_bits_term = (given, -self.kl_weight * n * shortfall)

    @contextmanager
    def _kl_scale(self) -> Iterator[None]:
        r"""``poutine.scale(kl_weight)`` around the latent site (model and guide alike), so
        both :math:`\log p(z)` and :math:`\log q(z \mid x)`, or the closed-form KL of
        ``TraceMeanField_ELBO``, are weighted; nothing when the weight is 1."""
        if self.kl_weight == 1.0:
            yield
            return
        with poutine.scale(scale=self.kl_weight):
            yield

    def _plate_size(self, x: torch.Tensor, size: int | None) -> int:
        if size is None:
            return x.shape[0]
        if isinstance(size, bool) or not isinstance(size, int) or size < x.shape[0]:
            raise ValueError(
                f"expected size, the number of examples in the data set, an integer >= the "
                f"batch size {x.shape[0]}, got {size!r}"
            )
        return size

    def _register(self, part: str, module: nn.Module) -> None:
        """``pyro.module``, with this VAE's own tensors winning: a parameter of the same
        name left in Pyro's param store by another module (an earlier VAE, or the one a
        checkpoint was trained as) is replaced, so that ``SVI`` optimises the tensors this
        VAE computes with. (Plain ``pyro.module`` would keep the stored tensor, and SVI
        would then silently train that one instead.)"""
        prefix = f"{self._pyro_name}.{part}" if self._pyro_name else part
        store = pyro.get_param_store()
        for pname, p in module.named_parameters():
            full = param_with_module_name(prefix, pname)
            if full in store and store._params[full] is not p:
                del store[full]
        pyro.module(prefix, module)

    # ------------------------------------------------------------------ evaluation
    def log_weights(self, x: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        r"""Importance log-weights :math:`\log p(x, z_k) - \log q(z_k \mid x)`,
        :math:`z_k \sim q(z \mid x)`, shape ``(num_samples, N)`` for ``x`` of shape
        ``(N, *input_shape)``. Differentiable (no ``no_grad`` here)."""
        x = self._check_data(x, batched=True)
        k = self._check_count(num_samples, "num_samples")
        z, log_q = self._rsample_and_log_q(x, k)
        log_p = self.prior(z.shape[:-1]).log_prob(z) + self.likelihood_dist(z).log_prob(x)
        return log_p - log_q

    def elbo(self, x: torch.Tensor, num_particles: int = 1) -> torch.Tensor:
        r"""The ELBO :math:`\mathcal{L}(x)` per example in nats, averaged over
        ``num_particles`` draws (a Monte Carlo estimate, unbiased), shape ``(N,)``.
        The same objective as ``Trace_ELBO`` (without the plate's scaling)."""
        k = self._check_count(num_particles, "num_particles")
        x = self._check_data(x, batched=True)
        with _evaluating():
            total: torch.Tensor | None = None
            for chunk in _chunks(k, self._chunk(x)):
                part = self.log_weights(x, chunk).sum(0)
                total = part if total is None else total + part
            assert total is not None
            return total / k

    def iwae_log_likelihood(self, x: torch.Tensor, num_samples: int = 5000,
                            chunk_size: int | None = None) -> torch.Tensor:
        r"""The importance-weighted estimate of :math:`\log p(x)`,
        :math:`\log \frac1K \sum_k p(x, z_k) / q(z_k \mid x)` with ``K = num_samples``,
        one value per example in nats, shape ``(N,)``. Its expectation is the bound
        :math:`\mathcal{L}_K`, which increases with ``K`` towards :math:`\log p(x)`.

        The ``K`` draws are taken ``chunk_size`` at a time (default: as many as keep about
        :math:`2^{22}` activations in memory, counting every layer's output of the decoder
        and the flows, hidden widths included) and combined by a running log-sum-exp, so
        ``K = 5000`` needs the memory of one chunk.
        """
        k = self._check_count(num_samples, "num_samples")
        x = self._check_data(x, batched=True)
        if chunk_size is not None:
            chunk_size = self._check_count(chunk_size, "chunk_size")
        with _evaluating():
            acc: torch.Tensor | None = None
            for chunk in _chunks(k, chunk_size or self._chunk(x)):
                lse = torch.logsumexp(self.log_weights(x, chunk), dim=0)
                acc = lse if acc is None else torch.logaddexp(acc, lse)
            assert acc is not None
            return acc - math.log(k)

    def _chunk(self, x: torch.Tensor) -> int:
        """Draws per chunk: as many as keep about ``_CHUNK_ELEMENTS`` activations alive."""
        return max(1, _CHUNK_ELEMENTS // (max(1, x.shape[0]) * self._elements_per_draw(x)))

    def _elements_per_draw(self, x: torch.Tensor) -> int:
        """What one draw of ``z`` for one example allocates: the outputs of every layer of
        the networks (counted once, on one example and one draw, by forward hooks; the
        architecture does not change), plus a few tensors of the data's size for the
        likelihood."""
        if self._per_draw is None:
            counted = [0]

            def count(module: nn.Module, inputs: Any, output: Any) -> None:
                if isinstance(output, torch.Tensor):
                    counted[0] += output.numel()

            leaves = [m for m in self.modules() if next(m.children(), None) is None]
            handles = [m.register_forward_hook(count) for m in leaves]
            devices = [x.device] if x.device.type == "cuda" else []
            try:  # a probe that leaves torch's random stream as it was
                with _evaluating(), torch.random.fork_rng(devices=devices):
                    p = next(self.encoder.parameters())
                    self.log_weights(p.new_zeros((1, *self.input_shape)), 1)
            finally:
                for h in handles:
                    h.remove()
            self._per_draw = counted[0] + 4 * math.prod(self.input_shape)
        return self._per_draw

    @staticmethod
    def _check_count(value: int, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"expected {name} a positive integer, got {value!r}")
        return value

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        r"""The centre of :math:`q(z \mid x)`, shape ``(*batch, z_dim)``: the encoder's mean
        :math:`\mu(x)`, pushed through the conditioned flow when there is one."""
        with _evaluating():
            x = self._check_data(x)
            loc, _, h = self.encoder(x)
            return loc if self.flow is None else self.flow.condition(h)(loc)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        r"""The mean of :math:`p(x \mid z)` (Bernoulli probabilities or the Gaussian mean),
        shape ``(*batch, *input_shape)``, for ``z`` of shape ``(*batch, z_dim)``."""
        if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[-1] != self.z_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"expected latents of shape (..., {self.z_dim}), got {got}")
        with _evaluating():
            out = self.decoder(z)
            return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        r"""``decode(encode(x))``: the decoder's mean at the posterior's centre, the shape
        of ``x``."""
        return self.decode(self.encode(x))

    def sample(self, n: int, mean: bool = False) -> torch.Tensor:
        r"""``n`` draws of the model, shape ``(n, *input_shape)``: :math:`z \sim p(z)`, then
        :math:`x \sim p(x \mid z)`, or with ``mean=True`` the mean of :math:`p(x \mid z)`
        (the picture usually shown for a Bernoulli VAE)."""
        n = self._check_count(n, "n")
        with _evaluating():
            z = self.prior((n,)).sample()
            return self.decode(z) if mean else self.likelihood_dist(z).sample()

    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        r"""Decoder means along the straight line from ``encode(x1)`` to ``encode(x2)``,
        ``steps`` points including both ends, shape ``(steps, *x1.shape)``."""
        steps = self._check_count(steps, "steps")
        if not isinstance(x2, torch.Tensor) or not isinstance(x1, torch.Tensor) or x1.shape != x2.shape:
            raise ValueError(
                f"expected x1 and x2 tensors of the same shape, got {getattr(x1, 'shape', x1)} "
                f"and {getattr(x2, 'shape', x2)}"
            )
        z1, z2 = self.encode(x1), self.encode(x2)
        t = torch.linspace(0, 1, steps, device=z1.device).reshape((steps,) + (1,) * z1.dim())
        return self.decode(z1 + t * (z2 - z1))

    # ------------------------------------------------------------------ checks
    def check_data(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` (shape ``(N, *input_shape)``) is data this model
        takes (finite; in [0, 1] for the Bernoulli likelihood). Runs even inside
        :func:`~pyro_genext.checks.data_checks` ``(False)``: check a data set once, then
        train without per-step checks (no host synchronisation on a GPU)."""
        self._check_data(x, batched=True, force=True)

    def _check_data(self, x: torch.Tensor, batched: bool = False, force: bool = False) -> torch.Tensor:
        """Validate data before any computation; data of another real dtype (integers,
        booleans, other floats) become the dtype of the VAE's parameters. Shapes and an empty
        batch always; values unless switched off by
        :func:`~pyro_genext.checks.data_checks` (and not ``force``)."""
        x = as_model_dtype(x, next(self.encoder.parameters()).dtype)
        k = len(self.input_shape)
        ok = x.dim() == k + 1 if batched else x.dim() >= k
        if not ok or tuple(x.shape[x.dim() - k :]) != self.input_shape:
            dims = ", ".join(map(str, self.input_shape))
            want = f"(N, {dims})" if batched else f"(..., {dims})"
            raise ValueError(f"expected data of shape {want}, got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"expected at least one example, got an empty batch of shape {tuple(x.shape)}")
        if not (force or data_checks_enabled()):
            return x
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"expected finite data, got {bad} NaN or infinite values")
        if self.likelihood == "bernoulli" and x.numel() and (
            bool((x < 0).any()) or bool((x > 1).any())
        ):
            raise ValueError(
                "the Bernoulli likelihood expects data in [0, 1] (binary, or grey values as "
                f"soft targets), got values in [{float(x.min()):g}, {float(x.max()):g}]"
            )
        return x

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, z_dim={self.z_dim}, likelihood={self.likelihood!r}, "
            f"encoder={self.encoder_kind!r}, posterior_flow={self.posterior_flow_kind!r}"
        )


#: The activations (elements) one chunk of draws may keep alive in evaluation: 16 MB of float32.
_CHUNK_ELEMENTS = 2**22


def kl_warmup_weight(step: int, warmup: int) -> float:
    r"""The KL term's weight :math:`\beta` in the training step that follows ``step``
    optimiser steps (0-based): :math:`\min(1, (\text{step} + 1) / \text{warmup})`, rising
    linearly from :math:`1/\text{warmup}` in the first step to 1 in step ``warmup`` and
    after; 1 throughout when ``warmup`` is 0. A function of the step alone, so a run resumed
    mid-warm-up continues the same schedule. (Pyro's ``poutine.scale`` refuses a weight of
    0, so the first step already carries :math:`1/\text{warmup}`.)

    Example::

        >>> [kl_warmup_weight(s, 4) for s in range(5)]
        [0.25, 0.5, 0.75, 1.0, 1.0]

    Reference: Bowman et al. (2016), Generating sentences from a continuous space,
    arXiv:1511.06349; Sønderby et al. (2016), Ladder variational autoencoders,
    arXiv:1602.02282.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"expected step a non-negative integer, got {step!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"expected warmup a non-negative integer number of steps, got {warmup!r}")
    return 1.0 if warmup == 0 else min(1.0, (step + 1) / warmup)
