"""The data layer's entry point: resolve the backend and build the train/val loaders of one rank.

Backends: "dali-gpu" / "dali-cpu" (`dali.py`), "torch" (`torch_loader.py`), "synthetic" (`synthetic.py`); all
return a `Data` with the same contract (docs/DESIGN.md, "Data"). Backends are imported lazily, so importing this
package needs neither torch nor DALI (the demo-dataset generator relies on that).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .folder import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, load_rgb, scan_split, timm_mean_std
from .placement import Placement

if TYPE_CHECKING:
    from mixmo_dist.config import DataConfig

__all__ = [
    "BACKENDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptImageError",
    "Data",
    "Placement",
    "build_data",
    "check_root",
    "load_rgb",
    "resolve_backend",
    "scan_split",
    "timm_mean_std",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali-gpu", "dali-cpu", "torch", "synthetic")
# Datasets with their own reader (torch loaders only); "imagefolder" is read by the torch or a DALI backend.
_OWN_READER_DATASETS = ("cifar10", "cifar100", "tinyimagenet")
_logged_choices: set[str] = set()


@dataclass
class Data:
    """What the trainer receives from the data layer.

    Attributes:
        train: iterable of (images float32 [U*V,3,S,S] normalised on the device, labels int64 [U]): the V =
            `Placement.views_per_image` augmented views of image u are rows u*V .. u*V+V-1 (each image decoded
            once); exactly len(train) batches per epoch on every rank; set_epoch(e), state_dict(),
            load_state_dict(d).
        val: iterable of (images float32 [B,3,S,S], labels int64 [B]); the ranks' parts are disjoint and together
            hold the whole split once.
        classes: class names; label k is classes[k].
        mean, std: the normalisation applied, 3 floats each in 0-1 units.
        num_train, num_val: samples in the whole train / val split (all ranks).
        backend: the resolved backend name.
        val_split: what the val loader reads: "val", or "test" where the dataset's only held-out split is its test
            split (CIFAR), so that a best-so-far validation figure is known to be chosen on the test set.
    """

    train: Any
    val: Any
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_train: int
    num_val: int
    backend: str
    val_split: str = "val"


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


# The demo dataset's place (data.root's default), made by `make demo` or by the generator's own command line.
DEMO_ROOT = "data/demo"


def check_root(cfg: DataConfig) -> None:
    """Refuse a `data.root` that does not exist, saying how to make the demo data when it is the demo's place.

    Raises:
        ValueError: naming data.root, and for the demo's place the commands that create it.
    """
    if cfg.backend == "synthetic" or Path(cfg.root).exists():
        return
    if Path(cfg.root).resolve() == Path(DEMO_ROOT).resolve():
        raise ValueError(
            f"data.root={cfg.root} does not exist: it is where the demo dataset goes; make it with `make demo` "
            f"(generates it, then trains the demo) or `python -m mixmo_dist.data.demo --out {DEMO_ROOT}`, or set "
            "--data.root=DIR to your own data"
        )
    layout = "DIR/train/<class>/<image> and DIR/val/<class>/<image>"
    if cfg.dataset != "imagefolder":
        layout = f"the {cfg.dataset} files (the layouts are in README.md, Data)"
    raise ValueError(f"data.root={cfg.root} does not exist: set --data.root=DIR to a folder holding {layout}")


def build_data(cfg: DataConfig, place: Placement) -> Data:
    """Builds the train and val loaders of one rank with the backend `cfg.backend` resolves to.

    Args:
        cfg: the `data` section (already validated by the config layer).
        place: this rank's placement (world, device, batch sizes, layout, normalisation).
    Returns:
        Data, with `backend` the resolved backend name.
    """
    if cfg.dataset in _OWN_READER_DATASETS and cfg.backend in ("dali-gpu", "dali-cpu"):
        # Before resolving the backend: this is the error to give whether DALI is installed or not.
        raise ValueError(
            f"data.dataset={cfg.dataset!r} is read with the torch backend's loaders; set data.backend=torch "
            f"(or auto), not {cfg.backend!r}"
        )
    check_root(cfg)
    backend = resolve_backend(cfg.backend, place.device.type == "cuda")
    if backend == "synthetic":
        from .synthetic import build_synthetic_data

        return build_synthetic_data(cfg, place)
    if cfg.dataset == "tinyimagenet":
        from .tinyimagenet import build_tinyimagenet_data

        return build_tinyimagenet_data(cfg, place)
    if cfg.dataset in ("cifar10", "cifar100"):
        from .cifar import build_cifar_data

        return build_cifar_data(cfg, place)
    if backend == "torch":
        from .torch_loader import build_torch_data

        return build_torch_data(cfg, place)
    from .dali import build_dali_data

    return build_dali_data(cfg, place, gpu=backend == "dali-gpu")
