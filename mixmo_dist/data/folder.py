"""Image-folder datasets on disk: scanning an ImageNet-layout split, decoding one image, normalisation constants.

Shared by the torch and the DALI backends so both see exactly the same class list and sample order.
The layout is `root/<split>/<class>/<file>` (files may sit in sub-folders of a class folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# Extensions are matched case-insensitively, so ImageNet's `.JPEG` is covered by `.jpeg`.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpeg", ".jpg", ".jpe", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)

# ImageNet channel statistics in 0-1 units (RGB order), the default of every timm ResNet.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Pillow modes that hold 16 bits per pixel: converting them to RGB directly would clip at 255 instead of scaling.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class CorruptImageError(ValueError):
    """An image file that cannot be decoded (truncated, corrupt, or not an image). The message names the file."""


class UnreadableImageError(CorruptImageError):
    """An image file this process has no permission to read: intact, so not called corrupt, but stopped for the same
    way (a subclass, so every rank agrees on it as on a corrupt file). The message names the file."""


def unreadable_image(path: str | Path) -> UnreadableImageError | None:
    """The error for `path` when it cannot be opened for lack of permission, else None."""
    try:
        with open(path, "rb"):
            return None
    except PermissionError as err:
        return UnreadableImageError(
            f"cannot read image {path}: {err.strerror} (a permission, not damage); make it readable by the user "
            "running the training (e.g. chmod a+r)"
        )
    except OSError:
        return None  # missing or another failure: the decoder's own error says what it is


def _list_images(class_dir: Path) -> list[str]:
    """All image files below `class_dir` (recursively, following no symlinked dirs), as path strings."""
    found = []

    def unreadable(err: OSError) -> None:
        # os.walk skips a directory it cannot list by default: an unreadable class was then reported as empty.
        where = "" if Path(err.filename) == class_dir else f" (its sub-directory {err.filename})"
        raise ValueError(
            f"class directory {class_dir} cannot be read{where}: {err.strerror}; make it readable by the user "
            "running the training (e.g. chmod -R a+rX)"
        )

    for dirpath, dirnames, filenames in os.walk(class_dir, onerror=unreadable):
        # Hidden folders (.ipynb_checkpoints, .AppleDouble) are never part of a dataset.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, name))
    return found


def scan_split(
    root: Path | str, split: str, classes: list[str] | None = None, *, reference: str = "train"
) -> tuple[list[str], list[tuple[str, int]]]:
    """Lists the classes and samples of `root/<split>`.

    Args:
        root: dataset root holding one folder per split.
        split: split folder name, e.g. "train" or "val".
        classes: when given (the train split's classes), the split must have exactly this class set; labels are
            indices into this list.
        reference: the name of the split `classes` came from, for error messages.
    Returns:
        (classes, samples): classes sorted by name; samples are (path, label) pairs sorted by path.
    Raises:
        ValueError: the split folder is missing, holds no class folder, a class folder holds no image, or the
            class set differs from `classes` (the message names the path and the difference).
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ValueError(f"dataset split not found: {split_dir} is not a directory (expected <class>/<image> in it)")
    found = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise ValueError(f"no class directories in {split_dir} (expected {split_dir}/<class>/<img>)")
    if classes is not None and found != sorted(classes):
        extra = sorted(set(found) - set(classes))
        missing = sorted(set(classes) - set(found))
        raise ValueError(f"{split_dir}: {split} has classes not in {reference}: {extra}; missing: {missing}")
    class_list = found if classes is None else list(classes)
    label_of = {name: label for label, name in enumerate(class_list)}
    samples: list[tuple[str, int]] = []
    for name in found:
        files = _list_images(split_dir / name)
        if not files:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"empty class directory: {split_dir / name} holds no image file ({exts})")
        samples.extend((path, label_of[name]) for path in files)
    samples.sort(key=lambda sample: sample[0])
    return class_list, samples


def load_rgb(path: str | Path) -> Image.Image:
    """Decodes one image file into an 8-bit RGB Pillow image.

    Grayscale, CMYK, palette (with or without transparency), 16-bit and PNG-data-named-.JPEG files all load.
    Truncated files are refused (Pillow's LOAD_TRUNCATED_IMAGES is left off on purpose: half an image would
    silently train on grey).

    Raises:
        CorruptImageError: the file cannot be decoded; the message names the file (`UnreadableImageError` when it
            cannot be read for lack of permission).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except PermissionError:
        raise unreadable_image(path) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Converts a decoded Pillow image of any mode to RGB (a copy, detached from the file)."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in _SIXTEEN_BIT_MODES:
        gray_HW = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(gray_HW, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids Pillow's warning about byte-expressed palette transparency; alpha is dropped.
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def timm_mean_std(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The normalisation timm's pretrained config declares for `arch`, without building the model.

    Args:
        arch: a timm model name, optionally with a pretrained tag ("resnet50.a1_in1k").
    Returns:
        (mean, std), 3 floats each in 0-1 units; ImageNet's when timm has no pretrained config for `arch`.
    """
    # timm is imported here only: it takes seconds to import and the data layer does not need it otherwise.
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    mean = getattr(cfg, "mean", None) if cfg is not None else None
    std = getattr(cfg, "std", None) if cfg is not None else None
    if mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
