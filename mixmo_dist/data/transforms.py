"""Train and val transforms of one decoded image (Pillow in, uint8 or normalised float32 tensor out) and the
normalisation; every random draw from a generator.

Shape legend: S image side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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


# Pixels per row when normalising channels_last images: see `Normalisation.into`.
_NORM_PIXELS = 32


class Normalisation:
    """(x / 255 - mean) / std of uint8 pixels, computed in float32 as x * scale - shift (two correctly rounded
    operations, so every device and every place that applies it gives the same bits).

    Args:
        mean, std: 3 floats each, 0-1 units.
        device: where the constants live.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu") -> None:
        std_3 = torch.tensor(std, dtype=torch.float32)
        self.scale_1311 = (1.0 / (255.0 * std_3)).view(1, 3, 1, 1).to(device)
        self.shift_1311 = (torch.tensor(mean, dtype=torch.float32) / std_3).view(1, 3, 1, 1).to(device)
        # The constants of `_NORM_PIXELS` consecutive channels_last pixels: [R G B R G B ...].
        self.scale_P3 = self.scale_1311.view(3).repeat(_NORM_PIXELS)
        self.shift_P3 = self.shift_1311.view(3).repeat(_NORM_PIXELS)

    def __call__(self, images_B3SS: Tensor) -> Tensor:
        """uint8 [B,3,S,S] -> float32 [B,3,S,S], normalised in a new tensor of the same memory format."""
        return images_B3SS.float().mul_(self.scale_1311).sub_(self.shift_1311)

    def into(self, out_B3SS: Tensor, images_B3SS: Tensor) -> None:
        """Writes the normalised uint8 `images_B3SS` into the float32 `out_B3SS` (any memory format): no
        intermediate float tensor."""
        cl = torch.channels_last
        pixels = images_B3SS.numel() // 3
        if out_B3SS.is_contiguous(memory_format=cl) and pixels % _NORM_PIXELS == 0:
            # In channels_last memory the channel is the innermost dimension: broadcasting [1,3,1,1] over it runs a
            # scalar loop of 3. Rows of 32 pixels against the constants tiled 32 times are the same operations on
            # the same elements, vectorised: 4x faster per 224 px view here.
            images_B3SS = images_B3SS.contiguous(memory_format=cl)  # a no-op for the resize's usual output
            rows = (pixels // _NORM_PIXELS, 3 * _NORM_PIXELS)
            out_RP3 = out_B3SS.permute(0, 2, 3, 1).view(rows)
            # The exact conversion to float first, then the two operations in place: 18% faster per view (0.148 ->
            # 0.121 ms into memory not in cache) than a multiplication that converts its uint8 operand itself.
            out_RP3.copy_(images_B3SS.permute(0, 2, 3, 1).view(rows))
            out_RP3.mul_(self.scale_P3).sub_(self.shift_P3)
            return
        torch.mul(images_B3SS, self.scale_1311, out=out_B3SS)
        out_B3SS.sub_(self.shift_1311)


def random_resized_views_into(
    out_V3SS: Tensor,
    img: Image.Image,
    *,
    min_crop_scale: float,
    hflip: bool,
    gen: torch.Generator,
    normalise: Normalisation | None = None,
) -> None:
    """Writes V = len(out_V3SS) independent RandomResizedCrop views of one decoded RGB image into `out_V3SS`; every
    random draw comes from `gen`.

    Per view: RandomResizedCrop(scale=(min_crop_scale, 1)) resized to S x S (bilinear, antialiased), then a
    horizontal flip with probability 1/2 when `hflip`, drawn in that order view by view. The decoded image is
    wrapped once as uint8 [1,3,H,W] in channels_last memory (a view of the HWC array): torch's antialiased bilinear
    uint8 kernel has a fast path for that layout, about 2x Pillow's resize and 4x Pillow's resize plus the conversion
    to a tensor, for the same filter (0.01 grey levels apart on average). Each view is written while it is in cache:
    as uint8, or normalised to float32 by `normalise` (4x cheaper per view than normalising the whole batch later,
    docs/BENCHMARKS.md, "Views per copy").

    Args:
        out_V3SS: uint8 [V,3,S,S] (with `normalise` None) or float32 (with `normalise`), in any memory format;
            channels_last is the cheapest (the resize's own output layout).
    """
    views = out_V3SS.shape[0]
    assert (normalise is None) == (out_V3SS.dtype == torch.uint8), "uint8 views, or float32 normalised ones"
    image_13HW = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0)
    for v in range(views):
        box = random_resized_crop_box(img.height, img.width, min_crop_scale, gen)
        flip = hflip and bool(torch.rand((), generator=gen) < 0.5)
        resized_view_into(out_V3SS[v : v + 1], image_13HW, box, flip, normalise)


