"""bits_per_dim against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_genext.metrics import bits_per_dim, num_dims


@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("shape", [1, 64, (64,), (1, 8, 8), (3, 4, 4)])
def test_uniform_density_costs_log2_levels(levels: int, shape: int | tuple[int, ...]) -> None:
    # the uniform density L^-D on [0, L)^D: log p = -D log L, so bpd = log2 L exactly
    d = shape if isinstance(shape, int) else math.prod(shape)
    lp = torch.full((7,), -d * math.log(levels), dtype=torch.float64)
    bpd = bits_per_dim(lp, shape)
    assert bpd.shape == (7,)
    torch.testing.assert_close(bpd, torch.full((7,), math.log2(levels), dtype=torch.float64))


def test_eight_bit_uniform_is_eight_bits() -> None:
    assert float(bits_per_dim(-784 * math.log(256), (1, 28, 28))) == pytest.approx(8.0, abs=1e-12)


def test_standard_normal_by_hand() -> None:
    # N(0, I_2) at the origin: log p = -log(2 pi), bpd = log(2 pi) / (2 ln 2) = 1.32575...
    lp = torch.distributions.Normal(0.0, 1.0).log_prob(torch.zeros(2)).sum()
    assert float(bits_per_dim(lp, 2)) == pytest.approx(math.log(2 * math.pi) / (2 * math.log(2)), abs=1e-6)
    # at (1, 1): log p = -log(2 pi) - 1, bpd = (log(2 pi) + 1) / (2 ln 2) = 2.04710...
    assert (math.log(2 * math.pi) + 1) / (2 * math.log(2)) == pytest.approx(2.047095585)
    lp = torch.distributions.Normal(0.0, 1.0).log_prob(torch.ones(2)).sum()
    assert float(bits_per_dim(lp, (2,))) == pytest.approx(2.047095585, abs=1e-6)


def test_wide_gaussian_on_the_level_scale_by_hand() -> None:
    # N(128, 10^2) per dimension on the 256-level scale, at its mean:
    # bpd = log2(10 sqrt(2 pi)) = 4.647676...; a sharper model (sigma = 1) costs
    # log2(sqrt(2 pi)) = 1.32575 bits, each halving of sigma one bit less
    x = torch.full((5, 3, 2, 2), 128.0, dtype=torch.float64)
    for sigma, expected in [(10.0, 4.647676159623521), (1.0, 1.3257480647361592),
                            (0.5, 0.3257480647361592)]:
        lp = torch.distributions.Normal(128.0, sigma).log_prob(x).sum((-3, -2, -1))
        torch.testing.assert_close(
            bits_per_dim(lp, (3, 2, 2)), torch.full((5,), expected, dtype=torch.float64)
        )


def test_minus_inf_log_prob_is_infinite_cost() -> None:
    assert math.isinf(float(bits_per_dim(torch.tensor(-math.inf), 4)))


def test_integer_log_prob_and_scalars() -> None:
    assert float(bits_per_dim(torch.tensor(0), 3)) == 0.0
    assert float(bits_per_dim(-2 * math.log(2), 2)) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rejects_nan_and_plus_inf(bad: float) -> None:
    with pytest.raises(ValueError, match="expected"):
        bits_per_dim(torch.tensor([-1.0, bad]), 2)


def test_rejects_unsummed_image_log_probs() -> None:
    with pytest.raises(ValueError, match=r"summed over the event shape \(1, 8, 8\).*\(4, 1, 8, 8\)"):
        bits_per_dim(torch.zeros(4, 1, 8, 8), (1, 8, 8))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, (0, 4), (2, -1), (2.0, 3), "64", None])
def test_rejects_bad_dims(bad: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        bits_per_dim(torch.zeros(3), bad)  # type: ignore[arg-type]


def test_rejects_complex() -> None:
    with pytest.raises(ValueError, match="real"):
        bits_per_dim(torch.zeros(3, dtype=torch.complex64), 3)


def test_num_dims() -> None:
    assert num_dims(5) == 5
    assert num_dims((1, 28, 28)) == 784
    assert num_dims(torch.Size([3, 2])) == 6
