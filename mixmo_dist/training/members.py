"""Member inputs: batch repetition, independent per-member permutations and input repetition, on the device.

Shape legend: M members, U unique images from the loader, b batch repetitions, R = U * b rows, V views per image
(1: one shared view; b * M: one view per copy), C/H/W image.

The repeated batch lists every unique image b times in a row: repeated row j holds image u = j // b, copy
c = j % b (the authors' `BatchRepetitionSampler`). With input repetition rho, the first S = int(rho * R) rows of
the repeated batch stay where they are for every member (so all members get the same image on them); each member
takes an independent uniform permutation of the other R - S rows (self-pairs allowed). This is the authors'
`randperm_static`; MIMO's ImageNet code keeps R - int(R * (1 - rho)) rows instead, at most one row more.

Which view a member reads: with one view per copy, member m's copy c of image u is view m * b + c of u, so each of
the b x M copies of an image in a step (every copy in every member) has its own view, as when the authors' loader
reads each copy separately; shared rows included. With one shared view, every copy is view 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shared_rows(rows: int, input_repetition: float) -> int:
    """S: how many leading rows of the repeated batch every member shares (the authors' `int(rows * rho)`)."""
    return int(rows * input_repetition)


def member_rows(
    unique: int,
    num_members: int,
    repetitions: int,
    input_repetition: float,
    generator: torch.Generator | None,
    device: torch.device | str,
) -> Tensor:
    """Row of the repeated batch that every member takes at every position: int64 [M,R].

    Positions below S = `shared_rows(R, rho)` hold row = position for every member; each member fills the others
    with its own uniform permutation of rows S..R-1.
    """
    rows = unique * repetitions
    shared = shared_rows(rows, input_repetition)
    # Keys for all R rows are drawn whatever rho is, so the generator's stream does not depend on the setting.
    keys_MR = torch.rand((num_members, rows), generator=generator, device=device)
    tail_MT = keys_MR[:, shared:].argsort(dim=1) + shared
    head_MS = torch.arange(shared, device=device).expand(num_members, shared)
    return torch.cat([head_MS, tail_MT], dim=1)


def member_views(rows_MR: Tensor, repetitions: int, views: int) -> Tensor:
    """Index into the loader's [U*V] views of the view each member reads at each position: int64 [M,R].

    Args:
        rows_MR: `member_rows(...)`.
        repetitions: b.
        views: V, 1 (one shared view per image) or b * M (one view per copy).
    """
    num_members = rows_MR.shape[0]
    if views not in (1, repetitions * num_members):
        raise ValueError(f"{views} views per image: expected 1 (shared) or b*M = {repetitions * num_members}")
    unique_MR = rows_MR // repetitions
    if views == 1:
        return unique_MR
    copy_MR = rows_MR % repetitions
    member_M1 = torch.arange(num_members, device=rows_MR.device).unsqueeze(1)
    return unique_MR * views + member_M1 * repetitions + copy_MR


def member_inputs(
    images_VCHW: Tensor,
    labels_U: Tensor,
    *,
    num_members: int,
    repetitions: int,
    input_repetition: float,
    generator: torch.Generator | None,
    views: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Build the M member batches from one loader batch.

    Args:
        images_VCHW: [U*V,C,H,W], the V views of image u in rows u*V .. u*V+V-1 (V = 1 or b*M, see the module).
        labels_U: [U].
        views: V as the run planned it (checked against the batch); None reads it from the shapes.

    Returns:
        (inputs_MRCHW, labels_MR). The images keep their memory format per member (channels_last stays).
    """
    unique = labels_U.shape[0]
    if views is None:
        views = images_VCHW.shape[0] // unique
    if images_VCHW.shape[0] != unique * views:
        raise ValueError(f"the loader gave {images_VCHW.shape[0]} images for {unique} labels, not {views} views each")
    rows_MR = member_rows(unique, num_members, repetitions, input_repetition, generator, images_VCHW.device)
    flat = member_views(rows_MR, repetitions, views).reshape(-1)
    channels_last = (
        images_VCHW.dim() == 4
        and images_VCHW.is_contiguous(memory_format=torch.channels_last)
        and (not images_VCHW.is_contiguous())
    )
    if channels_last:
        # Gather in NHWC order so each member slice is channels_last-contiguous.
        nhwc = images_VCHW.permute(0, 2, 3, 1)[flat]
        inputs = nhwc.view(num_members, -1, *nhwc.shape[1:]).permute(0, 1, 4, 2, 3)
    else:
        inputs = images_VCHW[flat].view(num_members, -1, *images_VCHW.shape[1:])
    return inputs, labels_U[rows_MR // repetitions]
