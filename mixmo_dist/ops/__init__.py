"""MixMo mixing ops: batched CutMix masks, the mixing sampler and the mixing block (torch path + Triton kernel)."""

from mixmo_dist.ops.mixing import (
    MixParams,
    box_area,
    box_masks,
    cut_probability,
    cutmix_masks,
    member_masks,
    mix_features,
    mix_features_torch,
    sample_boxes,
    sample_dirichlet,
    sample_mixing,
)

__all__ = [
    "MixParams",
    "box_area",
    "box_masks",
    "cut_probability",
    "cutmix_masks",
    "member_masks",
    "mix_features",
    "mix_features_torch",
    "sample_boxes",
    "sample_dirichlet",
    "sample_mixing",
]
