"""Benchmark photos: an ImageNet-like folder of ~500x375 JPEGs cut from scikit-image's bundled natural photos.

Loader speed depends on what is decoded (photo statistics, JPEG size, quality), so the benchmark reads real photos,
not noise: random crops of the colour photos scikit-image ships (astronaut, coffee, cat, rocket, ...), resized to
ImageNet's typical 500x375 (landscape) or 375x500 (portrait), given a light sensor-like grain (the sources are
clean and often upscaled, which would compress unrealistically well) and saved at JPEG quality 95: about 70 KiB per
file, in the range of ImageNet's (~110 KiB at a similar size). The folder is cached and rebuilt only when its
parameters change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["make_bench_photos"]

# Colour photos bundled with scikit-image (no download); grayscale ones would not be ImageNet-like.
_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
_STAMP = "bench_photos.json"
_GRAIN = 3.0  # std of the added Gaussian grain, in 0-255 units
_QUALITY = 95


def _source_photos() -> list[np.ndarray]:
    """The bundled photos as uint8 [H,W,3] arrays."""
    # scikit-image is only needed to build the cache, so it is imported here.
    import skimage.data

    return [np.asarray(getattr(skimage.data, name)())[..., :3] for name in _SOURCES]


def _one_photo(source_HW3: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop (35-100% of the shorter side) of `source_HW3`, flipped at random, resized to 500x375, grainy."""
    height, width = source_HW3.shape[:2]
    landscape = rng.random() < 0.75  # ImageNet is mostly landscape
    out_w, out_h = (500, 375) if landscape else (375, 500)
    side = min(height * out_w / out_h, width) * rng.uniform(0.35, 1.0)  # crop width at the output aspect ratio
    crop_w, crop_h = int(side), int(side * out_h / out_w)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    img = Image.fromarray(source_HW3[top : top + crop_h, left : left + crop_w])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize((out_w, out_h), Image.Resampling.BICUBIC)
    grainy_HW3 = np.asarray(img, dtype=np.float32) + rng.normal(0.0, _GRAIN, (out_h, out_w, 3))
    return Image.fromarray(np.clip(grainy_HW3, 0, 255).round().astype(np.uint8))


def make_bench_photos(
    root: Path | str,
    *,
    num_train: int,
    num_val: int = 16,
    num_classes: int = 4,
    seed: int = 0,
    side: int | None = None,
) -> Path:
    """Creates (or reuses) `root/train/<class>/*.JPEG` and `root/val/<class>/*.JPEG` of benchmark photos.

    Args:
        root: cache folder; wiped and rebuilt when its stamp does not match the arguments.
        num_train, num_val: images per split (spread evenly over the classes).
        num_classes: class folders per split.
        seed: generator seed.
        side: when set, each photo is centre-cropped to a square and resized to side x side (CIFAR-like 32 x 32
            thumbnails; antialiased, so the grain averages out as in CIFAR's downsampled photos).
    Returns:
        `root`, ready for `build_data`.
    """
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "num_classes": num_classes, "seed": seed, "version": 2}
    if side is not None:
        params["side"] = side
    stamp = root / _STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return root
    if root.exists():
        shutil.rmtree(root)
    rng = np.random.default_rng(seed)
    sources = _source_photos()
    for split, count in (("train", num_train), ("val", num_val)):
        for k in range(count):
            folder = root / split / f"class{k % num_classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            photo = _one_photo(sources[int(rng.integers(len(sources)))], rng)
            if side is not None:
                short = min(photo.size)
                left, top = (photo.width - short) // 2, (photo.height - short) // 2
                box = (left, top, left + short, top + short)
                photo = photo.resize((side, side), Image.Resampling.BILINEAR, box=box)
            photo.save(folder / f"{split}_{k:05d}.JPEG", quality=_QUALITY)
    stamp.write_text(json.dumps(params))  # written last: a half-built cache is never reused
    return root
