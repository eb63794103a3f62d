"""The MixMo mixing path: batched CutMix masks, the one sampler of all mixing randomness, and the mixing block.

Shape legend: M members, B batch rows, C channels, H/W spatial size of the encoder output.

Everything here runs on the training device with tensor ops only: no Python loop over samples, no numpy, no
`.item()`, so a step never waits for the host. Masks are described by a box per sample plus two coefficients per
(member, sample) -- the value of member m's mask inside and outside sample b's box -- which covers cut batches,
linear batches and M > 2 with one formula and lets the fused kernel recompute the mask instead of reading it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# The cut probability stays at p0 until 11/12 of training, then decays linearly to 0 (reference schedule).
_DECAY_START = 11.0 / 12.0


@dataclass(frozen=True)
class MixParams:
    """All randomness of one MixMo step, sampled once and passed to both the model and the loss.

    Attributes:
        boxes_B4: int64 [B,4] boxes (y0, y1, x0, x1), half-open, at the encoder-output resolution.
        coef_in_MB: float32 [M,B] member m's mask value inside sample b's box.
        coef_out_MB: float32 [M,B] member m's mask value outside the box.
        lam_MB: float32 [M,B] realised mixing ratios (mask means); they sum to 1 over M.
        is_cut: 0-d bool tensor, whether this batch uses rectangles.
        cut_prob: the probability of a cut batch at this step (for logging).
    """

    boxes_B4: Tensor
    coef_in_MB: Tensor
    coef_out_MB: Tensor
    lam_MB: Tensor
    is_cut: Tensor
    cut_prob: float

    @property
    def num_members(self) -> int:
        return self.coef_in_MB.shape[0]


def cut_probability(progress: float, p0: float) -> float:
    """Probability of a cut batch at a fraction `progress` in [0, 1] of training (reference schedule, continuous)."""
    if progress < _DECAY_START:
        return p0
    return p0 * max(0.0, (1.0 - progress) / (1.0 - _DECAY_START))


def sample_boxes(lam_B: Tensor, height: int, width: int, generator: torch.Generator | None = None) -> Tensor:
    """Reference CutMix boxes: side `int(S * sqrt(lam))`, centre uniform over the map, corners clipped.

    Args:
        lam_B: [B] target area fractions in [0, 1].
    Returns:
        int64 [B,4] (y0, y1, x0, x1); clipping makes the realised area smaller than lam on average.
    """
    root_B = lam_B.float().clamp(0.0, 1.0).sqrt()
    cut_h_B = (height * root_B).floor().long()
    cut_w_B = (width * root_B).floor().long()
    n = lam_B.shape[0]
    cy_B = torch.randint(0, height, (n,), generator=generator, device=lam_B.device)
    cx_B = torch.randint(0, width, (n,), generator=generator, device=lam_B.device)
    y0 = (cy_B - cut_h_B // 2).clamp(0, height)
    y1 = (cy_B + cut_h_B // 2).clamp(0, height)
    x0 = (cx_B - cut_w_B // 2).clamp(0, width)
    x1 = (cx_B + cut_w_B // 2).clamp(0, width)
    return torch.stack([y0, y1, x0, x1], dim=1)


def box_area(boxes_B4: Tensor, height: int, width: int) -> Tensor:
    """Area fraction [B] (float32) of each box."""
    hh = (boxes_B4[:, 1] - boxes_B4[:, 0]).clamp_min(0)
    ww = (boxes_B4[:, 3] - boxes_B4[:, 2]).clamp_min(0)
    return (hh * ww).float() / float(height * width)


def box_masks(boxes_B4: Tensor, height: int, width: int) -> Tensor:
    """Boolean inside-the-box map [B,H,W] from boxes [B,4], by broadcasting two 1-D comparisons."""
    rows_H = torch.arange(height, device=boxes_B4.device)
    cols_W = torch.arange(width, device=boxes_B4.device)
    in_rows_BH = (rows_H[None, :] >= boxes_B4[:, 0:1]) & (rows_H[None, :] < boxes_B4[:, 1:2])
    in_cols_BW = (cols_W[None, :] >= boxes_B4[:, 2:3]) & (cols_W[None, :] < boxes_B4[:, 3:4])
    return in_rows_BH[:, :, None] & in_cols_BW[:, None, :]


def cutmix_masks(
    lam_B: Tensor, height: int, width: int, generator: torch.Generator | None = None, *, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The batched CutMix mask kernel: one vectorised op for the whole batch.

    Args:
        lam_B: [B] target area fractions.
        out: optional float32 [B,1,H,W] buffer to write the mask into (a loop that keeps one avoids a fresh
            allocation per call; on CPU the page faults of a fresh 12.8 MB mask cost more than writing it).
    Returns:
        (mask_B1HW float32, 1 inside the box, `out` when given; lam_realised_B, the mask mean = the box's area
        fraction).
    """
    batch = lam_B.shape[0]
    if out is not None and (out.shape != (batch, 1, height, width) or out.dtype != torch.float32):
        raise ValueError(
            f"cutmix_masks: out must be float32 [{batch}, 1, {height}, {width}], got {out.dtype} {list(out.shape)}"
        )
    boxes_B4 = sample_boxes(lam_B, height, width, generator)
    rows_H = torch.arange(height, device=lam_B.device)
    cols_W = torch.arange(width, device=lam_B.device)
    in_rows_BH = ((rows_H >= boxes_B4[:, 0:1]) & (rows_H < boxes_B4[:, 1:2])).float()
    in_cols_BW = ((cols_W >= boxes_B4[:, 2:3]) & (cols_W < boxes_B4[:, 3:4])).float()
    # One pass over the output: the outer product of two 1-D indicators (no bool intermediate to convert).
    mask_B1HW = torch.mul(in_rows_BH[:, None, :, None], in_cols_BW[:, None, None, :], out=out)
    return mask_B1HW, box_area(boxes_B4, height, width)


