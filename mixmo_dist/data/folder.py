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


def _list_class(split_dir: str, class_name: str, files: list[str], dirs: list[list]) -> None:
    """Image files below `split_dir/class_name` as paths relative to `split_dir` (recursively; hidden entries
    skipped, symlinked folders not followed, as os.walk), and every folder listed as [relative path, mtime_ns,
    inode], stat'ed *before* it is listed: a change during the listing leaves the folder newer than recorded."""
    pending = [class_name]
    while pending:
        rel = pending.pop()
        full = os.path.join(split_dir, rel)
        st = os.stat(full)
        dirs.append([rel, st.st_mtime_ns, st.st_ino])
        try:
            entries = os.scandir(full)
        except PermissionError as err:
            # Skipped silently, an unreadable class would be reported as empty: name it as unreadable instead.
            class_dir = os.path.join(split_dir, class_name)
            where = "" if rel == class_name else f" (its sub-directory {full})"
            raise ValueError(
                f"class directory {class_dir} cannot be read{where}: {err.strerror}; make it readable by the user "
                "running the training (e.g. chmod -R a+rX)"
            ) from None
        with entries:
            for entry in entries:
                # Hidden folders (.ipynb_checkpoints, .AppleDouble) and files are never part of a dataset.
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if not entry.is_symlink():
                        pending.append(os.path.join(rel, entry.name))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    files.append(os.path.join(rel, entry.name))


def scan(
    root: Path | str, split: str, classes: list[str] | None = None, *, reference: str = "train"
) -> tuple[list[str], list[str], np.ndarray, list[list]]:
    """Scans `root/<split>`: (classes, paths relative to the split folder sorted, int64 labels [N], folders).

    The folders are [relative path, mtime_ns, inode] of every folder listed (the split folder first, as ""): what
    a dataset index (data/index.py) checks to know it still describes the files. One listing per folder; no stat
    per file.

    Raises:
        ValueError: as `scan_split`.
    """
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise ValueError(f"dataset split not found: {split_dir} is not a directory (expected <class>/<image> in it)")
    st = os.stat(split_dir)
    dirs: list[list] = [["", st.st_mtime_ns, st.st_ino]]
    with os.scandir(split_dir) as entries:
        found = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    if not found:
        raise ValueError(f"no class directories in {split_dir} (expected {split_dir}/<class>/<img>)")
    if classes is not None and found != sorted(classes):
        extra = sorted(set(found) - set(classes))
        missing = sorted(set(classes) - set(found))
        raise ValueError(f"{split_dir}: {split} has classes not in {reference}: {extra}; missing: {missing}")
    class_list = found if classes is None else list(classes)
    label_of = {name: label for label, name in enumerate(class_list)}
    paths: list[str] = []
    labels: list[int] = []
    for name in found:
        files: list[str] = []
        _list_class(str(split_dir), name, files, dirs)
        if not files:
            exts = " ".join(sorted(IMAGE_EXTENSIONS))
            raise ValueError(f"empty class directory: {split_dir / name} holds no image file ({exts})")
        paths.extend(files)
        labels.extend([label_of[name]] * len(files))
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return class_list, [paths[i] for i in order], np.asarray(labels, dtype=np.int64)[order], dirs


def scan_split(
    root: Path | str, split: str, classes: list[str] | None = None, *, reference: str = "train"
) -> tuple[list[str], list[tuple[str, int]]]:
    """Lists the classes and samples of `root/<split>` (a fresh scan; the loaders read a cached index instead, see
    data/index.py).

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
    class_list, paths, labels, _ = scan(root, split, classes, reference=reference)
    split_dir = str(Path(root) / split)
    return class_list, [(os.path.join(split_dir, p), label) for p, label in zip(paths, labels.tolist(), strict=True)]


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
