"""Multi-scale RealNVP on images: bits/dim, samples, and exact encoding and decoding.

    python tutorials/realnvp.py                       # scikit-learn digits (1, 8, 8), about 3 minutes
    python tutorials/realnvp.py --smoke               # seconds: checks that everything runs
    python tutorials/realnvp.py --data fashion-mnist  # (1, 28, 28): hours on a CPU, mind the budget

It prints the test bits/dim of the checkpoint chosen on validation data, encodes test
images to their latents z = f^-1(x) and decodes them back (printing the largest
reconstruction error), and writes a grid of samples to OUT/samples.png.

Read tutorials/nice.py first: it explains couplings, dequantization and bits/dim, and
writes the SVI loop out. Here the packaged loop, pyro_genext.training.train, does the
same work and adds checkpoints.

Reference: Dinh, Sohl-Dickstein, Bengio (2016), Density estimation using Real NVP,
arXiv:1605.08803.
"""

# ---------------------------------------------------------------------------------------
# 1. From NICE to RealNVP: the affine coupling
#
# NICE's coupling shifts half the coordinates, y_B = x_B + t(x_A), and preserves volume.
# RealNVP also scales them; the paper writes it from data x to latent y:
#
#     y_A = x_A,    y_B = x_B * exp(s(x_A)) + t(x_A),     log|det dy/dx| = sum_B s(x_A),
#
# still trivially invertible (x_B = (y_B - t(y_A)) * exp(-s(y_A))) and with a triangular
# Jacobian, but now every layer can expand or contract space where the data need it.
# pyro_genext scores (data -> base) with this scale-then-shift form and samples with its
# inverse. Here the log-scale is bounded, s = 2 tanh(s~ / 2), so that no single layer can
# blow up.
#
# 2. Couplings on images: two kinds of masks
#
# An image (C, H, W) is split either by a *checkerboard* (pixels with h + w even condition
# the others: every transformed pixel sees its four neighbours) or *channel-wise* (the
# first half of the channels conditions the second). The conditioners s and t are small
# convolutional ResNets, so the model is built for images, not for flat vectors.
#
# 3. The multi-scale architecture (scoring direction, data -> latent, for a 1x8x8 digit)
#
#   scale 1   (1, 8, 8)  3 checkerboard couplings
#             squeeze -> (4, 4, 4): each 2x2 block of pixels becomes 4 channels
#             3 channel-wise couplings
#             factor out: 2 of the 4 channels are final latents; the other 2 go on
#   scale 2   (2, 4, 4)  3 checkerboard couplings, squeeze -> (8, 2, 2),
#             3 channel-wise couplings, factor out 4 channels
#   scale 3   (4, 2, 2)  4 checkerboard couplings
#
# Squeezing trades space for channels, so later layers see wider context cheaply;
# factoring out sends half the dimensions to the base distribution early, so the deep
# layers work on ever fewer numbers (cost) and the latents form a hierarchy from fine
# detail (factored out first) to coarse structure (last). The factored-out latents pass
# through the remaining layers unchanged and are put back where they came from, so the
# whole flow is one bijector and z has the shape of x: (1, 8, 8). Each coupling is
# followed by an ActNorm layer (a learnt per-channel affine map), which keeps the
# activations' scale in check as the flow deepens.
#
# 4. Pre-processing: data -> logits
#
# RealNVP does not model pixels in [0, L) directly but their logits,
# h = logit(alpha + (1 - 2 alpha) x / L) with alpha = 0.05, which spreads the bounded data
# over the real line where an unbounded Gaussian base lives. FlowDensity(levels=L) puts
# that map (and its log-Jacobian) after the flow, so log_prob and bits/dim are on the
# data scale, comparable with papers and with tutorials/nice.py.
# ---------------------------------------------------------------------------------------

from __future__ import annotations

import math

import torch
from _common import parser, report, setup

from pyro_genext.data import load_dataset
from pyro_genext.plots import save_samples
from pyro_genext.training import TrainConfig, density_from_checkpoint, evaluate, load_checkpoint, train

