"""The torch backend of the data layer: samples of a `Source` decoded with Pillow in DataLoader workers.

Sources: `PathTable` (image files: ImageNet-layout folders, Tiny ImageNet) and `cifar.CifarSplit` (arrays); every
reader ends in `torch_data`, which builds the same `TrainSet`/`ValSet` and loaders for all of them.

Shape legend: B batch rows, U unique images per rank per step, W world size, S image side.

Train batches follow the shared `EpochPlan`. Each sample is decoded once and gives `place.views_per_image` views
(V: 1, or one per copy under `data.copy_augmentation=per_copy`), all drawn from one generator seeded by (seed, epoch,
position in the epoch), so a batch does not depend on the number of workers, on which worker decoded it, on the
world size or on whether the run was interrupted. RandomResizedCrop views are made in the workers; pad_random views
(pad 4, crop, flip) are cut on the device from the resized images, one gather per batch: in the workers, 8 crops
per 32 px image made the loader 1.7x slower than one (docs/BENCHMARKS.md, "Views per copy").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, get_worker_info

from mixmo_dist.config import DataConfig
from mixmo_dist.runtime.seeds import derive_seed

from .batch_pool import BatchPool, PooledImages
from .folder import CorruptImageError
from .index import PathTable, folder_tables  # noqa: F401 (PathTable: re-exported, a `Source`)
from .placement import Placement
from .plan import EpochPlan
from .transforms import (
    Normalisation,
    pad_random_draws,
    pad_random_views,
    random_resized_views_into,
    resized,
    val_transform,
)
from .workers import PREFETCH_FACTOR, Decoder

if TYPE_CHECKING:
    from . import Data


class Source(Protocol):
    """Where the torch backend's datasets read samples: `len(source)` samples, `source.load(i)` -> (RGB image, label).

    `PathTable` (image files) and `cifar.CifarSplit` (arrays in memory) are the two; a source is pickled once into
    each DataLoader worker, so it should hold flat arrays rather than many Python objects.
    """

    def __len__(self) -> int: ...

    def load(self, index: int) -> tuple[Image.Image, int]: ...


def _worker_message(err: CorruptImageError) -> str:
    """The worker's own message: the DataLoader re-raises a worker's error with the worker's whole traceback as its
    text, whose last line is `<module>.CorruptImageError: <message>`."""
    text = str(err)
    marker = f"{type(err).__name__}: "
    at = text.rfind(marker)
    return text[at + len(marker) :].strip() if at >= 0 else text


def _one_line_errors(batches: Iterator[tuple[Tensor, Tensor]]) -> Iterator[tuple[Tensor, Tensor]]:
    """`batches`, with a corrupt image's error re-raised as the one line naming the file."""
    try:
        yield from batches
    except CorruptImageError as err:
        raise type(err)(_worker_message(err)) from None  # an UnreadableImageError stays one


