"""CIFAR-10 / CIFAR-100 from the official python pickle folders, served with the torch backend's contract.

Layout under `data.root` (the folder holding the extracted archive, or the archive's folder itself):

    cifar-10-batches-py/   data_batch_1 .. data_batch_5, test_batch, batches.meta   (labels: "labels")
    cifar-100-python/      train, test, meta                                         (labels: "fine_labels")

Each file is a pickle of a dict holding a uint8 numpy array `data` [N, 3072] (R, G, B planes of 32x32 pixels, row
major) and a list of integer labels; `meta` / `batches.meta` hold the class names. Unpickling can run arbitrary
code, so these files are read with a restricted `pickle.Unpickler` whose `find_class` only allows what a numpy array
needs (`numpy.ndarray`, `numpy.dtype`, numpy's `_reconstruct` and, for protocol-5 re-pickles, `_frombuffer`); any
other global is refused with an error naming the file. Nothing is downloaded.

Batches follow the torch backend exactly (`torch_loader`): the same `EpochPlan` (per-epoch permutation, equal
batch counts on every rank, exact mid-epoch resume), the same per-sample augmentation seeding and transforms
(`data.train_crop=pad_random` is the reference's RandomCrop(32, padding=4); then the flip), the same
rank::world_size validation sharding and device-side normalisation. The test split is the validation split, as in
the reference (it has no other).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mixmo_dist.config import DataConfig

from .placement import Placement
from .torch_loader import torch_data

if TYPE_CHECKING:
    from . import Data

__all__ = ["CifarSplit", "build_cifar_data", "read_cifar"]

log = logging.getLogger(__name__)

_SIDE = 32
# dataset -> (folder, train files, val files, meta file, label key, class-name key)
_LAYOUTS = {
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}
# The only globals a pickled numpy array needs (numpy 2 moved `core` to `_core`; old files name `numpy.core`);
# `_frombuffer` is what protocol 5 uses for arrays.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction; everything else is refused."""

    def __init__(self, file) -> None:
        # latin1: the official files were pickled by Python 2; latin1 maps its byte strings 1:1 (numpy's advice).
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} (a CIFAR file only holds numpy arrays, lists, strings "
                "and numbers)"
            )
        return super().find_class(*target)


def _load_pickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"CIFAR file not found: {path}")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"cannot read CIFAR file {path}: {err}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(obj).__name__}, expected a dict")
    # Python-2 pickles read with latin1 have str keys; files written by Python 3 with bytes keys get decoded too.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


class CifarSplit:
    """One CIFAR split in memory.

    Attributes:
        images_NHWC: uint8 [N,32,32,3].
        labels_N: int64 [N].
    """

    def __init__(self, images_NHWC: np.ndarray, labels_N: np.ndarray) -> None:
        self.images_NHWC = images_NHWC
        self.labels_N = labels_N

    def __len__(self) -> int:
        return len(self.labels_N)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Sample `index` as an RGB image and its label (a `torch_loader.Source`)."""
        return Image.fromarray(self.images_NHWC[index]), int(self.labels_N[index])


def _read_batches(folder: Path, names: Sequence[str], label_key: str, num_classes: int) -> CifarSplit:
    images, labels = [], []
    for name in names:
        path = folder / name
        batch = _load_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"CIFAR file {path} lacks the keys 'data' and {label_key!r} (found {sorted(batch)})")
        data = np.asarray(batch["data"])
        batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * _SIDE * _SIDE:
            raise ValueError(f"CIFAR file {path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
        if batch_labels.shape != (data.shape[0],):
            raise ValueError(f"CIFAR file {path}: {data.shape[0]} images but {batch_labels.shape[0]} labels")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise ValueError(f"CIFAR file {path}: labels outside [0, {num_classes}) for {num_classes} class names")
        # Rows are the R, G, B planes of a 32x32 image: [N,3,32,32] -> NHWC for Pillow.
        images.append(data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return CifarSplit(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))


def read_cifar(root: str | Path, dataset: str) -> tuple[list[str], CifarSplit, CifarSplit]:
    """Read a CIFAR dataset from its official python files.

    Args:
        root: the folder holding `cifar-10-batches-py` / `cifar-100-python`, or that folder itself.
        dataset: "cifar10" or "cifar100".

    Returns:
        (class names, train split, test split); label k is class_names[k].

    Raises:
        ValueError: unknown dataset, missing folder or file, a file that is not a CIFAR pickle (naming it).
    """
    if dataset not in _LAYOUTS:
        raise ValueError(f"data.dataset must be one of {sorted(_LAYOUTS)} for the CIFAR reader, got {dataset!r}")
    folder_name, train_names, val_names, meta_name, label_key, names_key = _LAYOUTS[dataset]
    root = Path(root)
    folder = root / folder_name
    if not folder.is_dir():
        if (root / meta_name).is_file():
            folder = root
        else:
            raise ValueError(
                f"data.root={root}: no {folder_name}/ folder (the extracted official python version of {dataset}: "
                f"{', '.join((*train_names, *val_names, meta_name))})"
            )
    meta = _load_pickle(folder / meta_name)
    if names_key not in meta:
        raise ValueError(f"CIFAR file {folder / meta_name} lacks the key {names_key!r} (found {sorted(meta)})")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    train = _read_batches(folder, train_names, label_key, len(classes))
    val = _read_batches(folder, val_names, label_key, len(classes))
    return classes, train, val


def build_cifar_data(cfg: DataConfig, place: Placement) -> Data:
    """Builds CIFAR-10/100 (`cfg.dataset`) from `cfg.root` with the torch backend's contract (see `build_data`).

    The reference recipe is `data.train_crop=pad_random`, `data.image_size=32`, `data.val_resize_ratio=1.0`, with the
    reference's CIFAR normalisation (`place.mean`/`place.std`, e.g. from `wide_resnet28_10`'s pretrained cfg).
    """
    classes, train_split, val_split = read_cifar(cfg.root, cfg.dataset)
    log.info("%s: %d train / %d test images, %d classes", cfg.dataset, len(train_split), len(val_split), len(classes))
    # The reference validates on the test split (CIFAR has no other held-out split): say so in every val record.
    return torch_data(cfg, train_split, val_split, classes, place, val_split="test")
