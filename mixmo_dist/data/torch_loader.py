"""The torch backend of the data layer: samples of a `Source` decoded with Pillow in DataLoader workers.

Sources: `PathTable` (image files: ImageNet-layout folders, Tiny ImageNet) and `cifar.CifarSplit` (arrays); every
reader ends in `torch_data`, which builds the same `TrainSet`/`ValSet` and loaders for all of them.

Shape legend: B batch rows, U unique images per rank per step, W world size, S image side.

Train batches follow the shared `EpochPlan`. Each sample is decoded once and gives `place.views_per_image` views
(V: 1, or one per copy under `data.copy_augmentation=per_copy`), all drawn from one generator seeded by (seed, epoch,
position in the epoch), so a batch does not depend on the number of workers, on which worker decoded it, on the
world size or on whether the run was interrupted.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from mixmo_dist.config import DataConfig
from mixmo_dist.runtime.seeds import derive_seed

from .folder import load_rgb, scan_split
from .placement import Placement
from .plan import EpochPlan
from .transforms import train_views, val_transform
from .workers import Decoder

if TYPE_CHECKING:
    from . import Data


class Source(Protocol):
    """Where the torch backend's datasets read samples: `len(source)` samples, `source.load(i)` -> (RGB image, label).

    `PathTable` (image files) and `cifar.CifarSplit` (arrays in memory) are the two; a source is pickled once into
    each DataLoader worker, so it should hold flat arrays rather than many Python objects.
    """

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]: ...


class PathTable:
    """Sample paths and labels stored in flat numpy arrays.

    A list of N Python strings in a Dataset gets its pages copied into every forked worker as soon as the
    workers touch the refcounts; flat arrays stay shared (this matters at ImageNet's 1.28M paths).
    """

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        encoded = [path.encode("utf-8") for path, _ in samples]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> tuple[str, int]:
        start, stop = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:stop].tobytes().decode("utf-8"), int(self._labels[index])

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Sample `index` decoded to RGB (a `Source`); a corrupt file raises CorruptImageError naming it."""
        path, label = self[index]
        return load_rgb(path), label


class TrainSet(Dataset):
    """Decodes train samples of a `Source` once and augments `views` views of each (uint8 [V,3,S,S], label); a key
    is (epoch, position in the epoch, source index)."""

    def __init__(self, source: Source, cfg: DataConfig, seed: int, views: int = 1) -> None:
        self.source = source
        self.seed = seed
        self.transform = dict(
            views=views,
            image_size=cfg.image_size,
            train_crop=cfg.train_crop,
            min_crop_scale=cfg.min_crop_scale,
            hflip=cfg.hflip,
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Tensor, int]:
        epoch, position, index = key
        image, label = self.source.load(index)
        # The position, not the dataset index, seeds the draw: wrapped-around duplicates get their own crops, and a
        # batch is the same whatever the number of workers, the worker that decodes it or a resume.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, position))
        return train_views(image, gen=gen, **self.transform), label


class ValSet(Dataset):
    """Decodes val samples of a `Source` with the deterministic resize + centre crop."""

    def __init__(self, source: Source, cfg: DataConfig) -> None:
        self.source = source
        self.image_size = cfg.image_size
        self.resize_ratio = cfg.val_resize_ratio

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.source.load(index)
        return val_transform(image, image_size=self.image_size, resize_ratio=self.resize_ratio), label


class TorchTrainLoader(EpochPlan):
    """Train batches (images float32 [U*V,3,S,S] normalised on the device, the V views of image u in rows
    u*V .. u*V+V-1; labels int64 [U]) of one rank.

    Args:
        dataset: a `TrainSet` (or any dataset taking (epoch, position, index) keys).
        cfg: the `data` section (num_workers, worker_timeout_s).
        place: this rank's placement (its `unique_per_rank` is U).
    """

    def __init__(self, dataset: Dataset, cfg: DataConfig, place: Placement) -> None:
        super().__init__(
            len(dataset),
            unique_per_rank=place.unique_per_rank,
            rank=place.rank,
            world_size=place.world_size,
            seed=place.seed,
        )
        # Train workers persist across epochs: no start-up per epoch, the dataset pickled once.
        self._decoder = Decoder(dataset, cfg, place, persistent=True, what="train")

    def epoch_keys(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """This rank's batches of `epoch` as lists of (epoch, position, dataset index) keys."""
        order = self.global_order(epoch)
        positions_SU = self.rank_positions()
        indices_SU = order[positions_SU]
        return [
            [(epoch, pos, idx) for pos, idx in zip(pos_row, idx_row)]
            for pos_row, idx_row in zip(positions_SU.tolist(), indices_SU.tolist())
        ]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, start = self._begin_pass()
        # Skipping happens here, on keys: batches before `start` are never decoded.
        for batch in self._decoder.run(self.epoch_keys(epoch)[start:], first=start):
            self._batch += 1
            yield batch


class TorchValLoader:
    """Val batches of one rank: samples rank::world_size of `dataset`, in order, no padding, last batch short.

    Args:
        dataset: a `ValSet` (or any dataset indexed by sample).
        cfg: the `data` section (num_workers, worker_timeout_s).
        place: this rank's placement (its `val_batch_size` is the batch).
    """

    def __init__(self, dataset: Dataset, cfg: DataConfig, place: Placement) -> None:
        self._indices = range(place.rank, len(dataset), place.world_size)
        self._batch_size = place.val_batch_size
        # Val workers live for one pass: keeping them would double the idle worker processes of every rank.
        self._decoder = Decoder(dataset, cfg, place, persistent=False, what="val")

    @property
    def num_samples(self) -> int:
        """Samples this rank evaluates."""
        return len(self._indices)

    def __len__(self) -> int:
        return math.ceil(len(self._indices) / self._batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx, size = self._indices, self._batch_size
        yield from self._decoder.run([list(idx[i : i + size]) for i in range(0, len(idx), size)])


def torch_data(
    cfg: DataConfig,
    train_source: Source,
    val_source: Source,
    classes: list[str],
    place: Placement,
    *,
    val_split: str = "val",
) -> Data:
    """The torch backend's `Data` over two sources, with the settings of the `data` section `cfg`; `val_split`
    names what `val_source` is ("test" for CIFAR).

    Every reader served by this backend (image folders, Tiny ImageNet, CIFAR) ends here, so plans, augmentation
    seeding, resume, sharding and worker handling are the same for all of them.
    """
    from . import Data

    return Data(
        train=TorchTrainLoader(TrainSet(train_source, cfg, place.seed, place.views_per_image), cfg, place),
        val=TorchValLoader(ValSet(val_source, cfg), cfg, place),
        classes=classes,
        mean=place.mean,
        std=place.std,
        num_train=len(train_source),
        num_val=len(val_source),
        backend="torch",
        val_split=val_split,
    )


def build_torch_data(cfg: DataConfig, place: Placement) -> Data:
    """Builds the torch backend for an ImageNet-layout folder `cfg.root` (train/ and val/ splits)."""
    classes, train_samples = scan_split(cfg.root, "train")
    _, val_samples = scan_split(cfg.root, "val", classes)
    return torch_data(cfg, PathTable(train_samples), PathTable(val_samples), classes, place)
