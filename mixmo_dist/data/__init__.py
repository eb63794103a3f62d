"""The data layer's entry point: resolve the backend and build the train/val loaders of one rank.

Backends: "dali-gpu" / "dali-cpu" (`dali.py`), "torch" (`torch_loader.py`), "synthetic" (`synthetic.py`); all
return a `Data` with the same contract (docs/DESIGN.md, "Data"). Backends are imported lazily, so importing this
package needs neither torch nor DALI (the demo-dataset generator relies on that).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .folder import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, load_rgb, scan_split, timm_mean_std

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKENDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "Data",
    "build_data",
    "load_rgb",
    "resolve_backend",
    "scan_split",
    "timm_mean_std",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali-gpu", "dali-cpu", "torch", "synthetic")
# Datasets read from an ImageNet-layout folder (torch or DALI), and those with their own reader (torch loaders).
_FOLDER_DATASETS = ("imagefolder",)
_OWN_READER_DATASETS = ("cifar10", "cifar100", "tinyimagenet")
_logged_choices: set[str] = set()


@dataclass
class Data:
    """What the trainer receives from the data layer.

    Attributes:
        train: iterable of (images float32 [U,3,S,S] normalised on the device, labels int64 [U]); exactly
            len(train) batches per epoch on every rank; set_epoch(e), state_dict(), load_state_dict(d).
        val: iterable of (images float32 [B,3,S,S], labels int64 [B]); the ranks' parts are disjoint and together
            hold the whole split once.
        classes: class names; label k is classes[k].
        mean, std: the normalisation applied, 3 floats each in 0-1 units.
        num_train, num_val: samples in the whole train / val split (all ranks).
        backend: the resolved backend name.
    """

    train: Any
    val: Any
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_train: int
    num_val: int
    backend: str


def _dali_installed() -> bool:
    """Whether DALI imports (it does on machines without a GPU too)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _log_once(message: str) -> None:
    if message not in _logged_choices:
        _logged_choices.add(message)
        log.info(message)


def resolve_backend(name: str, cuda: bool, *, dali_installed: bool | None = None) -> str:
    """The concrete backend for the configured `name`.

    Args:
        name: one of BACKENDS.
        cuda: whether batches go to a CUDA device.
        dali_installed: whether DALI imports; probed when None.
    Returns:
        "dali-gpu", "dali-cpu", "torch" or "synthetic". "auto" picks dali-gpu with CUDA and DALI, dali-cpu with
        DALI but no CUDA, torch without DALI.
    Raises:
        ValueError: unknown name, or a DALI backend that cannot run here.
    """
    if name not in BACKENDS:
        raise ValueError(f"data.backend must be one of {BACKENDS}, got {name!r}")
    if name in ("torch", "synthetic"):
        return name
    if dali_installed is None:
        dali_installed = _dali_installed()
    if name == "auto":
        if not dali_installed:
            _log_once("data backend auto -> torch: DALI (nvidia-dali) is not installed")
            return "torch"
        resolved = "dali-gpu" if cuda else "dali-cpu"
        why = "CUDA device and DALI available" if cuda else "DALI available but the device is not CUDA"
        _log_once(f"data backend auto -> {resolved}: {why}")
        return resolved
    if not dali_installed:
        raise ValueError(
            f"data.backend={name!r} needs NVIDIA DALI, which does not import here; install nvidia-dali-cuda130 "
            "(extra 'dali') or use data.backend=torch"
        )
    if name == "dali-gpu" and not cuda:
        raise ValueError("data.backend='dali-gpu' needs a CUDA device; use dali-cpu or torch on this machine")
    return name


def _check_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    stats = tuple(float(v) for v in values)
    if len(stats) != 3:
        raise ValueError(f"{name} must hold 3 values (R, G, B in 0-1 units), got {values!r}")
    if name == "std" and min(stats) <= 0.0:
        raise ValueError(f"std must be positive, got {values!r}")
    return stats  # type: ignore[return-value]


def build_data(
    cfg: Any,
    *,
    unique_per_rank: int,
    val_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    channels_last: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Data:
    """Builds the train and val loaders of one rank with the backend `cfg.backend` resolves to.

    Args:
        cfg: the DataConfig section (root, dataset, backend, image_size, ...).
        unique_per_rank: U, unique images per train batch of this rank.
        val_batch_size: rows per val batch.
        rank, world_size: this process's place in the data-parallel world.
        seed: run seed (the same on every rank): epoch permutations and augmentations derive from it.
        device: where batches are delivered and normalised (a torch.device or its name).
        channels_last: deliver images in channels_last memory format.
        mean, std: normalisation (3 floats, 0-1 units); ImageNet's when None.
    Returns:
        Data, with `backend` the resolved backend name.
    """
    import torch

    device = torch.device(device)
    mean = _check_stats("mean", IMAGENET_MEAN if mean is None else mean)
    std = _check_stats("std", IMAGENET_STD if std is None else std)
    if unique_per_rank < 1 or val_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got unique_per_rank={unique_per_rank}, val={val_batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of size {world_size}")
    if cfg.dataset in _OWN_READER_DATASETS and cfg.backend in ("dali-gpu", "dali-cpu"):
        # Before resolving the backend: this is the error to give whether DALI is installed or not.
        raise ValueError(
            f"data.dataset={cfg.dataset!r} is read with the torch backend's loaders; set data.backend=torch "
            f"(or auto), not {cfg.backend!r}"
        )
    backend = resolve_backend(cfg.backend, device.type == "cuda")
    kwargs = dict(
        unique_per_rank=unique_per_rank,
        val_batch_size=val_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=device,
        channels_last=channels_last,
        mean=mean,
        std=std,
    )
    if backend != "synthetic" and cfg.dataset in _OWN_READER_DATASETS:
        if cfg.dataset == "tinyimagenet":
            from .tinyimagenet import build_tinyimagenet_data

            data = build_tinyimagenet_data(cfg, **kwargs)
        else:
            from .cifar import build_cifar_data

            data = build_cifar_data(cfg, **kwargs)
        return data
    if backend != "synthetic" and cfg.dataset not in _FOLDER_DATASETS:
        raise ValueError(f"data.dataset must be one of {_FOLDER_DATASETS + _OWN_READER_DATASETS}, got {cfg.dataset!r}")
    if backend == "torch":
        from .torch_loader import build_torch_data

        return build_torch_data(cfg, **kwargs)
    if backend == "synthetic":
        from .synthetic import build_synthetic_data

        return build_synthetic_data(cfg, **kwargs)
    from .dali import build_dali_data

    # The DALI builder reads the resolved flavour (dali-gpu / dali-cpu) from cfg.backend, never "auto".
    data = build_dali_data(dataclasses.replace(cfg, backend=backend), **kwargs)
    data.backend = backend
    return data
