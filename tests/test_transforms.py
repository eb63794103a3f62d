"""data/transforms against references written here from the definitions (torchvision's RandomResizedCrop rule,
CIFAR's padded crop, the validation resize and centre crop), draw for draw from the same generator; in process
and fast, so `make mutation` selects them for data/transforms (issue 22). Image sizes and scales are chosen so
the branches differ: wide and tall images that force the centre-crop fallback, a min scale of 1, odd sides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mixmo_dist.data.transforms import (
    Normalisation,
    pad_random_draws,
    random_resized_crop_box,
    random_resized_views,
    random_resized_views_into,
    resized,
    val_transform,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _reference_box(height, width, min_scale, gen):
    area = height * width
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        u = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target = area * (min_scale + (1 - min_scale) * u[0])
        aspect = math.exp(lo + (hi - lo) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        h, w = height, round(height * (4 / 3))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize(
    "height, width, min_scale",
    [(375, 500, 0.08), (64, 64, 0.5), (40, 400, 0.9), (400, 40, 0.9), (31, 17, 1.0), (17, 31, 0.08)],
)
def test_crop_box_is_torchvisions_rule_draw_for_draw(height, width, min_scale):
    gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    boxes = [random_resized_crop_box(height, width, min_scale, gen) for _ in range(60)]
    assert boxes == [_reference_box(height, width, min_scale, ref) for _ in range(60)]
    assert torch.equal(gen.get_state(), ref.get_state())
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0


def test_crop_box_fallbacks_clamp_the_ratio_and_centre():
    # 10 x 1000 and 1000 x 10 never fit a box with a ratio in [3/4, 4/3] of area >= 0.9: the centre fallback.
    gen = torch.Generator().manual_seed(0)
    assert random_resized_crop_box(10, 1000, 0.9, gen) == (0, (1000 - 13) // 2, 10, 13)
    assert random_resized_crop_box(1000, 10, 0.9, gen) == ((1000 - 13) // 2, 0, 13, 10)


def _reference_views(img, views, size, min_scale, hflip, gen):
    out = []
    for _ in range(views):
        top, left, h, w = _reference_box(img.height, img.width, min_scale, gen)
        crop = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None][:, :, top : top + h, left : left + w]
        view = F.interpolate(
            crop.contiguous(memory_format=torch.channels_last),
            size=(size, size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        if hflip and bool(torch.rand((), generator=gen) < 0.5):
            view = view.flip(3)
        out.append(view[0])
    return torch.stack(out)


@pytest.mark.parametrize("hflip", [True, False])
def test_random_resized_views_are_the_reference_views(hflip):
    img = _image(90, 70)
    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    got = random_resized_views(img, views=6, image_size=24, min_crop_scale=0.2, hflip=hflip, gen=gen)
    assert got.dtype == torch.uint8 and got.shape == (6, 3, 24, 24)
    assert torch.equal(got, _reference_views(img, 6, 24, 0.2, hflip, ref))
    assert torch.equal(gen.get_state(), ref.get_state())  # no draw more or less (no coin without hflip)


@pytest.mark.parametrize("channels_last", [True, False])
def test_views_normalised_in_place_equal_the_normalised_uint8_views(channels_last):
    img = _image(50, 66, seed=1)
    norm = Normalisation(MEAN, STD)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(5, 3, 32, 32, dtype=torch.float32).contiguous(memory_format=fmt)
    random_resized_views_into(
        out, img, min_crop_scale=0.3, hflip=True, gen=torch.Generator().manual_seed(9), normalise=norm
    )
    plain = random_resized_views(
        img, views=5, image_size=32, min_crop_scale=0.3, hflip=True, gen=torch.Generator().manual_seed(9)
    )
    assert torch.equal(out, norm(plain))
    expected = (plain.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1).double()) / torch.tensor(STD).view(
        1, 3, 1, 1
    ).double()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", [32, 7])  # 7 x 7 = 49 pixels: not whole rows of 32, the general branch
def test_normalisation_constants_and_both_branches(side):
    norm = Normalisation(MEAN, STD)
    std = torch.tensor(STD, dtype=torch.float32)
    torch.testing.assert_close(norm.scale_1311.view(3), 1.0 / (255.0 * std), rtol=0, atol=0)
    torch.testing.assert_close(norm.shift_1311.view(3), torch.tensor(MEAN, dtype=torch.float32) / std, rtol=0, atol=0)
    x = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    by_hand = x.float() * norm.scale_1311 - norm.shift_1311
    assert torch.equal(norm(x), by_hand)
    for fmt in (torch.channels_last, torch.contiguous_format):
        out = torch.empty(2, 3, side, side).contiguous(memory_format=fmt)
        norm.into(out, x.contiguous(memory_format=fmt))
        assert torch.equal(out, by_hand), fmt


def test_resized_leaves_an_image_of_the_size_untouched_and_resizes_others_bilinearly():
    img = _image(32, 32)
    assert torch.equal(resized(img, 32), torch.from_numpy(np.array(img)).permute(2, 0, 1))
    big = _image(45, 38)
    expected = np.array(big.resize((32, 32), Image.Resampling.BILINEAR))
    out = resized(big, 32)
    assert out.shape == (3, 32, 32) and out.is_contiguous()
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize("hflip", [True, False])
def test_pad_random_draws_order(hflip):
    gen, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    offsets, flips = pad_random_draws(50, hflip, gen)
    assert torch.equal(offsets, torch.randint(0, 9, (50, 2), generator=ref))
    if hflip:
        assert torch.equal(flips, torch.rand((50,), generator=ref) < 0.5) and 5 < int(flips.sum()) < 45
    else:
        assert flips.dtype == torch.bool and not flips.any()
    assert torch.equal(gen.get_state(), ref.get_state())
    assert offsets.min() == 0 and offsets.max() == 8


@pytest.mark.parametrize("width, height", [(80, 60), (60, 80), (50, 50), (33, 97)])
def test_val_transform_resizes_the_short_side_and_crops_the_centre(width, height):
    img = _image(width, height, seed=4)
    short = round(24 / 0.875)
    if width <= height:
        new = (short, int(short * height / width))
    else:
        new = (int(short * width / height), short)
    big = img.resize(new, Image.Resampling.BILINEAR)
    top, left = int(round((new[1] - 24) / 2.0)), int(round((new[0] - 24) / 2.0))
    expected = np.array(big.crop((left, top, left + 24, top + 24)))
    out = val_transform(img, image_size=24, resize_ratio=0.875)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(expected).permute(2, 0, 1))


def test_views_into_a_buffer_of_the_wrong_kind_are_refused_with_the_reason():
    img = _image(40, 30)
    for out, normalise in (
        (torch.empty(2, 3, 16, 16, dtype=torch.float32), None),  # float views need a Normalisation
        (torch.empty(2, 3, 16, 16, dtype=torch.uint8), Normalisation(MEAN, STD)),  # uint8 views cannot be normalised
    ):
        with pytest.raises(AssertionError, match=r"^uint8 views, or float32 normalised ones$"):
            random_resized_views_into(
                out, img, min_crop_scale=0.5, hflip=False, gen=torch.Generator().manual_seed(0), normalise=normalise
            )


def test_crop_boxes_of_one_pixel_are_taken_at_once_and_empty_ones_never():
    # A 1 x 1 image at scale 1: the first box (1 x 1) fits and is taken, after exactly one draw of area and ratio
    # and the two offsets.
    gen, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert random_resized_crop_box(1, 1, 1.0, gen) == (0, 0, 1, 1)
    torch.rand(2, generator=ref, dtype=torch.float64)
    torch.randint(0, 1, (1,), generator=ref), torch.randint(0, 1, (1,), generator=ref)
    assert torch.equal(gen.get_state(), ref.get_state())
    # At scale 0.01 many drawn boxes round to 0 pixels: they are never returned.
    gen = torch.Generator().manual_seed(1)
    assert {random_resized_crop_box(1, 2, 0.01, gen)[2:] for _ in range(300)} <= {(1, 1), (1, 2)}


def test_the_fallback_box_of_an_image_within_the_ratio_range_is_the_whole_image():
    # A square at scale 1 fits only boxes of ratio ~1: most seeds fail the 10 tries and fall back.
    fell_back = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        assert random_resized_crop_box(100, 100, 1.0, gen) == (0, 0, 100, 100), seed
        fell_back += int(torch.equal(gen.get_state(), _after_tries(seed, 10)))
    assert fell_back >= 10


def _after_tries(seed: int, tries: int) -> torch.Tensor:
    ref = torch.Generator().manual_seed(seed)
    for _ in range(tries):
        torch.rand(2, generator=ref, dtype=torch.float64)
    return ref.get_state()
