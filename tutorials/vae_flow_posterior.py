"""Richer posteriors for a VAE: Gaussian against NICE and RealNVP flows, and how much of
the ELBO's gap each closes.

    python tutorials/vae_flow_posterior.py              # scikit-learn digits, a few minutes
    python tutorials/vae_flow_posterior.py --smoke      # seconds: checks that everything runs

Three VAEs with the same encoder, decoder, data and training budget differ only in the
guide: the encoder's diagonal Gaussian, or that Gaussian pushed through conditional NICE
or RealNVP couplings. It prints each model's test ELBO and IWAE log-likelihood, the gap
between them, and how much of the Gaussian posterior's gap each flow closes; it writes
OUT/gaps.png (the numbers) and OUT/posteriors.png: for one test image, the true posterior
p(z | x) of a 2-D latent on a grid next to each guide's q(z | x).

References: Rezende, Mohamed (2015), Variational inference with normalizing flows,
arXiv:1505.05770; Kingma et al. (2016), Improved variational inference with inverse
autoregressive flow, arXiv:1606.04934; Burda, Grosse, Salakhutdinov (2016),
arXiv:1509.00519.
"""

# ---------------------------------------------------------------------------------------
# 1. The gap, and who pays it
#
# log p(x) - ELBO(x) = KL(q(z | x) || p(z | x)). A diagonal Gaussian q cannot follow a
# posterior that is skewed, curved or correlated; the gap is then the price of the guide,
# and training pays it twice: the bound is looser, and the decoder is pushed towards
# models whose posteriors a Gaussian can fit.
#
# 2. An amortised flow posterior
#
# Draw z0 ~ N(mu(x), sigma(x)^2) as before, then z = T_h(z0) through couplings whose
# conditioners see the encoder's features h(x) as well as half of z (conditional NICE:
# shifts; conditional RealNVP: shifts and scales). The density stays exact by the change
# of variables,
#
#     log q(z | x) = log N(z0; mu, sigma^2) - log |det dT_h / dz0|,
#
# so the ELBO stays a proper bound. The couplings start at the identity: every flow VAE
# starts as the Gaussian one. The conditional flow is a submodule of the VAE, registered
# with pyro.module in the guide, so SVI trains its parameters with everything else.
#
# 3. Measuring
#
# IWAE with K samples estimates log p(x) from below, tighter as K grows. For each model:
# gap = IWAE - ELBO (about KL(q || p(z|x)) averaged over test images: how far its own
# guide is from its own posterior), and closed = 1 - gap_flow / gap_gauss: the share of the
# Gaussian posterior's gap that the flow posterior closes. A flow can also buy a better
# decoder (the model is trained against a tighter bound): compare the IWAE columns.
#
# 4. Where the gap sits, and what to change
#
# gap_decomposition (Cremer, Li, Duvenaud 2018, arXiv:1801.03558) splits each test image's
# gap log p(x) - ELBO into
#
#     approximation gap = log p(x) - ELBO(best q of the family for this x)
#     amortisation gap  = ELBO(best q of the family) - ELBO(the encoder's q)
#
# by optimising a posterior for every image on its own (the decoder frozen), and also
# reports a per-example RealNVP optimised the same way ("flexible"): what a much richer
# family would reach. What to change follows from which term is large:
#
#   * amortisation gap the larger: the encoder is the limit. A wider or longer-trained
#     encoder, or refining q per example at test time, helps; a richer family does not
#     by itself (it helps only insofar as it makes the encoder generalise).
#   * approximation gap the larger, and the flexible posterior closes most of it: the
#     family is the limit: a flow posterior (posterior_flow="realnvp") helps.
#   * both small: inference is not the problem. The room left is in the model itself,
#     log p(x): a flow prior (prior_flow="realnvp"), a larger decoder, longer training.
# ---------------------------------------------------------------------------------------

from __future__ import annotations

import matplotlib
import pyro
import torch
from _common import parser, report, setup
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_genext.data import binarize, load_dataset
from pyro_genext.models import VAE, gap_decomposition

FULL = dict(hidden=(256,), z_dim=2, num_flows=4, flow_hidden=(64, 64), batch_size=64, lr=2e-3,
            steps=6000, k=2000, grid=120, gap_examples=100, gap_steps=300)
SMOKE = dict(hidden=(32,), z_dim=2, num_flows=2, flow_hidden=(16,), batch_size=64, lr=3e-3,
             steps=40, k=20, grid=40, gap_examples=8, gap_steps=10)
POSTERIORS = (None, "nice", "realnvp")