# Settings. hidden is the width (channels) of the ResNet conditioners. The defaults of the
# paper (64 channels, 8 blocks) are far beyond a CPU budget; these learn digits in minutes.
FULL = {
    "digits": dict(hidden=32, num_blocks=1, batch_size=64, lr=1e-3, steps=2000),
    "fashion-mnist": dict(hidden=32, num_blocks=2, batch_size=64, lr=1e-3, steps=20000),
}
SMOKE = dict(hidden=4, num_blocks=1, batch_size=64, lr=1e-3, steps=6)


def main(argv: list[str] | None = None) -> dict:
    args = parser("realnvp", __doc__, ["digits", "fashion-mnist"], "digits").parse_args(argv)
    s = SMOKE if args.smoke else FULL[args.data]
    setup(args, SMOKE["steps"], s["steps"])

    # --- training ----------------------------------------------------------------------
    # train() builds realnvp(event_shape, hidden_channels=hidden, num_blocks=...) inside a
    # FlowDensity(levels=L) with a standard normal base, and runs the same SVI loop as
    # tutorials/nice.py with ClippedAdam. After every epoch it scores the validation split
    # and writes checkpoints: best.pt (the best validation bits/dim so far) and last.pt.
    cfg = TrainConfig(model="realnvp", data=args.data, steps=args.steps, batch_size=s["batch_size"],
                      lr=s["lr"], seed=args.seed, hidden=s["hidden"], num_blocks=s["num_blocks"])
    ckpt = args.out / "checkpoints"
    summary = train(cfg, ckpt, progress=False, log=print)

    # The model to report is the one chosen on validation data, rebuilt from best.pt.
    density, _, _ = density_from_checkpoint(load_checkpoint(ckpt / "best.pt"))
    num_params = sum(p.numel() for p in density.parameters())
    print(f"RealNVP: {num_params:,} parameters; best validation "
          f"{summary['best_val_bpd']:.4f} bits/dim")

    # --- test bits/dim -----------------------------------------------------------------
    test = load_dataset(args.data, "test", seed=args.seed)
    if args.smoke:
        test.x = test.x[:100]
    test_bpd = evaluate(density, test.x)
    print(f"test: {test_bpd:.4f} bits/dim over {len(test.x)} images "
          f"(raw storage: {math.log2(test.levels):.2f})")

    # --- exact encoding and decoding ---------------------------------------------------
    # Unlike a VAE, a flow has an exact, deterministic encoder: z = f^-1(x) runs the flow
    # backwards (the same pass as scoring), and decode(z) = f(z) gives x back up to
    # floating-point error. We encode dequantized images x + u, the kind of point the
    # model was trained on: a bare integer level sits at the lower edge of its bin, where
    # the density is lower, and its latent is pulled away from the centre of the base.
    gen = torch.Generator().manual_seed(args.seed)
    x = test.x[:256] + torch.rand(test.x[:256].shape, generator=gen)
    with torch.no_grad():
        z = density.encode(x)
        x_back = density.decode(z)
    max_error = float((x_back - x).abs().max())
    print(f"encode: x {tuple(x.shape)} -> z {tuple(z.shape)}; decode(encode(x)) differs from x "
          f"by at most {max_error:.2e} (on the 0..{test.levels} data scale)")
    # If training worked, the latents of real data look like draws from the N(0, 1) base.
    print(f"latents of test images: mean {float(z.mean()):.3f}, std {float(z.std()):.3f} "
          f"(the base: 0, 1)")

    # --- samples -----------------------------------------------------------------------
    # Sampling: z ~ N(0, I), x = f(z), then rounded down to integer levels.
    save_samples(density, test, 64, args.out / "samples.png")
    print(f"samples written to {args.out / 'samples.png'}")

    results = {
        "data": args.data,
        "test_bpd": test_bpd,
        "best_val_bpd": summary["best_val_bpd"],
        "raw_bpd": math.log2(test.levels),
        "max_reconstruction_error": max_error,
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "num_params": num_params,
    }
    report(args, results)
    return results


if __name__ == "__main__":
    main()