def resized_view_into(
    out_13SS: Tensor,
    image_13HW: Tensor,
    box: tuple[int, int, int, int],
    flip: bool,
    normalise: Normalisation | None = None,
) -> None:
    """One view: the (top, left, height, width) `box` of the uint8 image resized to S x S (bilinear, antialiased),
    flipped when `flip`, written into `out_13SS` as uint8 or normalised to float32 by `normalise`. The torch
    backend's views and the DALI backend's CPU views per copy (whose boxes and flips DALI draws) both come from here.
    """
    top, left, box_h, box_w = box
    side = out_13SS.shape[-1]
    # The box as its own channels_last tensor: torch's kernel resizes a contiguous input ~20% faster than a
    # window of the whole image (0.30 -> 0.235 ms per 224 px view here, with the copy; the same bits).
    crop_13hw = image_13HW[:, :, top : top + box_h, left : left + box_w]
    crop_13hw = crop_13hw.contiguous(memory_format=torch.channels_last)
    view_13SS = F.interpolate(crop_13hw, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        view_13SS = view_13SS.flip(3)
    if normalise is None:
        out_13SS.copy_(view_13SS)
    else:
        normalise.into(out_13SS, view_13SS)


def random_resized_views(
    img: Image.Image, *, views: int, image_size: int, min_crop_scale: float, hflip: bool, gen: torch.Generator
) -> Tensor:
    """`views` RandomResizedCrop views of one decoded RGB image, as `random_resized_views_into` draws them.

    Returns:
        uint8 [V,3,S,S].
    """
    out_V3SS = torch.empty(views, 3, image_size, image_size, dtype=torch.uint8)
    random_resized_views_into(out_V3SS, img, min_crop_scale=min_crop_scale, hflip=hflip, gen=gen)
    return out_V3SS


def resized(img: Image.Image, image_size: int) -> Tensor:
    """The image resized to S x S (bilinear, antialiased; untouched when it already is): uint8 [3,S,S]. The
    pad_random views are cut from it on the device (`pad_random_draws`, `pad_random_views`)."""
    size = (image_size, image_size)
    if img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return _to_uint8_chw(img)


def pad_random_draws(views: int, hflip: bool, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """The random part of `views` pad_random views of one image, drawn from `gen`: all (top, left) offsets first,
    then all flips.

    Returns:
        (offsets int64 [V,2] in 0..8, flips bool [V]; all False without `hflip`).
    """
    offsets_V2 = torch.randint(0, 2 * _PAD + 1, (views, 2), generator=gen)
    if not hflip:
        return offsets_V2, torch.zeros(views, dtype=torch.bool)
    return offsets_V2, torch.rand((views,), generator=gen) < 0.5


def pad_random_views(
    images_U3SS: Tensor, offsets_UV2: Tensor, flips_UV: Tensor, fill_3: Tensor, *, channels_last: bool
) -> Tensor:
    """CIFAR's RandomCrop(S, padding=4) + flip, V views per image, cut in one indexing op (on any device).

    Args:
        images_U3SS: [U,3,S,S] images (normalised or not).
        offsets_UV2: int64 [U,V,2] (top, left) of each view in the padded image, 0..8.
        flips_UV: bool [U,V] horizontal flips.
        fill_3: [3] the value of the zero padding in the images' units (-mean/std once normalised).
        channels_last: deliver the views in channels_last memory (else NCHW-contiguous).

    Returns:
        [U*V,3,S,S], the V views of image u in rows u*V .. u*V+V-1.
    """
    unique, _, side, _ = images_U3SS.shape
    views = offsets_UV2.shape[1]
    device = images_U3SS.device
    padded = side + 2 * _PAD
    padded_UPP3 = fill_3.to(images_U3SS.dtype).expand(unique, padded, padded, 3).clone()
    padded_UPP3[:, _PAD : _PAD + side, _PAD : _PAD + side] = images_U3SS.permute(0, 2, 3, 1)
    # Every S x S window of every padded image and of its mirror image, as a view: [2U, 9, 9, 3, S, S]. A flipped
    # view at left offset l is the window of the mirror image at offset 8 - l. One index picks all U*V views: 3-7x
    # faster than indexing every pixel (an [X,S,S] broadcast of row and column indices).
    both_2UPP3 = torch.cat([padded_UPP3, padded_UPP3.flip(2)])
    windows = both_2UPP3.unfold(1, side, 1).unfold(2, side, 1)
    windows = windows.permute(0, 1, 2, 4, 5, 3) if channels_last else windows
    offsets_X2 = offsets_UV2.to(device).reshape(-1, 2)
    flips_X = flips_UV.to(device).reshape(-1)
    source_X = torch.arange(unique, device=device).repeat_interleave(views) + unique * flips_X
    left_X = torch.where(flips_X, 2 * _PAD - offsets_X2[:, 1], offsets_X2[:, 1])
    picked = windows[source_X, offsets_X2[:, 0], left_X]  # [X,S,S,3] or [X,3,S,S]
    if channels_last:
        return picked.contiguous().permute(0, 3, 1, 2)
    return picked.contiguous()  # indexing may keep the source's strides


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
