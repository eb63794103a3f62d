"""Train and val transforms of one decoded image (Pillow in, uint8 tensor out); every random draw from a generator.

Shape legend: S image side.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

TRAIN_CROPS = ("random_resized", "pad_random")
# RandomResizedCrop's aspect-ratio range and number of tries before its centre-crop fallback (torchvision's).
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_RRC_TRIES = 10
# CIFAR-style augmentation: zero padding on each side before a random crop of the original size.
_PAD = 4


def random_resized_crop_box(
    height: int, width: int, min_scale: float, gen: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's sampling rule), drawn from `gen`.

    Area fraction ~ U(min_scale, 1), log aspect ratio ~ U(log 3/4, log 4/3); after 10 boxes that do not fit,
    a centre crop of the whole image clamped to the ratio range.

    Returns:
        (top, left, box_height, box_width) in pixels.
    """
    area = height * width
    log_lo, log_hi = math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1])
    for _ in range(_RRC_TRIES):
        u_2 = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target_area = area * (min_scale + (1.0 - min_scale) * u_2[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_2[1])
        box_w = round(math.sqrt(target_area * aspect))
        box_h = round(math.sqrt(target_area / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(torch.randint(0, height - box_h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - box_w + 1, (1,), generator=gen))
            return top, left, box_h, box_w
    in_ratio = width / height
    if in_ratio < _RRC_RATIO[0]:
        box_w, box_h = width, round(width / _RRC_RATIO[0])
    elif in_ratio > _RRC_RATIO[1]:
        box_h, box_w = height, round(height * _RRC_RATIO[1])
    else:
        box_h, box_w = height, width
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def _to_uint8_chw(img: Image.Image) -> Tensor:
    """RGB Pillow image -> uint8 [3,H,W] tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def train_views(
    img: Image.Image,
    *,
    views: int,
    image_size: int,
    train_crop: str,
    min_crop_scale: float,
    hflip: bool,
    gen: torch.Generator,
) -> Tensor:
    """`views` independently augmented views of one decoded RGB image; every random draw comes from `gen`.

    random_resized: per view, RandomResizedCrop(scale=(min_crop_scale, 1)) resized to S x S (bilinear,
    antialiased, torch's uint8 kernel), then a horizontal flip with probability 1/2 when `hflip` (drawn in that
    order, view by view).
    pad_random: the image is resized to S x S and zero-padded by 4 px once; then all views' (top, left) offsets in
    0..8 are drawn at once, then all their flips, and the V crops are cut in one gather (CIFAR style).
    With views == 1 this is the single (shared) augmentation of the image.

    Returns:
        uint8 [V,3,S,S].
    """
    size = (image_size, image_size)
    if train_crop == "random_resized":
        # The decoded image once as uint8 [1,3,H,W] in channels_last memory (a view of the HWC array): torch's
        # antialiased bilinear resize has a fast uint8 path for that layout, ~2x Pillow's resize and ~4x
        # Pillow's resize plus the conversion to a tensor (docs/BENCHMARKS.md, "Views per copy").
        image_13HW = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
        out_V3SS = torch.empty(views, 3, image_size, image_size, dtype=torch.uint8)
        for v in range(views):
            top, left, box_h, box_w = random_resized_crop_box(img.height, img.width, min_crop_scale, gen)
            crop_13hw = image_13HW[:, :, top : top + box_h, left : left + box_w]
            view_13SS = F.interpolate(crop_13hw, size=size, mode="bilinear", antialias=True, align_corners=False)
            if hflip and bool(torch.rand((), generator=gen) < 0.5):
                view_13SS = view_13SS.flip(3)
            out_V3SS[v] = view_13SS[0]
        return out_V3SS
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    padded_3PP = torch.zeros(3, image_size + 2 * _PAD, image_size + 2 * _PAD, dtype=torch.uint8)
    padded_3PP[:, _PAD : _PAD + image_size, _PAD : _PAD + image_size] = _to_uint8_chw(img)
    offsets_V2 = torch.randint(0, 2 * _PAD + 1, (views, 2), generator=gen)
    span_S = torch.arange(image_size)
    rows_VS = offsets_V2[:, :1] + span_S
    cols_VS = offsets_V2[:, 1:] + span_S
    if hflip:
        flip_V1 = torch.rand((views,), generator=gen).unsqueeze(1) < 0.5
        cols_VS = torch.where(flip_V1, cols_VS.flip(1), cols_VS)
    # One advanced-indexing gather cuts every view: [3, V, S, S] -> [V, 3, S, S].
    return padded_3PP[:, rows_VS[:, :, None], cols_VS[:, None, :]].permute(1, 0, 2, 3).contiguous()


def val_transform(img: Image.Image, *, image_size: int, resize_ratio: float) -> Tensor:
    """Resize the shorter side to round(S / resize_ratio) (bilinear, antialiased), then centre-crop S x S.

    Returns:
        uint8 [3,S,S].
    """
    short = round(image_size / resize_ratio)
    width, height = img.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return _to_uint8_chw(img.crop((left, top, left + image_size, top + image_size)))
