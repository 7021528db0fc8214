"""NICE against RealNVP on 2-D toy densities, with pictures of what each learnt.

    python tutorials/density_2d.py                      # moons, 8gaussians, checkerboard
    python tutorials/density_2d.py --data all           # all five toy densities
    python tutorials/density_2d.py --data rings spirals
    python tutorials/density_2d.py --smoke              # seconds: checks that everything runs

For each data set it fits both flows by maximum likelihood, prints their average test
log-likelihood, and writes OUT/densities.png: one row per data set, the data next to a
heat map of each model's density exp(log p(x)) on a grid.

Read tutorials/nice.py first for couplings and the SVI loop.
"""

# ---------------------------------------------------------------------------------------
# Why 2-D toys? You can *see* the density, and the failures of a model are plain.
#
# The data here are continuous points, not pixels: no dequantization, no levels, and the
# score is the average log-likelihood log p(x) in nats per point (higher is better). The
# baseline is the best Gaussian (the training data's mean and covariance): a flow that
# does not beat it has learnt nothing a Gaussian could not.
#
# NICE against RealNVP. In 2-D a coupling layer transforms one coordinate given the other:
#
#     NICE      y2 = x2 + t(x1)                    log|det J| = 0
#     RealNVP   y2 = (x2 - t(x1)) * exp(s(x1))     log|det J| = s(x1)
#
# NICE's couplings preserve area, and its only other layer scales each axis by a constant.
# So its density is p(x) = c * p_Z(f^-1(x)): the base density, moved around without ever
# being compressed in one place and stretched in another. One consequence: every region
# {x : p(x) > t} is the image of a disc {z : p_Z(z) > t / c}, a single connected blob, so
# NICE cannot make two separate peaks with a valley between them. RealNVP's couplings
# scale space by exp(s(x1)), differently in different places, and can.
#
# What to look for in densities.png:
# * moons, spirals, checkerboard: NICE bends and shears its one blob along the data
#   (checkerboard shows the shears as stripes); RealNVP follows the data more closely.
# * 8gaussians, rings: NICE starts stuck. Every coupling starts as the identity (its last
#   layer is zero), and for data symmetric under x2 -> -x2 the likelihood gradient of a
#   shift t(x1) is proportional to E[x2 h(x1)] = 0 there (h the network's last hidden
#   layer): a stationary point that only minibatch noise moves it from. It may stay the
#   Gaussian it starts as (rings, usually), or escape and fold its blob into stripes
#   through the modes, still one connected region with mass between them (8gaussians).
#   RealNVP's scale s(x1) gets a real gradient whenever the spread of x2 depends on x1,
#   as it does here, so it leaves at once, and on 8gaussians it finds the eight modes.
# ---------------------------------------------------------------------------------------

from __future__ import annotations

import torch
from _common import parser, report, setup

from pyro_genext.data import TOY_DENSITIES, load_dataset
from pyro_genext.training import TrainConfig, density_from_checkpoint, load_checkpoint, train

MODELS = ("nice", "realnvp")
# NICE: 4 additive couplings plus the scaling layer; RealNVP: 8 affine couplings, each
# followed by an actnorm (a learned per-coordinate scale and shift; the recipe's default).
# Both with conditioners of two hidden layers of `hidden` units, a normal base.
FULL = dict(hidden=64, batch_size=256, lr=3e-3, steps=2000, grid=200)
SMOKE = dict(hidden=16, batch_size=256, lr=3e-3, steps=20, grid=40)
LIM = 3.0  # the pictures show [-LIM, LIM]^2; the toy densities live inside about [-3, 3]^2


def fit(name: str, model: str, args, s: dict):
    """Train one flow on one toy density; return the model chosen on validation data."""
    cfg = TrainConfig(model=model, data=name, steps=args.steps, batch_size=s["batch_size"],
                      lr=s["lr"], seed=args.seed, hidden=s["hidden"])
    ckpt = args.out / "checkpoints" / f"{name}-{model}"
    train(cfg, ckpt, progress=False, log=lambda line: None)
    density, _, _ = density_from_checkpoint(load_checkpoint(ckpt / "best.pt"))
    return density


def density_on_grid(density, n: int) -> torch.Tensor:
    """exp(log p) on an n x n grid over [-LIM, LIM]^2, rows from bottom (y = -LIM) up."""
    g = torch.linspace(-LIM, LIM, n)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)
    with torch.no_grad():
        return density.log_prob(points).exp().reshape(n, n)


def gaussian_baseline(name: str, seed: int, test: torch.Tensor) -> float:
    """Average test log-likelihood of the Gaussian with the training data's mean and
    covariance."""
    x = load_dataset(name, "train", seed=seed).x
    gauss = torch.distributions.MultivariateNormal(x.mean(0), covariance_matrix=torch.cov(x.T))
    return float(gauss.log_prob(test).mean())


def main(argv: list[str] | None = None) -> dict:
    args = parser("density_2d", __doc__, list(TOY_DENSITIES),
                  ["moons", "8gaussians", "checkerboard"]).parse_args(argv)
    names = list(TOY_DENSITIES) if "all" in args.data else list(dict.fromkeys(args.data))
    s = SMOKE if args.smoke else FULL
    setup(args, SMOKE["steps"], s["steps"])

    import matplotlib

    matplotlib.use("Agg")  # draw to files only: no window, no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 3, figsize=(9, 3 * len(names)), squeeze=False)
    results: dict[str, dict[str, float]] = {}
    for row, name in enumerate(names):
        test = load_dataset(name, "test", seed=args.seed)
        # the data: a 2-D histogram of the test points, as the "true" picture
        ax = axes[row][0]
        ax.hist2d(test.x[:, 0].numpy(), test.x[:, 1].numpy(), bins=s["grid"] // 2,
                  range=[[-LIM, LIM], [-LIM, LIM]], cmap="viridis")
        ax.set_title(f"{name}: test data")
        results[name] = {"gaussian": gaussian_baseline(name, args.seed, test.x)}
        print(f"{name:>12}  {'gaussian':<8} test log-likelihood {results[name]['gaussian']:7.3f} nats/point")
        for col, model in enumerate(MODELS, start=1):
            density = fit(name, model, args, s)
            # log_prob of continuous data is already the whole story: average it over the
            # test points (nats per point; higher is better).
            with torch.no_grad():
                test_ll = float(density.log_prob(test.x).mean())
            results[name][model] = test_ll
            print(f"{name:>12}  {model:<8} test log-likelihood {test_ll:7.3f} nats/point")
            ax = axes[row][col]
            ax.imshow(density_on_grid(density, s["grid"]).numpy(), origin="lower",
                      extent=(-LIM, LIM, -LIM, LIM), cmap="viridis")
            ax.set_title(f"{'NICE' if model == 'nice' else 'RealNVP'}: {test_ll:.2f} nats")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = args.out / "densities.png"
    fig.savefig(path, dpi=60 if len(names) > 3 else 70)
    plt.close(fig)
    print(f"pictures written to {path}")

    report(args, {"data": names, "test_loglik": results})
    return results


if __name__ == "__main__":
    main()
