"""Member inputs: batch repetition, independent per-member permutations and input repetition, on the device.

Shape legend: M members, U unique images from the loader, R = U * repetitions rows, C/H/W image.
"""

from __future__ import annotations

import torch
from torch import Tensor


def member_indices(
    unique: int,
    num_members: int,
    repetitions: int,
    input_repetition: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Tensor:
    """Row -> unique-image index for every member: int64 [M,R].

    Each unique image appears `repetitions` times in the rows; each member gets an independent uniform permutation
    of the rows (self-pairs allowed); on a fraction `input_repetition` of rows every member takes member 0's image.
    """
    rows = unique * repetitions
    perm_MR = torch.rand((num_members, rows), generator=generator, device=device).argsort(dim=1)
    idx_MR = perm_MR % unique
    # Drawn even when rho == 0 so the generator's stream does not depend on the setting's value.
    same_R = torch.rand((rows,), generator=generator, device=device) < input_repetition
    return torch.where(same_R[None, :], idx_MR[0:1], idx_MR)


def member_inputs(
    images_UCHW: Tensor,
    labels_U: Tensor,
    *,
    num_members: int,
    repetitions: int,
    input_repetition: float,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """Build the M member batches from one loader batch.

    Returns:
        (inputs_MRCHW, labels_MR). The images keep their memory format per member (channels_last stays).
    """
    unique = images_UCHW.shape[0]
    idx_MR = member_indices(unique, num_members, repetitions, input_repetition, generator, images_UCHW.device)
    flat = idx_MR.reshape(-1)
    channels_last = (
        images_UCHW.dim() == 4
        and images_UCHW.is_contiguous(memory_format=torch.channels_last)
        and (not images_UCHW.is_contiguous())
    )
    if channels_last:
        # Gather in NHWC order so each member slice is channels_last-contiguous.
        nhwc = images_UCHW.permute(0, 2, 3, 1)[flat]
        inputs = nhwc.view(num_members, -1, *nhwc.shape[1:]).permute(0, 1, 4, 2, 3)
    else:
        inputs = images_UCHW[flat].view(num_members, -1, *images_UCHW.shape[1:])
    return inputs, labels_U[idx_MR]