class TrainSet(Dataset):
    """Decodes train samples of a `Source` once; a key is (epoch, position in the epoch, source index).

    A sample is (uint8 [V,3,S,S] views, label) for random_resized, (uint8 [3,S,S] resized image, label) for
    pad_random, whose views `TorchTrainLoader` cuts on the device. The DataLoader asks for whole batches
    (`__getitems__`): random_resized views are then written straight into one batch buffer, in shared memory in a
    worker (nothing is copied to send it), in the placement's memory format, and normalised to float32 there when
    `normalise` is given: the views' pixels are touched once, in the workers, not again by the training process.
    With a `pool` (`use_pool`) that buffer is one of a few reused ones (`batch_pool`), not new memory.

    Args:
        source: the samples.
        cfg: the `data` section (image_size, train_crop, min_crop_scale, hflip).
        seed: the run seed; every sample's draws come from (seed, epoch, position).
        views: V views per sample.
        normalise: normalise random_resized views in the dataset (float32 batches), else uint8 batches.
        channels_last: lay batches out in channels_last memory (the resize's own layout).
    """

    def __init__(
        self,
        source: Source,
        cfg: DataConfig,
        seed: int,
        views: int = 1,
        *,
        normalise: Normalisation | None = None,
        channels_last: bool = False,
    ) -> None:
        self.source = source
        self.seed = seed
        self.views = views
        self.image_size = cfg.image_size
        self.train_crop = cfg.train_crop
        self.min_crop_scale, self.hflip = cfg.min_crop_scale, cfg.hflip
        self.normalise = normalise
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.pool: BatchPool | None = None

    def use_pool(self, unique: int, slots: int) -> None:
        """Writes random_resized batches of `unique` samples into `slots` reused shared-memory buffers."""
        shape = (unique * self.views, 3, self.image_size, self.image_size)
        strides = torch.empty(shape, device="meta", memory_format=self.memory_format).stride()
        self.pool = BatchPool(slots, shape, strides, self._dtype())

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[Tensor, int]:
        if self.train_crop == "pad_random":
            image, label = self.source.load(key[2])
            return resized(image, self.image_size), label
        views_V3SS = self._empty(self.views, shared=False)
        return views_V3SS, self.views_into(views_V3SS, key)

    def __getitems__(
        self, keys: list[tuple[int, int, int]]
    ) -> list[tuple[Tensor, int]] | tuple[Tensor | PooledImages, Tensor]:
        """A batch: a list of samples for pad_random (the collate function stacks them); for random_resized the
        finished (images [U*V,3,S,S], labels int64 [U]), the V views of sample u in rows u*V .. u*V+V-1; the
        images are a `PooledImages` when they were written into the slot of the pool that `keys` names."""
        if self.train_crop == "pad_random":
            return [self[key] for key in keys]
        rows = len(keys) * self.views
        pooled = None if self.pool is None else self.pool.buffer(keys, rows)
        images_X3SS = self._empty(rows, shared=get_worker_info() is not None) if pooled is None else pooled
        views = self.views
        labels = [self.views_into(images_X3SS[u * views : (u + 1) * views], key) for u, key in enumerate(keys)]
        return images_X3SS if pooled is None else PooledImages(keys.slot), torch.tensor(labels, dtype=torch.int64)

    def views_into(self, out_V3SS: Tensor, key: tuple[int, int, int]) -> int:
        """Decodes the sample of `key` and writes its V random_resized views into `out_V3SS`; returns its label."""
        epoch, position, index = key
        image, label = self.source.load(index)
        # The position, not the dataset index, seeds the draw: wrapped-around duplicates get their own crops, and a
        # batch is the same whatever the number of workers, the worker that decodes it or a resume.
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, position))
        random_resized_views_into(
            out_V3SS, image, min_crop_scale=self.min_crop_scale, hflip=self.hflip, gen=gen, normalise=self.normalise
        )
        return label

    def _empty(self, rows: int, *, shared: bool) -> Tensor:
        """An uninitialised [rows,3,S,S] buffer (float32 when normalising, else uint8) in the batches' memory format;
        in shared memory when `shared` (a worker's batch then reaches the training process without a copy)."""
        dtype = self._dtype()
        shape = (rows, 3, self.image_size, self.image_size)
        strides = torch.empty(shape, device="meta", memory_format=self.memory_format).stride()
        if not shared:
            return torch.empty_strided(shape, strides, dtype=dtype)
        # What torch's default collate does in a worker: a new shared-memory storage, sent by file descriptor.
        nbytes = math.prod(shape) * dtype.itemsize
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape, strides)

    def _dtype(self) -> torch.dtype:
        return torch.uint8 if self.normalise is None else torch.float32


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
        # Train workers persist across epochs: no start-up per epoch, the dataset pickled once (with its pool).
        pool = getattr(dataset, "pool", None)
        self._decoder = Decoder(dataset, cfg, place, persistent=True, what="train", pool=pool)
        self._pad_random = cfg.train_crop == "pad_random"
        self._views, self._hflip, self._channels_last = place.views_per_image, cfg.hflip, place.channels_last
        # The padding is a zero pixel, normalised exactly as the normaliser computes it (0 * scale - mean / std).
        std_3 = torch.tensor(place.std, dtype=torch.float32)
        self._fill_3 = (-(torch.tensor(place.mean, dtype=torch.float32) / std_3)).to(place.device)

    def epoch_keys(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """This rank's batches of `epoch` as lists of (epoch, position, dataset index) keys."""
        positions_SU = self.rank_positions()
        indices_SU = self.global_order(epoch)[positions_SU]
        return [
            [(epoch, pos, idx) for pos, idx in zip(pos_row, idx_row)]
            for pos_row, idx_row in zip(positions_SU.tolist(), indices_SU.tolist())
        ]

    def _cut_pad_random_views(self, images_U3SS: Tensor, keys: list[tuple[int, int, int]]) -> Tensor:
        """The V pad_random views of each image of a batch, drawn as `TrainSet` would draw them: from (seed, epoch,
        position in the epoch)."""
        draws = [
            pad_random_draws(self._views, self._hflip, torch.Generator().manual_seed(derive_seed(self.seed, e, p)))
            for e, p, _ in keys
        ]
        offsets_UV2 = torch.stack([offsets for offsets, _ in draws])
        flips_UV = torch.stack([flips for _, flips in draws])
        return pad_random_views(images_U3SS, offsets_UV2, flips_UV, self._fill_3, channels_last=self._channels_last)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, start = self.begin_pass()
        # Skipping happens here, on keys: batches before `start` are never decoded.
        keys = self.epoch_keys(epoch)[start:]
        for batch_keys, (images, labels) in zip(keys, _one_line_errors(self._decoder.run(keys, first=start))):
            if self._pad_random:
                images = self._cut_pad_random_views(images, batch_keys)
            self.advance()
            yield images, labels


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
        yield from _one_line_errors(self._decoder.run([list(idx[i : i + size]) for i in range(0, len(idx), size)]))


def train_set(source: Source, cfg: DataConfig, place: Placement) -> TrainSet:
    """The `TrainSet` of a rank: on a CPU device the random_resized views are normalised in the workers, into a
    pool of reused batch buffers.

    There the device is the training process itself: normalising a batch of V views per image there cost it ~0.9 ms
    per view on one thread (docs/BENCHMARKS.md, "Views per copy"), against ~0.2 ms per view in a worker while the
    view is in cache. New shared memory for every batch cost ~0.3 ms per view more in page faults and frees, which
    the pool saves (`batch_pool`). On a GPU the uint8 batch travels (4x fewer bytes), is pinned by the DataLoader and is
    normalised on the device; its batches keep new buffers (a pool slot is not pinned memory).
    """
    cpu = place.device.type == "cpu"
    normalise = Normalisation(place.mean, place.std) if cpu else None
    dataset = TrainSet(
        source, cfg, place.seed, place.views_per_image, normalise=normalise, channels_last=place.channels_last
    )
    if cpu and cfg.train_crop == "random_resized":
        # Enough slots for every batch the DataLoader has in flight, the one it has just delivered and the one the
        # consumer still holds while asking for the next; a batch finding none free gets new memory.
        dataset.use_pool(place.unique_per_rank, slots=cfg.num_workers * PREFETCH_FACTOR + 2)
    return dataset


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
        train=TorchTrainLoader(train_set(train_source, cfg, place), cfg, place),
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
    classes, train, val = folder_tables(cfg.root, cfg.index_dir, rescan=cfg.rescan, first=place.rank == 0)
    return torch_data(cfg, train, val, classes, place)
