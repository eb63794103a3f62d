"""Tiny ImageNet (200 classes, 64x64 JPEGs) from its own layout, served by the torch backend's loaders.

Layout under `data.root` (the extracted `tiny-imagenet-200` folder):

    wnids.txt                          the 200 class ids (WordNet ids), one per line
    train/<wnid>/images/*.JPEG         500 images per class (train/<wnid>/<wnid>_boxes.txt is ignored)
    val/images/*.JPEG                  10,000 images
    val/val_annotations.txt            "<file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>" per val image
    test/                              unlabelled: never read

A val folder already sorted into `val/<wnid>/...` class folders is read as it is. Labels index the sorted wnids (the
order of torchvision's ImageFolder, which the reference used). The sample lists go to the torch backend's
`TorchTrainLoader` / `TorchValLoader` (`torch_data`), so plans, augmentation seeding, resume and sharding are identical;
the reference recipe is `data.train_crop=pad_random` (RandomCrop(64, padding=4)) + flip, `data.image_size=64`,
`data.val_resize_ratio=1.0` (val images are used as they are) and normalisation by (0.5, 0.5, 0.5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .folder import IMAGE_EXTENSIONS, scan_split
from mixmo_dist.config import DataConfig

from .placement import Placement
from .torch_loader import PathTable, torch_data

if TYPE_CHECKING:
    from . import Data

__all__ = ["build_tinyimagenet_data", "read_tinyimagenet"]

log = logging.getLogger(__name__)


def _read_wnids(root: Path) -> list[str]:
    path = root / "wnids.txt"
    if not path.is_file():
        raise ValueError(f"data.root={root}: no wnids.txt (expected the extracted tiny-imagenet-200 folder)")
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{path} lists no class")
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{path} lists a class twice")
    return sorted(wnids)


def _read_val_annotations(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, label) of every val image listed in val_annotations.txt, sorted by path."""
    path = root / "val" / "val_annotations.txt"
    label_of = {wnid: label for label, wnid in enumerate(classes)}
    images = root / "val" / "images"
    samples = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{path}:{lineno}: expected '<file>\\t<wnid>\\t...', got {line[:80]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:
            raise ValueError(f"{path}:{lineno}: class {wnid!r} is not in wnids.txt")
        file = images / name
        if not file.is_file():
            raise ValueError(f"{path}:{lineno}: listed image {file} does not exist")
        samples.append((str(file), label_of[wnid]))
    if not samples:
        raise ValueError(f"{path} lists no image")
    missing = sorted(set(classes) - {classes[label] for _, label in samples})
    if missing:
        log.warning("%s: no val image for %d classes (first: %s)", path, len(missing), missing[0])
    samples.sort(key=lambda sample: sample[0])
    return samples


def read_tinyimagenet(root: str | Path) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """Class ids and the (path, label) lists of the train and val splits.

    Raises:
        ValueError: a missing wnids.txt, split folder or listed image, a train class folder that is not in wnids.txt
            (or the reverse), an empty class folder, a val annotation naming an unknown class (all naming the path).
    """
    root = Path(root)
    classes = _read_wnids(root)
    _, train = scan_split(root, "train", classes, reference="wnids.txt")
    val_dir = root / "val"
    if (val_dir / "val_annotations.txt").is_file():
        val = _read_val_annotations(root, classes)
    elif val_dir.is_dir() and any(p.is_dir() and p.name in classes for p in val_dir.iterdir()):
        _, val = scan_split(root, "val", classes, reference="wnids.txt")
    else:
        raise ValueError(f"{val_dir}: expected val/images/ with val/val_annotations.txt (or val/<wnid>/ class folders)")
    stray = [p for p, _ in val if Path(p).suffix.lower() not in IMAGE_EXTENSIONS]
    if stray:
        raise ValueError(f"{stray[0]}: val annotation names a file that is not an image")
    return classes, train, val


def build_tinyimagenet_data(cfg: DataConfig, place: Placement) -> Data:
    """Builds Tiny ImageNet from `cfg.root` with the torch backend's loaders and contract (see `build_data`)."""
    classes, train_samples, val_samples = read_tinyimagenet(cfg.root)
    log.info("tinyimagenet: %d train / %d val images, %d classes", len(train_samples), len(val_samples), len(classes))
    return torch_data(cfg, PathTable(train_samples), PathTable(val_samples), classes, place)
