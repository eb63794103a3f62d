"""MixMo models built from timm ResNets."""

from mixmo_dist.model import registry  # noqa: F401  (registers wide_resnet28_10, preactresnet18_3 with timm)
from mixmo_dist.model.mixmo import TESTED_ARCHS, MixMoNet, build_model

__all__ = ["TESTED_ARCHS", "MixMoNet", "build_model"]
