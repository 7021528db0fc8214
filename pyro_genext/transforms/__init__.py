"""Bijectors for Pyro: NICE and RealNVP couplings, scaling, squeeze, multi-scale,
normalisation and pre-processing. Forward is base -> data; see
:mod:`pyro_genext.transforms.base` for the caching contract."""

from .base import Bijector, FlowTransform, check_event_shape, invalidate_caches, sum_rightmost
from .chain import Chain, MultiScale
from .coupling import (
    AdditiveCoupling,
    ConditionalAdditiveCoupling,
    ConditionalMaskedCoupling,
    ConditionalRealNVPCoupling,
    MaskedCoupling,
    RealNVPCoupling,
)
from .masks import alternating_mask, channel_mask, checkerboard_mask, half_mask
from .normalization import ActNorm, BatchNormFlow, initialize
from .scaling import DiagonalScaling
from .squeeze import Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "BatchNormFlow",
    "Bijector",
    "Chain",
    "ConditionalAdditiveCoupling",
    "ConditionalMaskedCoupling",
    "ConditionalRealNVPCoupling",
    "DiagonalScaling",
    "FlowTransform",
    "MaskedCoupling",
    "MultiScale",
    "RealNVPCoupling",
    "Squeeze",
    "alternating_mask",
    "channel_mask",
    "check_event_shape",
    "checkerboard_mask",
    "half_mask",
    "initialize",
    "invalidate_caches",
    "sum_rightmost",
]

from .preprocess import AlphaSigmoid, LevelScaling, LogitPreprocess  # noqa: E402

__all__ += ["AlphaSigmoid", "LevelScaling", "LogitPreprocess"]

from .linear import Affine  # noqa: E402
from .permute import Permute  # noqa: E402

__all__ += ["Affine", "Permute"]
