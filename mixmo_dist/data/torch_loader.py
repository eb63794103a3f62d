"""The torch backend of the data layer: samples of a `Source` decoded with Pillow in DataLoader workers.

Sources: `PathTable` (image files: ImageNet-layout folders, Tiny ImageNet) and `cifar.CifarSplit` (arrays); every
reader ends in `torch_data`, which builds the same `TrainSet`/`ValSet` and loaders for all of them.

Shape legend: B batch rows, U unique images per rank per step, W world size, S image side.

Train batches are planned at index level: one global permutation per epoch, drawn from (seed, epoch) identically
on every rank and wrapped to a whole number of steps, so every rank yields exactly the same number of batches and a
restore skips batches without decoding them. Each sample's augmentation is drawn from a generator seeded by
(seed, epoch, position in the epoch), so a batch does not depend on the number of workers, on which worker decoded
it, or on whether the run was interrupted.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import multiprocessing.context
import os
import signal
import struct
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .folder import load_rgb, scan_split

if TYPE_CHECKING:
    from . import Data

TRAIN_CROPS = ("random_resized", "pad_random")
# RandomResizedCrop's aspect-ratio range and number of tries before its centre-crop fallback (torchvision's).
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_RRC_TRIES = 10
# CIFAR-style augmentation: zero padding on each side before a random crop of the original size.
_PAD = 4
_FORKSERVER_LOCK = threading.Lock()
_forkserver_started = False


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (a hash, so nearby tuples give unrelated streams)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochPlan:
    """Index-level plan of the train epochs of one rank, with the position inside the current epoch.

    Every epoch is one permutation of the N samples drawn from (seed, epoch), the same on every rank, wrapped
    around to `steps * W * U` positions with `steps = ceil(N / (W * U))`. Global step s covers positions
    [s*W*U, (s+1)*W*U); rank r takes the r-th run of U positions in it, so the ranks' parts are disjoint and a
    global step holds the same images whatever W is, for a fixed W*U.

    Position semantics: `state_dict()["batch"]` counts the batches of epoch `state_dict()["epoch"]` already
    yielded. `set_epoch(e)` moves to the start of epoch e unless e is the current epoch (then it keeps the
    position, so a trainer may call it right after `load_state_dict`). Iterating a finished epoch starts the next.
    """

    def __init__(self, num_samples: int, *, unique_per_rank: int, rank: int, world_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"cannot train on an empty dataset (num_samples={num_samples})")
        if unique_per_rank < 1:
            raise ValueError(f"unique_per_rank must be >= 1, got {unique_per_rank}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of size {world_size}")
        self.num_samples = num_samples
        self.unique_per_rank = unique_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps = math.ceil(num_samples / (world_size * unique_per_rank))
        self._epoch = 0
        self._batch = 0

    def __len__(self) -> int:
        return self.steps

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of `epoch`; a no-op when `epoch` is the current one (keeps a restored position)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._batch = 0

    def state_dict(self) -> dict[str, int]:
        """JSON-able position: {"epoch": e, "batch": batches of epoch e already yielded}."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by `state_dict`; the next batch yielded is the one that would have come next."""
        if not isinstance(state, dict) or set(state) != {"epoch", "batch"}:
            raise ValueError(f"data state must be a dict with keys 'epoch' and 'batch', got {state!r}")
        epoch, batch = state["epoch"], state["batch"]
        for key, value in (("epoch", epoch), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data state {key!r} must be a non-negative int, got {value!r}")
        if batch > self.steps:
            raise ValueError(
                f"data state batch={batch} exceeds the {self.steps} batches per epoch of this run "
                "(was the checkpoint written with another world size, batch size or dataset?)"
            )
        self._epoch, self._batch = epoch, batch

    def global_order(self, epoch: int) -> Tensor:
        """int64 [steps*W*U] dataset index at each position of `epoch` (the permutation, wrapped around)."""
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        perm_N = torch.randperm(self.num_samples, generator=gen)
        total = self.steps * self.world_size * self.unique_per_rank
        # Modulo rather than one extra copy: with a tiny dataset the padding can exceed N.
        return perm_N[torch.arange(total) % self.num_samples]

    def rank_positions(self) -> Tensor:
        """int64 [steps, U] positions in the epoch's global order that this rank reads at each step."""
        width = self.world_size * self.unique_per_rank
        steps_S1 = torch.arange(self.steps).unsqueeze(1) * width
        return steps_S1 + self.rank * self.unique_per_rank + torch.arange(self.unique_per_rank)

    def _begin_pass(self) -> tuple[int, int]:
        """(epoch, first batch) of the pass about to start; a finished epoch rolls over to the next one."""
        if self._batch >= self.steps:
            self._epoch += 1
            self._batch = 0
        return self._epoch, self._batch


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


def random_resized_crop_box(
    height: int, width: int, min_scale: float, gen: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (torchvision's sampling rule), drawn from `gen`.

    Area fraction ~ U(min_scale, 1), log aspect ratio ~ U(log 3/4, log 4/3); after 10 boxes that do not fit,
    a centre crop of the whole image clamped to the ratio range.

    Returns:
        (top, left, box_height, box_width) in pixels.
    """
    area = height * width
    log_lo, log_hi = math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1])
    for _ in range(_RRC_TRIES):
        u_2 = torch.rand(2, generator=gen, dtype=torch.float64).tolist()
        target_area = area * (min_scale + (1.0 - min_scale) * u_2[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_2[1])
        box_w = round(math.sqrt(target_area * aspect))
        box_h = round(math.sqrt(target_area / aspect))
        if 0 < box_w <= width and 0 < box_h <= height:
            top = int(torch.randint(0, height - box_h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - box_w + 1, (1,), generator=gen))
            return top, left, box_h, box_w
    in_ratio = width / height
    if in_ratio < _RRC_RATIO[0]:
        box_w, box_h = width, round(width / _RRC_RATIO[0])
    elif in_ratio > _RRC_RATIO[1]:
        box_h, box_w = height, round(height * _RRC_RATIO[1])
    else:
        box_h, box_w = height, width
    return (height - box_h) // 2, (width - box_w) // 2, box_h, box_w


def _to_uint8_chw(img: Image.Image) -> Tensor:
    """RGB Pillow image -> uint8 [3,H,W] tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def train_transform(
    img: Image.Image, *, image_size: int, train_crop: str, min_crop_scale: float, hflip: bool, gen: torch.Generator
) -> Tensor:
    """Train augmentation of one RGB image; every random draw comes from `gen`.

    random_resized: RandomResizedCrop(scale=(min_crop_scale, 1)) resized to S x S (bilinear, antialiased).
    pad_random: resize to S x S, zero-pad 4 px, random S x S crop (CIFAR style).
    Then a horizontal flip with probability 1/2 when `hflip`.

    Returns:
        uint8 [3,S,S].
    """
    size = (image_size, image_size)
    if train_crop == "random_resized":
        top, left, box_h, box_w = random_resized_crop_box(img.height, img.width, min_crop_scale, gen)
        # Pillow's bilinear filter widens its support when downscaling, i.e. it antialiases.
        img = img.resize(size, Image.Resampling.BILINEAR, box=(left, top, left + box_w, top + box_h))
        image_3SS = _to_uint8_chw(img)
    else:
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        padded_3PP = torch.zeros(3, image_size + 2 * _PAD, image_size + 2 * _PAD, dtype=torch.uint8)
        padded_3PP[:, _PAD : _PAD + image_size, _PAD : _PAD + image_size] = _to_uint8_chw(img)
        top, left = torch.randint(0, 2 * _PAD + 1, (2,), generator=gen).tolist()
        image_3SS = padded_3PP[:, top : top + image_size, left : left + image_size].contiguous()
    if hflip and bool(torch.rand((), generator=gen) < 0.5):
        image_3SS = image_3SS.flip(2)
    return image_3SS


def val_transform(img: Image.Image, *, image_size: int, resize_ratio: float) -> Tensor:
    """Resize the shorter side to round(S / resize_ratio) (bilinear, antialiased), then centre-crop S x S.

    Returns:
        uint8 [3,S,S].
    """
    short = round(image_size / resize_ratio)
    width, height = img.size
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return _to_uint8_chw(img.crop((left, top, left + image_size, top + image_size)))


class TrainSet(Dataset):
    """Decodes and augments train samples of a `Source`; a key is (epoch, position in the epoch, source index)."""

    def __init__(
        self, source: Source, *, seed: int, image_size: int, train_crop: str, min_crop_scale: float, hflip: bool
    ) -> None:
        self.source = source
        self.seed = seed
        self.transform = dict(image_size=image_size, train_crop=train_crop, min_crop_scale=min_crop_scale, hflip=hflip)

    @classmethod
    def from_cfg(cls, source: Source, cfg: Any, seed: int) -> TrainSet:
        """The train set of the DataConfig section `cfg` (image_size, train_crop, min_crop_scale, hflip)."""
        return cls(
            source,
            seed=seed,
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
        gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, position))
        return train_transform(image, gen=gen, **self.transform), label


class ValSet(Dataset):
    """Decodes val samples of a `Source` with the deterministic resize + centre crop."""

    def __init__(self, source: Source, *, image_size: int, resize_ratio: float) -> None:
        self.source = source
        self.image_size = image_size
        self.resize_ratio = resize_ratio

    @classmethod
    def from_cfg(cls, source: Source, cfg: Any) -> ValSet:
        """The val set of the DataConfig section `cfg` (image_size, val_resize_ratio)."""
        return cls(source, image_size=cfg.image_size, resize_ratio=cfg.val_resize_ratio)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.source.load(index)
        return val_transform(image, image_size=self.image_size, resize_ratio=self.resize_ratio), label


def _collate(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """Stacks worker outputs into (uint8 [B,3,S,S], int64 [B])."""
    images_B3SS = torch.stack([image for image, _ in items])
    labels_B = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images_B3SS, labels_B


# Signals a launcher sends to a rank's whole process group: workers must not die of them (see `_worker_init`).
_GROUP_SIGNALS = (signal.SIGUSR2, signal.SIGINT, signal.SIGTERM)


def _worker_context() -> multiprocessing.context.BaseContext:
    """The start method of DataLoader workers: a forkserver, started once per process with `_GROUP_SIGNALS` blocked.

    Forking the rank itself is unsafe: by the time workers start it runs other threads (DALI executors, OpenMP
    pools, gloo/NCCL, pin-memory), and a lock one of them held at the fork stays held forever in the child. A worker
    that deadlocks that way looks alive, so the DataLoader waits for it forever; it was seen once here, in CI. The
    forkserver is a fresh single-threaded interpreter that imports this module once (so forking a worker from it
    is cheap), and every worker is forked from it. It inherits the blocked signal mask through exec, so neither it
    nor a newly forked worker can be killed by a preemption signal aimed at the rank's process group; the rank
    itself gets the signal (another of its threads takes it, or the main thread once the mask is restored).
    """
    from multiprocessing import forkserver

    global _forkserver_started
    with _FORKSERVER_LOCK:
        if not _forkserver_started:
            multiprocessing.set_forkserver_preload([__name__])
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _GROUP_SIGNALS)
            try:
                forkserver.ensure_running()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            _forkserver_started = True
    return multiprocessing.get_context("forkserver")


def _worker_init(_worker_id: int) -> None:
    """Per-worker set-up: one intra-op thread, out of the rank's process group, deaf to preemption signals.

    Workers decode one image at a time: intra-op threads would only fight the other workers for cores. torchrun
    forwards a preemption signal to each rank's whole process group, and a worker dying of it would crash its rank
    before the rank can save, so workers leave that group and ignore SIGUSR2/SIGINT. SIGTERM sent to the worker
    itself still ends it (the DataLoader's shutdown and multiprocessing's exit rely on that), and a worker whose
    rank dies notices through the DataLoader's parent watchdog (the forkserver exits with the rank).
    """
    torch.set_num_threads(1)
    os.setpgid(0, 0)
    for sig in (signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _GROUP_SIGNALS)


class _DeviceNormalizer:
    """Moves a uint8 batch to the device and normalises it there (4x less host-to-device traffic than float32)."""

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float], channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        std_3 = torch.tensor(std, dtype=torch.float32)
        # x_norm = (x/255 - mean) / std = x * scale - shift
        self.scale_1311 = (1.0 / (255.0 * std_3)).view(1, 3, 1, 1).to(device)
        self.shift_1311 = (torch.tensor(mean, dtype=torch.float32) / std_3).view(1, 3, 1, 1).to(device)

    def __call__(self, images_B3SS: Tensor, labels_B: Tensor) -> tuple[Tensor, Tensor]:
        images = images_B3SS.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        images = images.float().mul_(self.scale_1311).sub_(self.shift_1311)
        return images, labels_B.to(self.device, non_blocking=True)


class _Batches:
    """A batch sampler whose batches are replaced before each pass, so one DataLoader (and its workers) serves all."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class WorkerTimeoutError(RuntimeError):
    """No batch came from the DataLoader workers within `data.worker_timeout_s`."""


# The message DataLoader raises when its `timeout` expires (torch/utils/data/dataloader.py, stable since 1.0).
_DATALOADER_TIMEOUT = "DataLoader timed out after"


def _make_loader(dataset: Dataset, *, num_workers: int, pin: bool, persistent: bool, timeout_s: float) -> DataLoader:
    """A DataLoader over explicit batches of keys, set per pass in its `batch_sampler.batches`.

    The plan decides the order, not the DataLoader. Persistent workers are started once and pickle the dataset
    once (an in-memory CIFAR split included), not at every epoch. With workers, waiting for one batch longer than
    `timeout_s` (> 0) is an error instead of a hang.
    """
    return DataLoader(
        dataset,
        batch_sampler=_Batches(),
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin,
        worker_init_fn=_worker_init,
        multiprocessing_context=_worker_context() if num_workers > 0 else None,
        persistent_workers=persistent and num_workers > 0,
        timeout=timeout_s if num_workers > 0 else 0.0,
        # A private generator: the DataLoader draws a base seed per pass, which must not consume the global RNG.
        generator=torch.Generator().manual_seed(0),
    )


class _Decoder:
    """Decodes passes of explicit batches of one dataset with worker processes and delivers them to the device.

    Args:
        dataset: a map-style dataset indexed by the keys in the batches, returning (uint8 [3,S,S], label).
        num_workers: decoding processes (0 decodes in the calling process).
        persistent: keep the workers (and the pickled dataset) from one pass to the next.
        timeout_s: longest wait for one batch from the workers before `WorkerTimeoutError`; 0 waits forever.
        what: the loader's name in error messages ("train" / "val").
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        num_workers: int,
        persistent: bool,
        timeout_s: float,
        what: str,
        device: torch.device,
        channels_last: bool,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"data.num_workers must be a non-negative int, got {num_workers!r}")
        if not timeout_s >= 0:
            raise ValueError(f"data.worker_timeout_s must be >= 0 (0 waits forever), got {timeout_s!r}")
        self.dataset = dataset
        self.num_workers = num_workers
        self.persistent = persistent
        self.timeout_s = float(timeout_s)
        self.what = what
        self.to_device = _DeviceNormalizer(device, mean, std, channels_last)
        self._loader: DataLoader | None = None

    def run(self, batches: list[list[Any]], *, first: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yields the normalised device batches of `batches`; `first` is the index of batches[0] in its pass."""
        loader = self._loader
        if loader is None:
            loader = _make_loader(
                self.dataset,
                num_workers=self.num_workers,
                pin=self.to_device.device.type == "cuda",
                persistent=self.persistent,
                timeout_s=self.timeout_s,
            )
            if self.persistent:
                self._loader = loader
        loader.batch_sampler.batches = batches
        delivered = 0
        batches_it = iter(loader)
        try:
            for images_B3SS, labels_B in batches_it:
                delivered += 1
                yield self.to_device(images_B3SS, labels_B)
        except RuntimeError as err:
            if not str(err).startswith(_DATALOADER_TIMEOUT):
                raise
        else:
            return
        # Timed out. Drop every reference to the DataLoader and its iterator (the caught exception's traceback held
        # one) so the iterator is collected now: its shutdown terminates the workers, the stuck one included.
        self._loader = loader = batches_it = None
        raise WorkerTimeoutError(
            f"{self.what} loader: no batch from its {self.num_workers} DataLoader workers within "
            f"data.worker_timeout_s={self.timeout_s:g} s (batch {first + delivered} of the pass); a worker is stuck "
            "or far too slow (a hung file system, a huge image). The workers were stopped. Raise "
            "data.worker_timeout_s for slow storage, or set it to 0 to wait forever."
        )


class TorchTrainLoader(EpochPlan):
    """Train batches (images float32 [U,3,S,S] normalised on `device`, labels int64 [U]) of one rank.

    Args:
        dataset: a `TrainSet` (or any dataset taking (epoch, position, index) keys).
        worker_timeout_s: longest wait for one batch from the workers (0: forever).
        the rest: see `EpochPlan` and `_Decoder`.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        unique_per_rank: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int,
        device: torch.device,
        channels_last: bool,
        mean: Sequence[float],
        std: Sequence[float],
        worker_timeout_s: float = 0.0,
    ) -> None:
        super().__init__(len(dataset), unique_per_rank=unique_per_rank, rank=rank, world_size=world_size, seed=seed)
        # Train workers persist across epochs: no start-up per epoch, the dataset pickled once.
        self._decoder = _Decoder(
            dataset,
            num_workers=num_workers,
            persistent=True,
            timeout_s=worker_timeout_s,
            what="train",
            device=device,
            channels_last=channels_last,
            mean=mean,
            std=std,
        )

    @classmethod
    def from_cfg(cls, source: Source, cfg: Any, *, unique_per_rank: int, seed: int, **place: Any) -> TorchTrainLoader:
        """The train loader of `source` with the DataConfig section `cfg`.

        `place`: rank, world_size, device, channels_last, mean, std.
        """
        dataset = TrainSet.from_cfg(source, cfg, seed)
        workers = dict(num_workers=cfg.num_workers, worker_timeout_s=cfg.worker_timeout_s)
        return cls(dataset, unique_per_rank=unique_per_rank, seed=seed, **workers, **place)

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
    """Val batches of one rank: samples rank::world_size of `dataset`, in order, no padding, last batch short."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        device: torch.device,
        channels_last: bool,
        mean: Sequence[float],
        std: Sequence[float],
        worker_timeout_s: float = 0.0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"val_batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of size {world_size}")
        self._indices = range(rank, len(dataset), world_size)
        self._batch_size = batch_size
        # Val workers live for one pass: keeping them would double the idle worker processes of every rank.
        self._decoder = _Decoder(
            dataset,
            num_workers=num_workers,
            persistent=False,
            timeout_s=worker_timeout_s,
            what="val",
            device=device,
            channels_last=channels_last,
            mean=mean,
            std=std,
        )

    @classmethod
    def from_cfg(cls, source: Source, cfg: Any, *, batch_size: int, **place: Any) -> TorchValLoader:
        """The val loader of `source` with the DataConfig section `cfg`.

        `place`: rank, world_size, device, channels_last, mean, std.
        """
        workers = dict(num_workers=cfg.num_workers, worker_timeout_s=cfg.worker_timeout_s)
        return cls(ValSet.from_cfg(source, cfg), batch_size=batch_size, **workers, **place)

    @property
    def num_samples(self) -> int:
        """Samples this rank evaluates."""
        return len(self._indices)

    def __len__(self) -> int:
        return math.ceil(len(self._indices) / self._batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx, size = self._indices, self._batch_size
        yield from self._decoder.run([list(idx[i : i + size]) for i in range(0, len(idx), size)])


def _check_cfg(cfg: Any) -> None:
    """Refuses data settings this backend cannot honour, naming the config key."""
    if cfg.train_crop not in TRAIN_CROPS:
        raise ValueError(f"data.train_crop must be one of {TRAIN_CROPS}, got {cfg.train_crop!r}")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 1:
        raise ValueError(f"data.image_size must be a positive int, got {cfg.image_size!r}")
    if not 0.0 < cfg.min_crop_scale <= 1.0:
        raise ValueError(f"data.min_crop_scale must be in (0, 1], got {cfg.min_crop_scale!r}")
    if not 0.0 < cfg.val_resize_ratio <= 1.0:
        raise ValueError(f"data.val_resize_ratio must be in (0, 1], got {cfg.val_resize_ratio!r}")


def torch_data(
    cfg: Any,
    train_source: Source,
    val_source: Source,
    classes: list[str],
    *,
    unique_per_rank: int,
    val_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    channels_last: bool,
    mean: Sequence[float],
    std: Sequence[float],
) -> Data:
    """The torch backend's `Data` over two sources, with the settings of the DataConfig section `cfg`.

    Every reader served by this backend (image folders, Tiny ImageNet, CIFAR) ends here, so plans, augmentation
    seeding, resume, sharding and worker handling are the same for all of them.
    """
    from . import Data

    _check_cfg(cfg)
    place = dict(rank=rank, world_size=world_size, device=device, channels_last=channels_last, mean=mean, std=std)
    train = TorchTrainLoader.from_cfg(train_source, cfg, unique_per_rank=unique_per_rank, seed=seed, **place)
    val = TorchValLoader.from_cfg(val_source, cfg, batch_size=val_batch_size, **place)
    return Data(
        train=train,
        val=val,
        classes=classes,
        mean=tuple(mean),
        std=tuple(std),
        num_train=len(train_source),
        num_val=len(val_source),
        backend="torch",
    )


def build_torch_data(cfg: Any, **placement: Any) -> Data:
    """Builds the torch backend for an ImageNet-layout folder `cfg.root` (train/ and val/ splits).

    Args:
        cfg: the DataConfig section.
        placement: unique_per_rank, val_batch_size, rank, world_size, seed, device, channels_last, mean, std
            (see `mixmo_dist.data.build_data`).
    """
    _check_cfg(cfg)
    classes, train_samples = scan_split(cfg.root, "train")
    _, val_samples = scan_split(cfg.root, "val", classes)
    return torch_data(cfg, PathTable(train_samples), PathTable(val_samples), classes, **placement)
