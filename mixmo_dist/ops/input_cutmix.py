"""Input-level CutMix on the member batches, with labels corrected by each member's MixMo region ("Cut-MixMo + CutMix").

Shape legend: M members, R rows per member, C/H/W input image, h/w encoder-output resolution, K classes.

Semantics follow the MixMo reference code (its MSDA dataset wrapper with CutMix, Beta(1, 1), probability 0.5 in the
published configs):

- Each (member m, row r) pair independently gets CutMix with probability `prob` (a per-sample coin, as in the
  reference; there is no per-batch coin). Its partner is row `perm_m[r]` of the same member batch, `perm_m` a random
  permutation drawn per member (the reference draws a random dataset index; here the batch is the dataset sample).
- Area lam ~ Beta(1, 1) = U(0, 1); the box is the reference CutMix box (`ops.mixing.sample_boxes`: side
  `int(S * sqrt(lam))`, centre uniform over the image, corners clipped) at the input resolution.
- Label correction by the member's MixMo region: member m only keeps the part of its image where its MixMo mask is
  non-zero (the feature maps are mixed after the encoder), so the share of the own image is measured there:
  `share_in = mean(cutmix_box * mask_m) / mean(mask_m)`, the MixMo mask `mask_m` (encoder resolution, boxes in
  encoder coordinates) brought to the input resolution by scaling its box by H/h, W/w (exactly the reference's 2x2
  average pooling of the CutMix mask when the encoder has stride 2 and H = 2h; identity for stride-1 encoders).
- Role reversal (the reference's `reverse_if_first_minor`): if `share_in < 1/2`, the own image goes OUTSIDE the box
  and the partner inside, so the own image always keeps at least half of the member's region.
- Soft target = share_own * onehot(own label) + (1 - share_own) * onehot(partner label). The MixMo loss weights
  (`reweight(mix.lam_MB)`) are unchanged and are applied by the loss, as before.

The overlap of two axis-aligned boxes is computed in closed form, so nothing larger than the boolean [M*R,H,W] pixel
mask is materialised, every draw comes from the training generator, and there is no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mixmo_dist.ops.mixing import MixParams, box_masks, sample_boxes

__all__ = ["InputCutMix", "apply_input_cutmix", "input_cutmix", "sample_input_cutmix", "scale_boxes"]


@dataclass(frozen=True)
class InputCutMix:
    """The random draws of one input-CutMix step.

    Attributes:
        apply_MR: bool [M,R], whether row r of member m gets CutMix.
        partner_MR: int64 [M,R], the row of the same member batch pasted in.
        boxes_MR4: int64 [M,R,4] CutMix boxes (y0, y1, x0, x1), half-open, in input pixels.
    """

    apply_MR: Tensor
    partner_MR: Tensor
    boxes_MR4: Tensor


def sample_input_cutmix(
    members: int, rows: int, height: int, width: int, prob: float, generator: torch.Generator | None, device
) -> InputCutMix:
    """Draw the coins, partners and boxes of one step on `device` (a fixed number of draws whatever `prob` is)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"mixmo.input_cutmix_prob must be in [0, 1], got {prob!r}")
    apply_MR = torch.rand((members, rows), generator=generator, device=device) < prob
    partner_MR = torch.rand((members, rows), generator=generator, device=device).argsort(dim=1)
    lam_N = torch.rand((members * rows,), generator=generator, device=device)  # Beta(1, 1)
    boxes_N4 = sample_boxes(lam_N, height, width, generator)
    return InputCutMix(apply_MR, partner_MR, boxes_N4.view(members, rows, 4))


