"""MixMo models built from timm ResNets."""

from mixmo_dist.model.mixmo import TESTED_ARCHS, MixMoNet, build_model

__all__ = ["TESTED_ARCHS", "MixMoNet", "build_model"]