def sample_dirichlet(alpha: float, batch: int, members: int, generator: torch.Generator | None, device) -> Tensor:
    """kappa [M,B] ~ Dirichlet(alpha * 1_M) per sample; alpha = 0 gives the fixed 1/M of MIMO."""
    if alpha <= 0:
        return torch.full((members, batch), 1.0 / members, device=device)
    conc_BM = torch.full((batch, members), float(alpha), device=device)
    # Dirichlet.sample takes no generator; this private op does (and is what Dirichlet.sample calls).
    return torch._sample_dirichlet(conc_BM, generator=generator).t().contiguous()


def sample_mixing(
    batch: int,
    members: int,
    height: int,
    width: int,
    *,
    mixing: str,
    alpha: float,
    cut_prob: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> MixParams:
    """Draw every random quantity of one MixMo step on `device` from `generator`.

    kappa ~ Dirichlet(alpha) per sample; one coin per batch (cut with probability `cut_prob`, else linear with the
    same kappas); one role shuffle per batch (which member is pasted inside the box); for M > 2 the others share the
    complement of the box in proportion to their kappas. `mixing="none"` gives fixed 1/M masks (MIMO's summing).
    """
    if mixing not in ("cut", "linear", "none"):
        raise ValueError(f"mixmo.mixing must be one of cut|linear|none, got {mixing!r}")
    device = torch.device(device)
    if mixing == "none":
        kappa_MB = torch.full((members, batch), 1.0 / members, device=device)
        alpha, cut_prob = 0.0, 0.0
    else:
        kappa_MB = sample_dirichlet(alpha, batch, members, generator, device)
        if mixing == "linear":
            cut_prob = 0.0
    # Always draw the coin, the role and the boxes so the generator advances identically whatever the outcome.
    coin = torch.rand((), generator=generator, device=device)
    is_cut = coin < cut_prob
    role = torch.randint(0, members, (), generator=generator, device=device)
    onehot_MB = (torch.arange(members, device=device) == role).float()[:, None].expand(members, batch)
    kappa_in_B = (kappa_MB * onehot_MB).sum(0)
    boxes_B4 = sample_boxes(kappa_in_B, height, width, generator)
    others_MB = kappa_MB * (1.0 - onehot_MB)
    share_MB = others_MB / others_MB.sum(0, keepdim=True).clamp_min(1e-12)
    coef_in_MB = torch.where(is_cut, onehot_MB, kappa_MB)
    coef_out_MB = torch.where(is_cut, share_MB, kappa_MB)
    area_B = box_area(boxes_B4, height, width)
    lam_MB = area_B * coef_in_MB + (1.0 - area_B) * coef_out_MB
    return MixParams(boxes_B4, coef_in_MB.contiguous(), coef_out_MB.contiguous(), lam_MB, is_cut, float(cut_prob))


def member_masks(boxes_B4: Tensor, coef_in_MB: Tensor, coef_out_MB: Tensor, height: int, width: int) -> Tensor:
    """Materialised masks [M,B,1,H,W] (tests and the torch path; the Triton kernel never builds them)."""
    inbox_1BHW = box_masks(boxes_B4, height, width)[None]
    return torch.where(inbox_1BHW, coef_in_MB[:, :, None, None], coef_out_MB[:, :, None, None])[:, :, None]


def mix_features_torch(feats: Sequence[Tensor], boxes_B4: Tensor, coef_in_MB: Tensor, coef_out_MB: Tensor) -> Tensor:
    """Vectorised torch mixing: z = sum_m mask_m * feats_m, feats being M maps [B,C,H,W].

    For M = 2 the masks are complementary, so the mix is one `lerp` pass: it reads each map once and writes z
    once, like `a + b` (the memory floor); autograd gives each member `mask_m * grad`.
    """
    first = feats[0]
    if len(feats) == 1:  # the vanilla network: nothing to mix
        return first
    height, width = first.shape[-2:]
    masks_MB1HW = member_masks(boxes_B4, coef_in_MB, coef_out_MB, height, width).to(first.dtype)
    if len(feats) == 2:
        return torch.lerp(feats[1], feats[0], masks_MB1HW[0])
    out = feats[0] * masks_MB1HW[0]
    for m in range(1, len(feats)):
        out = torch.addcmul(out, feats[m], masks_MB1HW[m])
    return out


def _triton_usable(feats: Sequence[Tensor]) -> bool:
    if not feats[0].is_cuda:
        return False
    try:
        from mixmo_dist.ops import triton_mix  # imports triton
    except ImportError:
        return False
    return triton_mix.supports(feats)


def mix_features(feats: Sequence[Tensor], boxes_B4: Tensor, coef_in_MB: Tensor, coef_out_MB: Tensor) -> Tensor:
    """The mixing block: fused Triton kernel on CUDA when available, the vectorised torch path otherwise."""
    if _triton_usable(feats):
        from mixmo_dist.ops.triton_mix import mix_features_triton

        return mix_features_triton(feats, boxes_B4, coef_in_MB, coef_out_MB)
    return mix_features_torch(feats, boxes_B4, coef_in_MB, coef_out_MB)
