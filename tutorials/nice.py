"""NICE, as the paper built it, trained with Pyro's SVI on handwritten digits.

    python tutorials/nice.py                       # scikit-learn digits, 64-D, about 20 s
    python tutorials/nice.py --smoke               # seconds: checks that everything runs
    python tutorials/nice.py --data fashion-mnist  # 784-D, much slower on a CPU

It prints the test bits/dim of the model chosen on validation data and writes a grid of
samples to OUT/samples.png.

Reference: Dinh, Krueger, Bengio (2014), NICE: Non-linear Independent Components
Estimation, arXiv:1410.8516.
"""

# ---------------------------------------------------------------------------------------
# 1. What a normalizing flow is
#
# A flow is an invertible map f (a "bijector") from a simple base variable z to the data
# x = f(z). Because f is invertible, the density of x follows from the change of variables
#
#     log p(x) = log p_Z(f^-1(x)) + log |det d f^-1(x) / dx|,
#
# so a flow can be trained by plain maximum likelihood: no bound, no approximation.
# In pyro_genext (as in torch's TransformedDistribution) the forward direction is
# base -> data: sampling calls f, scoring calls f^-1. The whole game is to build an f
# that is (a) flexible, (b) cheap to invert and (c) has a cheap Jacobian determinant.
#
# 2. The coupling layer: NICE's answer
#
# Split the coordinates of x into two parts, A and B. An *additive coupling* leaves A
# alone and shifts B by any function m of A:
#
#     y_A = x_A,    y_B = x_B + m(x_A)          inverse:  x_B = y_B - m(y_A)
#
# m can be any neural network (it is never inverted: y_A = x_A is known on both sides),
# and the Jacobian is triangular with ones on its diagonal, so log|det J| = 0. The price
# is that one layer leaves half the coordinates untouched, so layers alternate which half
# is transformed. NICE used four such layers, splitting even and odd coordinates
# (mask="alternating").
#
# 3. The scaling layer
#
# Additive couplings preserve volume: they cannot make the density more concentrated
# anywhere. NICE ends (on the base side) with a diagonal scaling y = exp(s) * x, a learnt
# s per dimension, whose log|det J| = sum(s). In the trained model, exp(s_i) tells how much
# dimension i matters; the paper reads it as a kind of PCA spectrum.
#
# 4. The prior
#
# NICE's base distribution is a standard logistic per dimension (its heavier tails give
# better-behaved gradients than a Gaussian's): log p(z) = -z - 2 softplus(-z).
#
# 5. Dequantization and bits/dim
#
# Pixels are integers (17 grey levels 0..16 in scikit-learn's digits, 256 in Fashion-MNIST).
# A density over real numbers could put arbitrarily high density on those integers and
# reach an unbounded "likelihood". Dequantization adds uniform noise u ~ U[0, 1) to every
# pixel: the model sees x + u in [0, L)^D, each level owning a bin of width 1, and the
# density of x + u, averaged over u, bounds the probability of the discrete image from
# below (Theis et al. 2016). FlowDensity.model adds that noise in training mode.
#
# On that scale, the negative log-likelihood in *bits per dimension*,
#
#     bpd = -log p(x + u) / (D ln 2),
#
# is the number of bits an ideal coder would need per pixel. Storing each pixel raw costs
# log2(L) bits: 4.09 for 17 levels, 8 for 256. Anything below that has learnt something.
# NICE modelled the data scaled to [0, 1) (alpha=None below: a plain division by L); the
# density model adds that division's log-Jacobian, so the number is on the data scale and
# comparable with papers.
# ---------------------------------------------------------------------------------------

from __future__ import annotations

import copy
import math

import pyro
import torch
from _common import parser, report, setup
from pyro.infer import SVI, Trace_ELBO

import pyro_genext
from pyro_genext.data import load_dataset
from pyro_genext.models import FlowDensity
from pyro_genext.plots import save_samples
from pyro_genext.training import evaluate

# Settings. Full mode on digits trains for about 20 s on one thread; the digits set
# is small (1438 training images), so a small conditioner generalises best.
FULL = {
    "digits": dict(hidden=(64, 64), batch_size=64, lr=3e-3, eval_every=100, steps=4000),
    "fashion-mnist": dict(hidden=(256, 256), batch_size=100, lr=1e-3, eval_every=250, steps=3000),
}
SMOKE = dict(hidden=(16, 16), batch_size=64, lr=3e-3, eval_every=10, steps=30)