def scale_boxes(boxes_B4: Tensor, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> Tensor:
    """Boxes (y0, y1, x0, x1) at resolution `from_hw` expressed at `to_hw` (edges scaled, rounded to nearest)."""
    (fh, fw), (th, tw) = from_hw, to_hw
    if (fh, fw) == (th, tw):
        return boxes_B4
    ys = (boxes_B4[:, 0:2] * (2 * th) + fh) // (2 * fh)
    xs = (boxes_B4[:, 2:4] * (2 * tw) + fw) // (2 * fw)
    return torch.cat([ys, xs], dim=1)


def _overlap_fraction(a_N4: Tensor, b_N4: Tensor, height: int, width: int) -> Tensor:
    """Area of the intersection of boxes a and b as a fraction of the image, float32 [N]."""
    hh = (torch.minimum(a_N4[:, 1], b_N4[:, 1]) - torch.maximum(a_N4[:, 0], b_N4[:, 0])).clamp_min(0)
    ww = (torch.minimum(a_N4[:, 3], b_N4[:, 3]) - torch.maximum(a_N4[:, 2], b_N4[:, 2])).clamp_min(0)
    return (hh * ww).float() / float(height * width)


def own_share_in_box(draws: InputCutMix, mix: MixParams, image_hw: tuple[int, int], encoder_hw: tuple[int, int]):
    """Share of member m's MixMo region covered by the CutMix box, float32 [M,R].

    `mean(box * mask_m) / mean(mask_m)`, with mask_m = coef_in inside the (scaled) MixMo box and coef_out outside.
    A member without any region (mean 0) gets share 0, so, reversed, it keeps its own label (its loss weight is 0).
    """
    m, r = draws.apply_MR.shape
    height, width = image_hw
    mixmo_R4 = scale_boxes(mix.boxes_B4, encoder_hw, image_hw)
    cut_N4 = draws.boxes_MR4.reshape(m * r, 4)
    mixmo_N4 = mixmo_R4.repeat(m, 1)
    area_cut_MR = _overlap_fraction(cut_N4, cut_N4, height, width).view(m, r)
    area_mixmo_MR = _overlap_fraction(mixmo_N4, mixmo_N4, height, width).view(m, r)
    overlap_MR = _overlap_fraction(cut_N4, mixmo_N4, height, width).view(m, r)
    c_in, c_out = mix.coef_in_MB.float(), mix.coef_out_MB.float()
    inside_MR = c_in * overlap_MR + c_out * (area_cut_MR - overlap_MR)
    region_MR = c_in * area_mixmo_MR + c_out * (1.0 - area_mixmo_MR)
    return inside_MR / region_MR.clamp_min(1e-12)


def apply_input_cutmix(
    x_MRCHW: Tensor, y_MR: Tensor, mix: MixParams, draws: InputCutMix, num_classes: int, encoder_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Paste the partners' boxes and build the region-corrected soft targets (see the module docstring).

    Returns:
        (x_MRCHW with CutMix applied, same memory format per member as the input; soft targets float32 [M,R,K]).
    """
    m, r, _, height, width = x_MRCHW.shape
    share_in_MR = own_share_in_box(draws, mix, (height, width), encoder_hw)
    own_inside_MR = share_in_MR >= 0.5
    own_share_MR = torch.where(draws.apply_MR, torch.where(own_inside_MR, share_in_MR, 1.0 - share_in_MR), 1.0)

    in_cut_MRHW = box_masks(draws.boxes_MR4.reshape(m * r, 4), height, width).view(m, r, height, width)
    # Own pixel where it is on the own image's side of the box edge; everywhere on rows without CutMix.
    own_MRHW = (in_cut_MRHW == own_inside_MR[:, :, None, None]) | ~draws.apply_MR[:, :, None, None]
    member_MR = torch.arange(m, device=x_MRCHW.device)[:, None].expand(m, r)
    partner_MRCHW = x_MRCHW[member_MR, draws.partner_MR]
    out_MRCHW = torch.where(own_MRHW[:, :, None], x_MRCHW, partner_MRCHW)
    per_member_cl = x_MRCHW[0].is_contiguous(memory_format=torch.channels_last) and not x_MRCHW[0].is_contiguous()
    if per_member_cl:
        # Keep each member batch channels_last (what the encoders were given before): gather in NHWC order.
        out_MRCHW = out_MRCHW.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    else:
        out_MRCHW = out_MRCHW.contiguous()

    own_MRK = F.one_hot(y_MR, num_classes).float()
    partner_MRK = F.one_hot(y_MR.gather(1, draws.partner_MR), num_classes).float()
    share_MR1 = own_share_MR.unsqueeze(-1)
    return out_MRCHW, share_MR1 * own_MRK + (1.0 - share_MR1) * partner_MRK


def input_cutmix(
    x_MRCHW: Tensor,
    y_MR: Tensor,
    mix: MixParams,
    num_classes: int,
    prob: float,
    generator: torch.Generator | None,
    *,
    encoder_hw: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Cut-MixMo + CutMix: input-level CutMix inside each member batch, labels corrected by the MixMo region.

    Args:
        x_MRCHW: member inputs (from `member_inputs`).
        y_MR: int64 member labels.
        mix: this step's MixMo draws (boxes at the encoder-output resolution).
        num_classes: K.
        prob: probability that a (member, row) pair gets CutMix.
        generator: the training generator (on the device of `x_MRCHW`).
        encoder_hw: (h, w) of the encoder output, the resolution of `mix.boxes_B4`
            (`MixMoNet.encoder_output_hw(H, W)`).

    Returns:
        (x_MRCHW, soft targets float32 [M,R,K] summing to 1), for `mixmo_loss(logits, targets, weights)`.
    """
    m, r, _, height, width = x_MRCHW.shape
    if y_MR.shape != (m, r):
        raise ValueError(f"y_MR must be [M={m}, R={r}], got {tuple(y_MR.shape)}")
    if mix.coef_in_MB.shape != (m, r):
        raise ValueError(f"mix is for [M,B]={tuple(mix.coef_in_MB.shape)}, the inputs are [M={m}, R={r}]")
    draws = sample_input_cutmix(m, r, height, width, prob, generator, x_MRCHW.device)
    return apply_input_cutmix(x_MRCHW, y_MR, mix, draws, num_classes, encoder_hw)
