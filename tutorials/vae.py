"""From the auto-encoder to the variational auto-encoder, in Pyro, on handwritten digits.

    python tutorials/vae.py                        # scikit-learn digits, 64-D, about a minute
    python tutorials/vae.py --smoke                # seconds: checks that everything runs
    python tutorials/vae.py --data fashion-mnist   # 784-D, slower on a CPU

It trains an auto-encoder, then a VAE with Pyro's SVI; writes the ELBO out by hand next to
Pyro's estimate of it (and the closed-form KL next to its Monte Carlo estimate); fits a
linear VAE and compares its decoder with PCA; prints test ELBO and IWAE log-likelihoods;
and writes OUT/samples.png, OUT/reconstructions.png and OUT/latent.png.

References: Kingma, Welling (2014), Auto-encoding variational Bayes, arXiv:1312.6114;
Burda, Grosse, Salakhutdinov (2016), Importance weighted autoencoders, arXiv:1509.00519.
"""

# ---------------------------------------------------------------------------------------
# 1. An auto-encoder
#
# An auto-encoder squeezes x through a small code z = e(x) and back, x' = f(z), trained
# to make x' close to x. With a 2-D code it draws a map of the data set. But it is no
# generative model: nothing says which codes are "valid", so decoding a random z gives
# rubbish, and there is no likelihood to compare models with.
#
# 2. The VAE: a generative model with an amortised posterior
#
# The VAE makes the decoder a likelihood and puts a prior on the code:
#
#     z ~ N(0, I),     x | z ~ p(x | z) = Bernoulli(sigmoid(f(z)))   (binary pixels)
#
# and the encoder a distribution over codes, q(z | x) = N(mu(x), diag sigma(x)^2). In Pyro
# these are a model and a guide (pyro_genext.models.VAE.model / .guide). Training
# maximises the evidence lower bound
#
#     ELBO(x) = E_q[log p(x | z)] - KL(q(z | x) || p(z))  <=  log p(x),
#
# whose gap is KL(q(z | x) || p(z | x)): how far the encoder is from the true posterior.
# The expectation is estimated with z = mu + sigma * eps, eps ~ N(0, I): the
# reparameterisation trick, so gradients flow through the draw into mu and sigma.
# For a diagonal Gaussian against N(0, I) the KL is in closed form,
#
#     KL = 1/2 sum_j (sigma_j^2 + mu_j^2 - log sigma_j^2 - 1),
#
# which TraceMeanField_ELBO uses (Trace_ELBO estimates it by Monte Carlo instead).
# With a Gaussian decoder N(f(z), s^2 I) the reconstruction term is a squared error,
# log p(x | z) = -||x - f(z)||^2 / (2 s^2) - D/2 log(2 pi s^2): the auto-encoder's loss,
# plus a KL that organises the codes around the prior.
#
# 3. Binarised data
#
# A Bernoulli likelihood is a probability of binary images. Grey images are binarised:
# each pixel is 1 with probability intensity = level / (L - 1). Training images get a
# fresh draw every time they are used (dynamic binarisation, as Burda et al.), validation
# and test images one fixed, seeded draw, so log-likelihoods in nats are comparable.
#
# 4. Importance weighting
#
# With K draws z_k ~ q(z | x),  log (1/K) sum_k p(x, z_k) / q(z_k | x)  is a tighter bound
# (IWAE, Burda et al. 2016) that rises with K towards log p(x); with K = 5000 it is the
# standard estimate of a VAE's test log-likelihood.
# ---------------------------------------------------------------------------------------

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from _common import parser, report, setup
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_genext.data import binarize, intensities, load_dataset
from pyro_genext.models import VAE
from pyro_genext.plots import save_image_grid, save_latent_scatter

FULL = {
    "digits": dict(hidden=(256,), z_dim=2, batch_size=64, lr=3e-3, steps=3000, k=1000, pca_steps=2000),
    "fashion-mnist": dict(hidden=(512, 256), z_dim=2, batch_size=100, lr=1e-3, steps=5000, k=1000,
                          pca_steps=2000),
}
SMOKE = dict(hidden=(32,), z_dim=2, batch_size=64, lr=3e-3, steps=60, k=20, pca_steps=100)


