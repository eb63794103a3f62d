"""MixMo loss: per-member cross-entropy reweighted by the realised mixing ratios.

Shape legend: M members, B rows, K classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def reweight(lam_MB: Tensor, root: float) -> Tensor:
    """w_m = M * lam_m^(1/r) / sum_j lam_j^(1/r): the member with the larger share gets the larger weight.

    r = 1 gives w = M * lam; lam = 1/M gives weights 1 (MIMO).
    """
    powered_MB = lam_MB.float().clamp_min(0.0).pow(1.0 / root)
    return lam_MB.shape[0] * powered_MB / powered_MB.sum(0, keepdim=True).clamp_min(1e-12)


def mixmo_loss(
    logits_MBK: Tensor, targets: Tensor, weights_MB: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Total loss = sum over members of mean_b w_mb * CE(head m, target of member m's image).

    Args:
        logits_MBK: member logits.
        targets: int64 labels [M,B], or soft targets [M,B,K] (rows summing to 1).
        weights_MB: per-member, per-row weights (from `reweight`).
        label_smoothing: applied to hard labels (as `F.cross_entropy` does).
    Returns:
        (total scalar, per-member losses [M]), float32.
    """
    m, b, k = logits_MBK.shape
    logits = logits_MBK.float().reshape(m * b, k)
    # F.cross_entropy takes class indices or class probabilities (soft targets), with label smoothing for both.
    flat = targets.float().reshape(m * b, k) if targets.dtype.is_floating_point else targets.reshape(-1)
    ce = F.cross_entropy(logits, flat, reduction="none", label_smoothing=label_smoothing)
    per_member_M = (ce.view(m, b) * weights_MB.float()).mean(1)
    return per_member_M.sum(), per_member_M