def main(argv: list[str] | None = None) -> dict:
    args = parser("vae_flow_posterior", __doc__, ["digits", "fashion-mnist"], "digits").parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    setup(args, SMOKE["steps"], cfg["steps"])

    train = load_dataset(args.data, "train", seed=args.seed)
    test = load_dataset(args.data, "test", seed=args.seed)
    if args.smoke:
        test.x = test.x[:60]
    levels, shape = train.levels, tuple(train.event_shape)
    x_test = binarize(test.x, levels, torch.Generator().manual_seed(10_000 + args.seed))  # fixed

    models, rows = {}, {}
    for flow in POSTERIORS:
        label = flow or "gaussian"
        pyro.set_rng_seed(args.seed)  # the same initial encoder and decoder for all three
        vae = VAE(shape, cfg["z_dim"], hidden_dims=cfg["hidden"], posterior_flow=flow,
                  num_flows=cfg["num_flows"], flow_hidden_dims=cfg["flow_hidden"], name=label)
        # the closed-form KL where there is one; a flow posterior needs the Monte Carlo KL
        elbo = TraceMeanField_ELBO() if flow is None else Trace_ELBO()
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": cfg["lr"]}), elbo)
        gen = torch.Generator().manual_seed(args.seed)  # the same minibatches and binarisations
        for _ in range(args.steps):
            idx = torch.randint(0, len(train), (cfg["batch_size"],), generator=gen)
            svi.step(binarize(train.x[idx], levels, gen), size=len(train))
        torch.manual_seed(0)
        e = float(vae.elbo(x_test, num_particles=10).mean())
        w = float(vae.iwae_log_likelihood(x_test, num_samples=cfg["k"]).mean())
        rows[label] = {"elbo": e, "iwae": w, "gap": w - e,
                       "params": sum(p.numel() for p in vae.parameters())}
        models[label] = vae
        print(f"{label:9s} test ELBO {e:8.3f}  IWAE(K={cfg['k']}) {w:8.3f}  gap {w - e:6.3f} nats/image")
    g = rows["gaussian"]
    for label in ("nice", "realnvp"):
        rows[label]["closed"] = 1 - rows[label]["gap"] / g["gap"]
        print(f"{label}: closes {rows[label]['closed']:.0%} of the Gaussian posterior's gap")

    # --- where the gap sits ------------------------------------------------------------------
    for label in ("gaussian", "realnvp"):
        gaps = gap_decomposition(models[label], x_test[: cfg["gap_examples"]], num_samples=cfg["k"],
                                 steps=cfg["gap_steps"])
        s = gaps.summary()
        rows[label]["decomposition"] = s
        print(f"{label}: on {s['num_examples']} test images, log p(x) {s['log_px']:.3f}; gap "
              f"{s['total_gap']:.3f} = approximation {s['approximation_gap']:.3f} + amortisation "
              f"{s['amortisation_gap']:.3f}; a per-example flow would leave {s['flexible_gap']:.3f}")
        print(f"  -> {advice(s)}")

    # --- pictures -------------------------------------------------------------------------
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(rows)
    ax.bar([i - 0.2 for i in range(3)], [rows[n]["elbo"] for n in names], 0.4, label="ELBO")
    ax.bar([i + 0.2 for i in range(3)], [rows[n]["iwae"] for n in names], 0.4, label=f"IWAE K={cfg['k']}")
    lo = min(rows[n]["elbo"] for n in names)
    hi = max(rows[n]["iwae"] for n in names)
    ax.set_ylim(lo - 0.5 * (hi - lo + 0.1), hi + 0.2 * (hi - lo + 0.1))
    ax.set_xticks(range(3), names)
    ax.set_ylabel("nats per test image")
    ax.legend()
    fig.savefig(args.out / "gaps.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    # For one test image: p(z | x) proportional to p(x | z) p(z) on a grid, under each
    # model's decoder, next to that model's q(z | x).
    x1 = x_test[:1]
    n = cfg["grid"]
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.5))
    for j, label in enumerate(names):
        vae = models[label]
        with torch.no_grad():
            c = vae.encode(x1)[0]
            r = 3 * float(vae.posterior(x1).sample((500,)).std(0).max()) + 1e-3
            g1 = torch.linspace(-r, r, n)
            zz = torch.stack(torch.meshgrid(c[0] + g1, c[1] + g1, indexing="xy"), -1).reshape(-1, 2)
            xs = x1.expand(len(zz), *shape)
            log_joint = vae.prior(zz.shape[:-1]).log_prob(zz) + vae.likelihood_dist(zz).log_prob(xs)
            log_q = vae.posterior(xs).log_prob(zz)
        extent = (float(c[0] - r), float(c[0] + r), float(c[1] - r), float(c[1] + r))
        for i, (v, title) in enumerate([(log_joint, f"{label}: true p(z|x)"), (log_q, f"{label}: q(z|x)")]):
            dens = (v - v.max()).exp().reshape(n, n)
            axes[i, j].imshow(dens.numpy(), origin="lower", extent=extent, cmap="viridis", aspect="auto")
            axes[i, j].set_title(title)
    fig.tight_layout()
    fig.savefig(args.out / "posteriors.png", dpi=100)
    plt.close(fig)
    print(f"pictures in {args.out}")

    report(args, {"data": args.data, "iwae_k": cfg["k"], "z_dim": cfg["z_dim"], **rows})
    return rows


def advice(s: dict) -> str:
    """What to change, from a gap decomposition's summary (section 4 above)."""
    approx, amort, flex = s["approximation_gap"], s["amortisation_gap"], s["flexible_gap"]
    if approx + amort < 0.1:  # nats per image
        return "both gaps are small: inference is fine; a flow prior or a larger decoder raises log p(x)"
    if amort >= approx:
        return "the encoder is the limit: a larger or longer-trained encoder, or per-example refinement"
    if flex < 0.5 * approx:
        return "the posterior family is the limit: a flow posterior (posterior_flow='realnvp') helps"
    return "even a per-example flow leaves most of the gap: optimise longer, or raise K for log p(x)"


if __name__ == "__main__":
    main()