def minibatches(n: int, batch: int, gen: torch.Generator):
    """Endless shuffled minibatch indices."""
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def main(argv: list[str] | None = None) -> dict:
    args = parser("vae", __doc__, ["digits", "fashion-mnist"], "digits").parse_args(argv)
    cfg = SMOKE if args.smoke else FULL[args.data]
    setup(args, SMOKE["steps"], cfg["steps"])
    results: dict = {"data": args.data}

    # --- data -------------------------------------------------------------------------
    train = load_dataset(args.data, "train", seed=args.seed)
    test = load_dataset(args.data, "test", seed=args.seed)
    if args.smoke:
        test.x, test.y = test.x[:100], test.y[:100]
    levels, shape = train.levels, tuple(train.event_shape)
    D = math.prod(shape)
    gen = torch.Generator().manual_seed(args.seed)
    x_test = binarize(test.x, levels, torch.Generator().manual_seed(10_000 + args.seed))  # fixed
    print(f"{args.data}: {len(train)} train / {len(test.x)} test images {shape}, binarised")

    # --- 1. an auto-encoder -------------------------------------------------------------
    # A plain torch model: encoder 64 -> 256 -> 2, decoder 2 -> 256 -> 64, trained with the
    # binary cross-entropy of the reconstruction.
    h = cfg["hidden"][0]
    ae = nn.Sequential(nn.Flatten(), nn.Linear(D, h), nn.ReLU(), nn.Linear(h, cfg["z_dim"]),
                       nn.Linear(cfg["z_dim"], h), nn.ReLU(), nn.Linear(h, D))
    opt = torch.optim.Adam(ae.parameters(), lr=cfg["lr"])
    batches = minibatches(len(train), cfg["batch_size"], gen)
    for _ in range(args.steps):
        xb = binarize(train.x[next(batches)], levels, gen).reshape(-1, D)
        loss = nn.functional.binary_cross_entropy_with_logits(ae(xb), xb, reduction="sum") / len(xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ae_bce = float(nn.functional.binary_cross_entropy_with_logits(
            ae(x_test), x_test.reshape(-1, D), reduction="sum")) / len(x_test)
    print(f"auto-encoder: test reconstruction cross-entropy {ae_bce:.2f} nats/image "
          f"(a reconstruction, not a likelihood: no prior, no bound on log p(x))")
    results["autoencoder_bce"] = ae_bce

    # --- 2. the VAE, trained with SVI ----------------------------------------------------
    # size=len(train) tells the data plate that each minibatch stands for the whole
    # training set: the loss is scaled by N / batch, an unbiased estimate of the full ELBO.
    vae = VAE(shape, cfg["z_dim"], hidden_dims=cfg["hidden"])
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": cfg["lr"]}), TraceMeanField_ELBO())
    for step in range(1, args.steps + 1):
        xb = binarize(train.x[next(batches)], levels, gen)  # dynamic binarisation
        loss = svi.step(xb, size=len(train))
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:5d}  -ELBO per image {loss / len(train):8.3f} nats")

    # --- 3. the ELBO by hand, next to Pyro's ---------------------------------------------
    # Fix one draw of z by seeding: the guide is the only random step, so the same seed
    # gives the same z to Pyro and to the formula.
    x = x_test[:16]
    pyro.set_rng_seed(123)
    pyro_loss = TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(123)
    z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"].detach()
    with torch.no_grad():
        mu, sigma, _ = vae.encoder(x)
        logits = vae.decoder(z)
    log_lik = -nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    kl_closed = 0.5 * (sigma**2 + mu**2 - torch.log(sigma**2) - 1).sum(-1)
    hand = float((log_lik - kl_closed).sum())
    print(f"ELBO of 16 test images, one draw: by hand {hand:.4f}, Pyro's TraceMeanField_ELBO "
          f"{-pyro_loss:.4f}")
    # the KL by Monte Carlo, log q(z|x) - log p(z) averaged over draws, against the formula
    with torch.no_grad():
        q = vae.posterior(x)
        zs = q.sample((2000,))
        kl_mc = (q.log_prob(zs) - vae.prior(zs.shape[:-1]).log_prob(zs)).mean(0)
    print(f"KL(q||p) of one image: closed form {float(kl_closed[0]):.4f}, Monte Carlo "
          f"(2000 draws) {float(kl_mc[0]):.4f}")
    # Trace_ELBO estimates the same number with a Monte Carlo KL: equal in expectation
    m = 50 if args.smoke else 500
    tr = np.mean([Trace_ELBO().loss(vae.model, vae.guide, x) for _ in range(m)])
    tmf = np.mean([TraceMeanField_ELBO().loss(vae.model, vae.guide, x) for _ in range(m)])
    print(f"mean over {m} draws: Trace_ELBO {-tr:.3f}, TraceMeanField_ELBO {-tmf:.3f}")
    results.update(elbo_by_hand=hand, elbo_pyro=-pyro_loss, kl_closed_form=float(kl_closed[0]),
                   kl_monte_carlo=float(kl_mc[0]), trace_elbo_mean=-float(tr),
                   meanfield_elbo_mean=-float(tmf))

    # --- 4. test ELBO and IWAE log-likelihood --------------------------------------------
    torch.manual_seed(0)
    elbo = float(vae.elbo(x_test, num_particles=10).mean())
    iwae = float(vae.iwae_log_likelihood(x_test, num_samples=cfg["k"]).mean())
    print(f"test: ELBO {elbo:.3f}, IWAE (K={cfg['k']}) {iwae:.3f} nats/image; the gap "
          f"{iwae - elbo:.3f} is at least part of KL(q(z|x) || p(z|x))")
    results.update(test_elbo=elbo, test_iwae=iwae, iwae_k=cfg["k"])

    # --- 5. pictures ---------------------------------------------------------------------
    save_image_grid(vae.sample(64, mean=True), args.out / "samples.png", title="VAE samples (decoder means)")
    rec = vae.reconstruct(x_test[:32])
    pairs = torch.stack([x_test[:32].reshape(4, 8, *shape), rec.reshape(4, 8, *shape)], 1).reshape(-1, *shape)
    save_image_grid(pairs, args.out / "reconstructions.png", ncol=8, title="test images and reconstructions")
    save_latent_scatter(vae.encode(x_test), args.out / "latent.png", test.y, title="posterior means")
    print(f"pictures in {args.out}")

    # --- 6. a linear VAE finds the PCA subspace ------------------------------------------
    # hidden_dims=() makes encoder and decoder linear; with a Gaussian likelihood the model
    # is probabilistic PCA (Tipping & Bishop 1999): at the optimum the decoder's columns
    # span the top principal subspace of the data. Principal angles measure it.
    k = 4
    xi = intensities(train.x[:1000], levels).reshape(-1, D)
    lin = VAE(D, k, hidden_dims=(), likelihood="gaussian", name="linear")
    svi = SVI(lin.model, lin.guide, pyro.optim.Adam({"lr": 0.02}), TraceMeanField_ELBO())
    for _ in range(cfg["pca_steps"]):
        svi.step(xi)
    w = lin.decoder.head[0].weight.detach().double().numpy()
    data = xi.double().numpy()
    _, _, vt = np.linalg.svd(data - data.mean(0), full_matrices=False)
    qa, qb = np.linalg.qr(w)[0], np.linalg.qr(vt[:k].T)[0]
    angles = np.degrees(np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), -1, 1)))
    print(f"linear VAE vs PCA: principal angles between the subspaces {np.round(angles, 1)} degrees")
    results["pca_angles_deg"] = [float(a) for a in angles]

    report(args, results)
    return results


if __name__ == "__main__":
    main()
