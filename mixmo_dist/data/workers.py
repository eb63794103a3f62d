"""DataLoader workers of the torch backend: how they start, how they behave, and how a pass of batches reaches the
device.

Shape legend: B batch rows, S image side.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mixmo_dist.config import DataConfig
from mixmo_dist.runtime.signals import die_with
from mixmo_dist.runtime.startup import STARTUP

from .batch_pool import BatchPool
from .forkserver import GROUP_SIGNALS, worker_context
from .placement import Placement
from .transforms import Normalisation

# Batches each worker prepares ahead (the DataLoader's default, set here so that the train set's pool of batch
# buffers can be sized from it).
PREFETCH_FACTOR = 2


def _collate(items: list[tuple[Tensor, int]] | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Stacks worker outputs ([3,S,S], or V views [V,3,S,S], and a label) into (uint8 [B*V,3,S,S], int64 [B]).

    A tuple is a batch that the dataset's `__getitems__` already wrote into one buffer: it passes unchanged.
    """
    if isinstance(items, tuple):
        return items
    images = torch.stack([image for image, _ in items])
    images_B3SS = images.flatten(0, 1) if images.dim() == 5 else images
    labels_B = torch.tensor([label for _, label in items], dtype=torch.int64)
    return images_B3SS, labels_B


def _worker_init(_worker_id: int) -> None:
    """Per-worker set-up: one intra-op thread, out of the rank's process group, deaf to preemption signals.

    Workers decode one image at a time: intra-op threads would only fight the other workers for cores. torchrun
    forwards a preemption signal to each rank's whole process group, and a worker dying of it would crash its rank
    before the rank can save, so workers leave that group and ignore SIGUSR2/SIGINT. SIGTERM sent to the worker
    itself still ends it (the DataLoader's shutdown and multiprocessing's exit rely on that). A worker's parent is
    the forkserver, not the rank, so torch's parent watchdog cannot see the rank die: the worker asks the kernel for
    SIGKILL when the forkserver dies, and the forkserver dies with the rank (see `forkserver_guard`).
    """
    die_with(os.getppid())
    torch.set_num_threads(1)
    os.setpgid(0, 0)
    for sig in (signal.SIGUSR2, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)


class _DeviceNormalizer:
    """Moves a batch to the device and normalises it there when it is uint8 (4x less host-to-device traffic than
    float32); a float32 batch was normalised by the dataset in the workers (random_resized train views on a CPU
    device, `torch_loader.TrainSet`) and is only moved."""

    def __init__(self, device: torch.device, mean: Sequence[float], std: Sequence[float], channels_last: bool):
        self.device = device
        self.channels_last = channels_last
        self.normalise = Normalisation(mean, std, device)

    def __call__(self, images_B3SS: Tensor, labels_B: Tensor) -> tuple[Tensor, Tensor]:
        images = images_B3SS.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # a no-op when the workers wrote it so
        if images.dtype == torch.uint8:
            images = self.normalise(images)
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
        multiprocessing_context=worker_context() if num_workers > 0 else None,
        persistent_workers=persistent and num_workers > 0,
        prefetch_factor=PREFETCH_FACTOR if num_workers > 0 else None,
        timeout=timeout_s if num_workers > 0 else 0.0,
        # A private generator: the DataLoader draws a base seed per pass, which must not consume the global RNG.
        generator=torch.Generator().manual_seed(0),
    )


class Decoder:
    """Decodes passes of explicit batches of one dataset with worker processes and delivers them to the device.

    Args:
        dataset: a map-style dataset indexed by the keys in the batches, returning (uint8 [3,S,S], label), or with
            a `__getitems__` that returns a whole batch (images uint8, or float32 already normalised; labels).
        cfg: the `data` section: `num_workers` decoding processes (0 decodes in the calling process) and
            `worker_timeout_s`, the longest wait for one batch before `WorkerTimeoutError` (0 waits forever).
        place: where batches go (device, layout, normalisation).
        persistent: keep the workers (and the pickled dataset) from one pass to the next.
        what: the loader's name in error messages ("train" / "val").
        pool: the dataset's pool of batch buffers, if it has one (persistent only): batches are sent with a slot
            of it, and a batch delivered as a slot is turned into a tensor over it.
    """

    def __init__(
        self,
        dataset: Dataset,
        cfg: DataConfig,
        place: Placement,
        *,
        persistent: bool,
        what: str,
        pool: BatchPool | None = None,
    ) -> None:
        # A pass's first request for a batch must come after every batch of the passes before was written, which
        # only persistent workers guarantee (`batch_pool._KeyedPass`).
        assert pool is None or persistent, "a pool of batch buffers needs persistent workers"
        self.dataset = dataset
        self.num_workers = cfg.num_workers
        self.persistent = persistent
        self.timeout_s = float(cfg.worker_timeout_s)
        self.what = what
        self.to_device = _DeviceNormalizer(place.device, place.mean, place.std, place.channels_last)
        self.pool = pool
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
        pool = self.pool
        loader.batch_sampler.batches = batches if pool is None else pool.keyed(batches)
        delivered = 0
        batches_it = iter(loader)
        STARTUP.mark("loader start")  # the workers are started; the first batch is being decoded
        try:
            for images_B3SS, labels_B in batches_it:
                delivered += 1
                yield self.to_device(images_B3SS if pool is None else pool.received(images_B3SS), labels_B)
        except RuntimeError as err:
            if not str(err).startswith(_DATALOADER_TIMEOUT):
                raise
        else:
            return
        # Timed out. Drop every reference to the DataLoader and its iterator (the caught exception's traceback held
        # one) so the iterator is collected now: its shutdown terminates the workers, the stuck one included. The
        # stuck worker may not be gone yet and still writes a slot of the pool: later batches get new buffers.
        self._loader = loader = batches_it = None
        self.pool = None
        raise WorkerTimeoutError(
            f"{self.what} loader: no batch from its {self.num_workers} DataLoader workers within "
            f"data.worker_timeout_s={self.timeout_s:g} s (batch {first + delivered} of the pass); a worker is stuck "
            "or far too slow (a hung file system, a huge image). The workers were stopped. Raise "
            "data.worker_timeout_s for slow storage, or set it to 0 to wait forever."
        )