def main(argv: list[str] | None = None) -> dict:
    args = parser("nice", __doc__, ["digits", "fashion-mnist"], "digits").parse_args(argv)
    cfg = SMOKE if args.smoke else FULL[args.data]
    setup(args, SMOKE["steps"], cfg["steps"])

    # --- data --------------------------------------------------------------------------
    # Images come as (N, 1, H, W) tensors of integer levels stored as floats. NICE is a
    # model of vectors: flatten each image into D = H * W numbers.
    train, val, test = (load_dataset(args.data, s, seed=args.seed) for s in ("train", "val", "test"))
    if args.smoke:  # a quick check needs only a little validation and test data
        val.x, test.x = val.x[:100], test.x[:100]
    D = math.prod(train.event_shape)
    x_train = train.x.reshape(len(train), D)
    x_val, x_test = val.x.reshape(-1, D), test.x.reshape(-1, D)
    print(f"{args.data}: {len(train)} train / {len(val.x)} val / {len(test.x)} test images, "
          f"D = {D}, {train.levels} levels (raw storage: {math.log2(train.levels):.2f} bits/dim)")

    # --- the model -------------------------------------------------------------------
    # nice() stacks the diagonal scaling layer (base side) and four additive couplings
    # with even/odd splits. FlowDensity wraps the bijector into a Pyro model of the data:
    # logistic base, data scaled by the number of levels, uniform dequantization.
    flow = pyro_genext.nice(D, num_layers=4, mask="alternating", hidden_dims=cfg["hidden"])
    density = FlowDensity(flow, levels=train.levels, base="logistic", alpha=None)
    num_params = sum(p.numel() for p in density.parameters())
    print(f"NICE: 4 additive couplings, conditioners {cfg['hidden']}, {num_params:,} parameters")

    # --- training with SVI ------------------------------------------------------------
    # Pyro fits models by stochastic variational inference: maximise the ELBO
    #   E_q[log p(x, latents) - log q(latents)].
    # FlowDensity has no latent sites and an empty guide, so the ELBO is exactly the
    # log-likelihood of the (dequantized) batch, and SVI is maximum likelihood.
    # svi.step(x) runs model and guide, differentiates, takes one optimiser step on every
    # parameter registered with pyro.param (model() registers the flow's), and returns the
    # loss, -ELBO, in nats summed over the batch.
    # ClippedAdam is Adam that first clamps every gradient *element* to
    # [-clip_norm, clip_norm] (despite its name, not the norm), a cheap insurance against
    # a rare huge gradient; it can also decay the learning rate (lrd, off here).
    optim = pyro.optim.ClippedAdam({"lr": cfg["lr"], "clip_norm": 10.0})
    svi = SVI(density.model, density.guide, optim, Trace_ELBO())

    # Validation selection: the test set is scored once, with the parameters that did best
    # on validation data. evaluate() reports bits/dim with one seeded dequantization draw.
    best = {"val_bpd": math.inf, "step": 0, "state": copy.deepcopy(density.state_dict())}
    gen = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(x_train), generator=gen), 0
    for step in range(1, args.steps + 1):
        if pos + cfg["batch_size"] > len(x_train):  # a new epoch: reshuffle
            order, pos = torch.randperm(len(x_train), generator=gen), 0
        batch = x_train[order[pos : pos + cfg["batch_size"]]]
        pos += cfg["batch_size"]
        loss = svi.step(batch)
        if not math.isfinite(loss):
            raise FloatingPointError(f"the loss is {loss} at step {step}")
        if step % cfg["eval_every"] == 0 or step == args.steps:
            train_bpd = loss / (len(batch) * D * math.log(2))  # nats per batch -> bits/dim
            val_bpd = evaluate(density, x_val)  # switches to eval mode and back
            if val_bpd < best["val_bpd"]:
                best = {"val_bpd": val_bpd, "step": step, "state": copy.deepcopy(density.state_dict())}
            print(f"step {step:5d}  train batch {train_bpd:.3f}  val {val_bpd:.3f} bits/dim"
                  + ("  (best)" if best["step"] == step else ""))

    # --- results ----------------------------------------------------------------------
    density.load_state_dict(best["state"])
    density.eval()
    test_bpd = evaluate(density, x_test)
    # The scaling layer's exp(s): which dimensions the model treats as important.
    scales = flow[0].log_scale.detach().exp()
    print(f"best validation at step {best['step']}; scaling layer exp(s) ranges "
          f"{float(scales.min()):.3g} .. {float(scales.max()):.3g}")

    # Sampling runs the flow forward: z from the logistic base, x = f(z), rounded down to
    # levels. save_samples reshapes the 64-D vectors back into 8x8 images for the grid.
    save_samples(density, test, 64, args.out / "samples.png")
    print(f"samples written to {args.out / 'samples.png'}")

    results = {
        "data": args.data,
        "test_bpd": test_bpd,
        "best_val_bpd": best["val_bpd"],
        "best_step": best["step"],
        "raw_bpd": math.log2(train.levels),
        "num_params": num_params,
    }
    report(args, results)
    return results


if __name__ == "__main__":
    main()
