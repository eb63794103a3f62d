"""The DALI loading backend: JPEG decoding and augmentation in DALI pipelines (GPU "mixed" decoding or CPU only).

One pipeline definition serves training and validation on both devices; `build_dali_data` wraps it into the
`Data` contract of `mixmo_dist.data` (exact batches per epoch, exact validation, resumable position).

How the training order is made (and why it is not DALI's own shuffle):
    The order is the torch backend's: `data/plan.py`'s `EpochPlan` (one global permutation per epoch from (seed,
    epoch), the same on every rank, wrapped to whole global steps; rank r reads the r-th run of U positions of
    every global step). Each epoch, a fresh pipeline reads this rank's list of the epoch's samples in that order
    (`num_shards=1`: the plan already chose the rank's share). DALI's own options were checked and rejected:
    `random_shuffle` only shuffles a 1024-sample window, and `shuffle_after_epoch`'s order is hidden inside DALI.
    Owning the order makes both backends read the same samples at the same global step, whatever the world size
    (for a fixed global batch), so a run can resume on another number of ranks; it spreads the padding over
    different samples every epoch, and tells us exactly which files a failing batch held. The price is one
    pipeline build per epoch (milliseconds on CPU).

Corrupt files: a file DALI cannot decode raises `CorruptImageError` naming it. DALI, like libjpeg-turbo, decodes
some damaged JPEGs without complaint (a file cut near its end comes out with grey rows), where the torch backend's
Pillow refuses them; check a dataset with the torch backend or Pillow to catch those.

Shape legend: B batch, C=3 channels, H=W=image_size.
"""

from __future__ import annotations

import base64
import logging
import math
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, DALIRaggedIterator, LastBatchPolicy
from torch.multiprocessing.reductions import StorageWeakRef

from mixmo_dist.config import DataConfig
from mixmo_dist.data import Data
from mixmo_dist.data.folder import CorruptImageError, load_rgb, unreadable_image
from mixmo_dist.data.index import PathTable, folder_tables
from mixmo_dist.data.placement import Placement
from mixmo_dist.data.plan import EpochPlan
from mixmo_dist.data.transforms import Normalisation, pad_random_views, resized_view_into
from mixmo_dist.runtime.seeds import derive_seed

__all__ = ["DaliTrainLoader", "DaliValLoader", "build_dali_data"]

log = logging.getLogger("mixmo_dist")

_READER = "Reader"
_OUTPUTS = ["images", "index"]
# Random-crop decoding tries this many (area, aspect) draws before falling back to the whole image (torchvision: 10).
_CROP_ATTEMPTS = 10
# pad_random pads this many pixels on every side before the random crop (the CIFAR recipe).
_PAD = 4
# Reused output buffers of the CPU views per copy: the consumer's batch, the next one, and one more in hand.
_VIEW_SLOTS = 3
_GRAPH_DALI_VIEWS = "dali-views"  # every graph but the next one
_GRAPH_TORCH_VIEWS = "torch-views"  # random_resized views per copy on the CPU: DALI's draws, torch's resize
_STATE_FORMAT = "mixmo_dist.dali/2"
_STATE_FORMAT_1 = "mixmo_dist.dali/1"  # before the shared epoch plan: resumable at its batch, not bit-exactly


@dataclass(frozen=True, kw_only=True)
class _Augment:
    """Everything the pipeline graph depends on besides the file list (one per `build_dali_data` call)."""

    image_size: int
    train_crop: str
    min_crop_scale: float
    hflip: bool
    val_resize: int
    mean_255: tuple[float, float, float]
    std_255: tuple[float, float, float]
    channels_last: bool
    gpu: bool
    views: int = 1
    """V augmented views of every train sample (`Placement.views_per_image`)."""
    views_in_dali: bool = False
    """random_resized with V > 1: resized by DALI (the GPU's graph), else by torch from DALI's draws (the CPU's)."""


@pipeline_def(enable_checkpointing=True)
def _image_pipeline(*, files: list[str], indices: list[int], shard_id: int, num_shards: int, training: bool, aug):
    """The one DALI graph: read, decode (+ random crop / flip in training), resize, normalise.

    Labels given to the reader are indices into the dataset's sample list, not classes: the wrapper maps them to
    classes, and they tell tests and error messages exactly which file every row came from.

    In training every sample is decoded once and gives `aug.views` views (V), each with its own random crop and
    flip. With V = 1 the graph is the single-view one (ROI decoding for random_resized).

    Returns:
        images: float32, [B,H,W,C] when aug.channels_last else [B,C,H,W] (V > 1 in training: [B,V,H,W,C] /
            [B,V,C,H,W]); on the GPU when aug.gpu.
        index: int32 [B,1] sample indices (CPU); [B,1+3V] for pad_random with V > 1: then (top, left, flip) of
            every view follow the index; [B,1+5V] for random_resized with V > 1 on the CPU, whose images are then
            the decoded ones (`_cpu_view_draws`).
    """
    decoder_device = "mixed" if aug.gpu else "cpu"
    # The order is ours (see the module docstring): no shuffling and no shard rotation inside DALI. Shards are
    # already equal, so pad_last_batch only matters for validation, where the iterator drops the padded rows.
    jpegs, index = fn.readers.file(
        files=files,
        labels=indices,
        name=_READER,
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=False,
        stick_to_shard=True,
        pad_last_batch=True,
    )
    if not training:
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=aug.val_resize, interp_type=types.INTERP_LINEAR, antialias=True)
        return _normalise(images, aug, crop_pos=(0.5, 0.5), mirror=0), index
    if aug.train_crop == "pad_random" and aug.views > 1:
        # One view per copy of CIFAR-style crops: the resized image once, and the views' (top, left, flip) draws
        # appended to the sample's index ([1 + 3V]); the loader cuts the V views on the device in one gather
        # (`transforms.pad_random_views`). V crop_mirror_normalize ops per sample made the loader ~3x slower.
        images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
        size = aug.image_size
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
        offsets = fn.random.uniform(values=list(range(2 * _PAD + 1)), shape=(aug.views, 2), dtype=types.INT32)
        flips = fn.random.coin_flip(probability=0.5 if aug.hflip else 0.0, shape=(aug.views, 1), dtype=types.INT32)
        draws = fn.reshape(fn.cat(offsets, flips, axis=1), shape=(3 * aug.views,))
        return _normalise(images, aug, crop_pos=(0.5, 0.5), mirror=0), fn.cat(index, draws, axis=0)
    views = _train_views(jpegs, aug, decoder_device)
    if isinstance(views, tuple):  # random_resized views per copy on the CPU: the draws follow the index
        images, draws = views
        return images, fn.cat(index, draws, axis=0)
    return views, index


def _train_views(jpegs, aug: _Augment, decoder_device: str):
    """The `aug.views` normalised train views of each sample of `jpegs`: a DALI data node of [H,W,C] / [C,H,W]
    samples with V = 1, [V,H,W,C] / [V,C,H,W] with V > 1."""
    size = aug.image_size
    if aug.train_crop == "random_resized":
        if aug.views == 1:
            # ROI decoding: only the sampled window is decoded, which is most of DALI's edge on the CPU.
            window = fn.decoders.image_random_crop(
                jpegs,
                device=decoder_device,
                output_type=types.RGB,
                random_area=(aug.min_crop_scale, 1.0),
                random_aspect_ratio=(3 / 4, 4 / 3),
                num_attempts=_CROP_ATTEMPTS,
            )
            crops = [fn.resize(window, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)]
        elif not aug.views_in_dali:
            return _cpu_view_draws(jpegs, aug)
        else:
            # One view per copy: decode the whole image once, then one random window per view (an ROI decode per
            # view would decode the image V times; docs/DESIGN.md has the measurement).
            decoded = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
            crops = [
                fn.random_resized_crop(
                    decoded,
                    size=(size, size),
                    random_area=(aug.min_crop_scale, 1.0),
                    random_aspect_ratio=(3 / 4, 4 / 3),
                    num_attempts=_CROP_ATTEMPTS,
                    interp_type=types.INTERP_LINEAR,
                    antialias=True,
                )
                for _ in range(aug.views)
            ]
            # Each uint8 view flipped on its own coin, the V views stacked as a sequence, then one normalisation of
            # the whole sequence (crop_mirror_normalize refuses a per-frame mirror): the same pixels, bit for bit,
            # as normalising each view with its mirror and stacking the float views, for ~7% less CPU per image
            # (the float stack copied 600 KB per 224 px view, the uint8 one 150 KB).
            if aug.hflip:
                crops = [fn.flip(crop, horizontal=_flip(aug), vertical=0) for crop in crops]
            return _normalise(fn.stack(*crops, axis_name="F"), aug, crop_pos=(0.5, 0.5), mirror=0, sequence=True)
        return _normalise(crops[0], aug, crop_pos=(0.5, 0.5), mirror=_flip(aug))
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
    # Zero (black) padding before normalisation, as torchvision's RandomCrop(padding=4) on the decoded image.
    padded = size + 2 * _PAD
    images = fn.crop(images, crop=(padded, padded), out_of_bounds_policy="pad", fill_values=0)
    # An integer offset in 0..2*PAD, each equally likely: crop_pos * (padded - size) is then exactly that offset.
    # (V > 1 never comes here: `_image_pipeline` appends those views' draws to the index instead.)
    offsets = list(range(2 * _PAD + 1))
    crop_pos_x = fn.random.uniform(values=offsets, dtype=types.FLOAT) / float(2 * _PAD)
    crop_pos_y = fn.random.uniform(values=offsets, dtype=types.FLOAT) / float(2 * _PAD)
    return _normalise(images, aug, crop_pos=(crop_pos_x, crop_pos_y), mirror=_flip(aug))


def _cpu_view_draws(jpegs, aug: _Augment):
    """One random_resized view per copy on the CPU: the decoded images and every view's draws, for the loader to
    resize (`_Batches._cpu_views`).

    DALI's CPU resize costs ~1.0 ms per 224 px view here, with or without antialiasing (0.76), against 0.27 ms for
    torch's antialiased bilinear uint8 kernel, the torch backend's; 8 views in DALI were 5.2x the shared view's
    loader time (docs/BENCHMARKS.md). So DALI decodes each image once and draws the V windows
    (`random_crop_generator`: RandomResizedCrop's area and aspect draws, 10 attempts, then the centred fallback) and
    the V flips from its checkpointed generators, and the loader resizes with torch on `dali_threads` threads.

    Returns:
        (images: the decoded uint8 [H,W,3] of every sample, each its own size (`DALIRaggedIterator`),
         draws: int32 [5V]: (top, left, height, width) of every view, then its V flips).
    """
    decoded = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
    size_2 = decoded.shape(dtype=types.INT32)[0:2]
    draws = []
    for _ in range(aug.views):
        anchor, shape = fn.random_crop_generator(
            size_2,
            random_area=(aug.min_crop_scale, 1.0),
            random_aspect_ratio=(3 / 4, 4 / 3),
            num_attempts=_CROP_ATTEMPTS,
        )
        draws += [fn.cast(anchor, dtype=types.INT32), fn.cast(shape, dtype=types.INT32)]
    flips = fn.random.coin_flip(probability=0.5 if aug.hflip else 0.0, shape=(aug.views,), dtype=types.INT32)
    return decoded, fn.cat(*draws, flips, axis=0)


def _flip(aug: _Augment):
    """A per-sample coin for a horizontal flip (0 = never when flips are off)."""
    return fn.random.coin_flip(probability=0.5) if aug.hflip else 0


def _normalise(images, aug: _Augment, *, crop_pos, mirror, sequence: bool = False):
    """Crop to image_size at `crop_pos`, mirror, normalise to float32 in the layout the loader delivers; with
    `sequence`, every frame of [F,H,W,C] samples alike."""
    size = aug.image_size
    frames = "F" if sequence else ""
    return fn.crop_mirror_normalize(
        images,
        crop=(size, size),
        crop_pos_x=crop_pos[0],
        crop_pos_y=crop_pos[1],
        mirror=mirror,
        mean=list(aug.mean_255),
        std=list(aug.std_255),
        dtype=types.FLOAT,
        # HWC rows are what channels_last means physically; the wrapper only permutes the view.
        output_layout=frames + ("HWC" if aug.channels_last else "CHW"),
    )


def _on_threads(work: Callable[[int], None], count: int, threads: int) -> None:
    """`work(i)` for i in 0..count-1 on `threads` threads (this one and threads - 1 daemon threads started here,
    which a process exit does not wait for), each taking the next i; raises the first failure after all have ended.
    """
    following = itertools.count()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            while (i := next(following)) < count and not failures:
                work(i)
        except BaseException as err:  # noqa: BLE001  (raised again in the calling thread)
            failures.append(err)

    helpers = [threading.Thread(target=run, name="mixmo-dali-views", daemon=True) for _ in range(threads - 1)]
    for helper in helpers:
        helper.start()
    run()
    for helper in helpers:
        helper.join()
    if failures:
        raise failures[0]


class _Batches:
    """Shared machinery of both loaders: one DALI iterator, tensor conversion and naming a corrupt file."""

    def __init__(
        self,
        *,
        table: PathTable,
        aug: _Augment,
        batch_size: int,
        rank: int,
        world_size: int,
        threads: int,
        prefetch: int,
        device: torch.device,
    ) -> None:
        # The shared file table (memory-mapped from the dataset index): each epoch's pipeline gets a list of this
        # rank's files only, never one of the whole split.
        self._paths = table.paths
        # index -> class, on the device, so the label lookup happens where the labels are consumed.
        self._class_of_N = torch.as_tensor(np.array(table.labels()), dtype=torch.int64, device=device)
        self._aug = aug
        self._batch_size = batch_size
        self._rank = rank
        self._world_size = world_size
        self._threads = threads
        self._prefetch = prefetch
        self._device = device
        self._device_id = (
            (device.index if device.index is not None else torch.cuda.current_device()) if aug.gpu else None
        )
        self._normalisation: Normalisation | None = None  # for CPU views per copy
        self._cpu_views_per_copy = aug.train_crop == "random_resized" and aug.views > 1 and not aug.views_in_dali
        # Which graph a DALI checkpoint in this loader's state belongs to (states without the key: the DALI one).
        self._graph = _GRAPH_TORCH_VIEWS if self._cpu_views_per_copy else _GRAPH_DALI_VIEWS
        self._view_slots: list[list] = []  # [buffer, its numpy array, weak reference to the delivered alias]

    @property
    def paths(self) -> Sequence[str]:
        """The split's sample paths; `iter_with_indices` yields indices into this list."""
        return self._paths

    def _make_iterator(
        self,
        files_idx: Sequence[int],
        *,
        training: bool,
        seed: int,
        policy,
        checkpoint: bytes | None = None,
        sharded: bool = True,
    ) -> DALIGenericIterator:
        """Builds a pipeline over `files_idx` (indices into the sample list) and its PyTorch iterator.

        `sharded`: DALI splits the list into world_size contiguous shards and reads this rank's (validation);
        otherwise the list is this rank's already (training: the epoch plan chose it).
        """
        pipe = _image_pipeline(
            files=[self._paths[i] for i in files_idx],
            indices=[int(i) for i in files_idx],
            shard_id=self._rank if sharded else 0,
            num_shards=self._world_size if sharded else 1,
            training=training,
            aug=self._aug,
            batch_size=self._batch_size,
            num_threads=self._threads,
            device_id=self._device_id,
            seed=seed,
            prefetch_queue_depth=self._prefetch,
            checkpoint=checkpoint,
        )
        # prepare_first_batch=False: building must not decode (a corrupt first batch would then escape the
        # diagnosis in _next, and a restored pipeline must not run ahead of its checkpoint).
        if training and self._cpu_views_per_copy:
            # Decoded images of different sizes: a list of them per batch (DALI's `pad` to one batch tensor cost
            # ~1.0 ms of CPU per image, as much as the decode).
            return DALIRaggedIterator(
                [pipe],
                _OUTPUTS,
                output_types=[DALIRaggedIterator.SPARSE_LIST_TAG, DALIRaggedIterator.DENSE_TAG],
                reader_name=_READER,
                last_batch_policy=policy,
                auto_reset=False,
                prepare_first_batch=False,
            )
        return DALIGenericIterator(
            [pipe],
            _OUTPUTS,
            reader_name=_READER,
            last_batch_policy=policy,
            auto_reset=False,
            prepare_first_batch=False,
        )

    def _convert(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DALI outputs -> (images_BCHW float32 on device, labels_B int64 on device, index_B int64 on CPU)."""
        images = out["images"]
        index = out["index"].long()
        index_B = index[:, 0]
        labels_B = self._class_of_N[index_B.to(self._device, non_blocking=True)]
        if isinstance(images, list):  # random_resized views per copy on the CPU, still to be resized
            return self._cpu_views(images, index[:, 1:]).to(self._device, non_blocking=True), labels_B, index_B.cpu()
        if images.dim() == 5:
            images = images.flatten(0, 1)  # [B,V,...] views of each sample -> [B*V,...], sample-major
        if self._aug.channels_last:
            images = images.permute(0, 3, 1, 2)  # [B,H,W,C] -> a [B,C,H,W] view in channels_last memory format
        images_BCHW = images.to(self._device, non_blocking=True)
        if index.shape[1] > 1:  # pad_random views to cut here: (top, left, flip) per view after the index
            draws_BV3 = index[:, 1:].reshape(index.shape[0], -1, 3).to(self._device)
            fill_3 = -(torch.tensor(self._aug.mean_255) / torch.tensor(self._aug.std_255)).to(self._device)
            flips_BV = draws_BV3[..., 2].bool()
            cl = self._aug.channels_last
            images_BCHW = pad_random_views(images_BCHW, draws_BV3[..., :2], flips_BV, fill_3, channels_last=cl)
        return images_BCHW, labels_B, index_B.cpu()

    def _cpu_views(self, images_HW3: list[torch.Tensor], draws_BD: torch.Tensor) -> torch.Tensor:
        """The V views of every decoded image from DALI's draws (`_cpu_view_draws`), resized by torch on the loader's
        threads (`dali_threads` of them, the samples split among them; torch's kernels release the GIL).

        Returns:
            float32 [B*V,3,S,S], sample-major, normalised; channels_last memory when asked.
        """
        aug, views, side = self._aug, self._aug.views, self._aug.image_size
        batch = len(images_HW3)
        out_N3SS, delivered_N3SS = self._views_buffer((batch * views, 3, side, side))
        boxes = draws_BD[:, : 4 * views].reshape(batch, views, 4).tolist()
        flips = draws_BD[:, 4 * views :].bool().tolist()
        if self._normalisation is None:
            self._normalisation = Normalisation([m / 255 for m in aug.mean_255], [s / 255 for s in aug.std_255])

        def sample(b: int) -> None:
            image_13HW = images_HW3[b].permute(2, 0, 1).unsqueeze(0)
            for v in range(views):
                out_13SS = out_N3SS[b * views + v : b * views + v + 1]
                resized_view_into(out_13SS, image_13HW, tuple(boxes[b][v]), flips[b][v], self._normalisation)

        _on_threads(sample, batch, self._threads)
        return delivered_N3SS

    def _views_buffer(self, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the buffer to write a batch of CPU views into, the tensor to deliver: the same memory).

        A batch's 150 MB of new float32 pages cost ~0.2 ms of CPU per 224 px view on this VM (allocated and zeroed
        at the first write, freed when the consumer drops the batch), half of what the view costs otherwise. So up to
        `_VIEW_SLOTS` buffers are written again: the delivered tensor is an alias with a storage of its own, and its
        slot is free again once the consumer has dropped it and every view of it (a weak reference expires), as in
        `data/batch_pool.py`. A consumer holding more batches gets new buffers.
        """
        fmt = torch.channels_last if self._aug.channels_last else torch.contiguous_format
        for slot in self._view_slots:
            if slot[0].shape == shape and (slot[2] is None or slot[2].expired()):
                break
        else:
            if len(self._view_slots) >= _VIEW_SLOTS:
                fresh = torch.empty(shape, dtype=torch.float32, memory_format=fmt)
                return fresh, fresh
            buffer = torch.empty(shape, dtype=torch.float32, memory_format=fmt)
            slot = [buffer, buffer.numpy(), None]
            self._view_slots.append(slot)
        alias = torch.from_numpy(slot[1])
        slot[2] = StorageWeakRef(alias.untyped_storage())
        return slot[0], alias

    def _corrupt_error(self, err: RuntimeError, candidates: Sequence[int]) -> CorruptImageError | None:
        """Finds the file behind a DALI pipeline failure, or None when no candidate is at fault.

        DALI names the file for some failures ("Failed to decode sample #1 : PATH") but not for others
        ("nvImageCodec failure: '#3'", e.g. a damaged header), and the pipeline is unusable afterwards. A file the
        message names wins; otherwise the `candidates` (indices of the batches not yet delivered, in reading
        order, so the culprit is usually among the first few) are decoded with Pillow until one fails.
        """
        message = str(err)
        unique = list(dict.fromkeys(int(i) for i in candidates))
        for i in unique:
            if self._paths[i] in message:
                # DALI's reader fails on a file it may not open as on a damaged one: tell the two apart.
                unreadable = unreadable_image(self._paths[i])
                if unreadable is not None:
                    return unreadable
                return CorruptImageError(f"DALI cannot decode image {self._paths[i]}: {_dali_reason(message)}")
        for i in unique:
            try:
                load_rgb(self._paths[i])
            except CorruptImageError as bad:
                return bad
        return None


def _dali_reason(message: str) -> str:
    """The informative line of a DALI pipeline error (the text after 'encountered:'), for our error message."""
    tail = message.split("encountered:", 1)[-1].strip()
    return tail.splitlines()[0] if tail else message.strip().splitlines()[0]


class DaliTrainLoader(_Batches):
    """Training batches from DALI: exactly `len(self)` full batches per epoch on every rank, resumable mid-epoch.

    Iterating yields `(images_BCHW, labels_B)`: float32 normalised images on the device (channels_last memory
    format when asked) and int64 class labels on the device. The order is the shared `EpochPlan` (the torch
    backend's): each epoch, this rank's pipeline reads its own list of the epoch's samples, in plan order, from the
    batch it starts at. An epoch that is iterated to its end is followed by the next one on the next `iter()`;
    `set_epoch(e)` jumps to the start of epoch e (a no-op when e is the current epoch).
    """

    def __init__(self, *, num_samples: int, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._plan = EpochPlan(
            num_samples,
            unique_per_rank=self._batch_size,
            rank=self._rank,
            world_size=self._world_size,
            seed=seed,
        )
        self._seed = seed
        self._iterator: DALIGenericIterator | None = None
        self._iterator_epoch = -1
        self._start = 0  # the batch of the epoch that the current (or next) pipeline's file list starts at
        self._restore: bytes | None = None  # a DALI checkpoint to build the next pipeline from
        self._broken = False

    def __len__(self) -> int:
        return self._plan.steps

    @property
    def epoch(self) -> int:
        """The epoch the loader stands in."""
        return self._plan.epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Sample indices this rank reads in `epoch`, in order: int64 [steps * batch]."""
        return self._plan.rank_indices(epoch).reshape(-1).numpy()

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of `epoch`; a no-op when `epoch` is the current one (keeps a restored position)."""
        if epoch != self._plan.epoch:
            self._plan.set_epoch(epoch)
            self._drop_pipeline()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images_BCHW, labels_B, _ in self.iter_with_indices():
            yield images_BCHW, labels_B

    def iter_with_indices(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iterating, but also yields each row's sample index (int64 [B], CPU): which file it came from."""
        if self._broken:
            raise RuntimeError("the DALI training pipeline failed earlier; restore a position with load_state_dict")
        epoch, _ = self._plan.begin_pass()
        if self._iterator is not None and self._iterator_epoch != epoch:
            self._drop_pipeline()  # the last pass finished its epoch; this one starts the next
        while self._plan.state_dict()["batch"] < self._plan.steps:
            out = self._next()
            self._plan.advance()
            yield out

    def _next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, batch = self._plan.epoch, self._plan.state_dict()["batch"]
        try:
            if self._iterator is None:
                if self._restore is None:
                    self._start = batch
                # Augmentation differs per rank and per epoch (and per starting batch after a resume on another
                # world size); the order is the plan's, the same on every rank.
                words = (self._seed, self._rank, epoch) + ((self._start,) if self._start else ())
                self._iterator = self._make_iterator(
                    self.epoch_indices(epoch)[self._start * self._batch_size :],
                    training=True,
                    seed=derive_seed(*words, bits=31),
                    policy=LastBatchPolicy.FILL,
                    checkpoint=self._restore,
                    sharded=False,
                )
                self._iterator_epoch = epoch
                self._restore = None
            out = next(self._iterator)[0]
        except RuntimeError as err:
            self._broken, self._iterator = True, None
            remaining = self.epoch_indices(epoch)[batch * self._batch_size :]
            corrupt = self._corrupt_error(err, remaining)
            if corrupt is not None:
                raise corrupt from err
            raise
        return self._convert(out)

    def _drop_pipeline(self) -> None:
        self._iterator, self._restore, self._broken, self._start = None, None, False, 0

    def state_dict(self) -> dict:
        """The exact position: epoch, batches delivered, and DALI's checkpoint (reader position + RNG states) of the
        pipeline, whose file list starts at batch `pipeline_start` of the epoch.

        Returns:
            A JSON-able dict; the DALI checkpoint is base64 text, None at an epoch boundary.
        """
        position = self._plan.state_dict()
        mid_epoch = 0 < position["batch"] < self._plan.steps
        if self._iterator is not None and mid_epoch:
            checkpoint = self._iterator.checkpoints()[0]
        else:
            checkpoint = self._restore if mid_epoch else None
        if isinstance(checkpoint, str):
            checkpoint = checkpoint.encode("latin-1")
        return {
            "format": _STATE_FORMAT,
            **position,
            "pipeline_start": self._start if checkpoint is not None else position["batch"],
            "steps": self._plan.steps,
            "num_samples": self._plan.num_samples,
            "world_size": self._world_size,
            "rank": self._rank,
            "seed": self._seed,
            "dali_checkpoint": None if checkpoint is None else base64.b64encode(checkpoint).decode("ascii"),
            "graph": self._graph,
        }

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") not in (_STATE_FORMAT, _STATE_FORMAT_1):
            raise ValueError(f"data state: not a DALI loader state (format {_STATE_FORMAT!r} expected)")
        # The global batch decides the steps per epoch: equal steps, samples and seed mean the same epoch plan.
        expected = {"num_samples": self._plan.num_samples, "steps": self._plan.steps, "seed": self._seed}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"data state: {key} is {state.get(key)!r} in the checkpoint but {value!r} now")

    def load_state_dict(self, state: dict) -> None:
        """Restores a position saved by `state_dict` of this rank (same world size and batch layout).

        Raises:
            ValueError: the state is not a DALI loader state, or it was saved with another dataset size, seed or
                steps per epoch, or by another rank (the message names the mismatching key).
        """
        self._check_state(state)
        for key, value in (("world_size", self._world_size), ("rank", self._rank)):
            if state.get(key) != value:
                raise ValueError(f"data state: {key} is {state.get(key)!r} in the checkpoint but {value!r} now")
        self._drop_pipeline()
        self._plan.load_state_dict({"epoch": state.get("epoch"), "batch": state.get("batch")})
        batch = self._plan.state_dict()["batch"]
        if state["format"] == _STATE_FORMAT_1:
            # Written before the backends shared one epoch plan: its DALI checkpoint describes another file list.
            log.warning("DALI loader state of an older version: resuming at batch %d in the shared epoch order", batch)
            self._start = batch
            return
        encoded = state.get("dali_checkpoint")
        if encoded is not None and state.get("graph", _GRAPH_DALI_VIEWS) != self._graph:
            # A DALI checkpoint restores only the graph that wrote it ("doesn't recognize __RandomResizedCrop_1").
            log.warning(
                "DALI loader state of another pipeline graph (%s, now %s: the random_resized views per copy changed "
                "how they are resized): resuming at batch %d with fresh augmentation draws",
                state.get("graph", _GRAPH_DALI_VIEWS),
                self._graph,
                batch,
            )
            encoded = None
        if 0 < batch < self._plan.steps and encoded is not None:
            self._start, self._restore = int(state["pipeline_start"]), base64.b64decode(encoded)
        else:
            self._start = batch

    def load_resharded(self, states: list[dict], step: int) -> None:
        """Restores the position from the states of the ranks of another world size (same global batch).

        Every old rank stood at the same position; the DALI checkpoints describe the old ranks' file lists, so
        the pipeline starts afresh at that batch over this rank's list (augmentation draws differ from an
        uninterrupted run; the samples do not).
        """
        for state in states:
            self._check_state(state)
        self._drop_pipeline()
        self._plan.load_resharded([{"epoch": s["epoch"], "batch": s["batch"]} for s in states], step)
        self._start = self._plan.state_dict()["batch"]


class DaliValLoader(_Batches):
    """Validation batches from DALI: this rank's contiguous shard, every sample exactly once, in file order.

    Iterating yields `(images_BCHW, labels_B)` like the training loader; the last batch may be smaller. Each
    `iter()` is a fresh pass (a fresh pipeline), so an interrupted pass never shifts the next one.
    """

    def __init__(self, *, num_samples: int, seed: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._num_samples = num_samples
        self._seed = seed
        # DALI's shard r of n samples is [floor(n*r/W), floor(n*(r+1)/W)); the iterator drops the padded rows.
        self._start = num_samples * self._rank // self._world_size
        self._stop = num_samples * (self._rank + 1) // self._world_size

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per pass (its shard)."""
        return self._stop - self._start

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self._batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images_BCHW, labels_B, _ in self.iter_with_indices():
            yield images_BCHW, labels_B

    def iter_with_indices(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iterating, but also yields each row's sample index (int64 [B], CPU)."""
        iterator = None
        delivered = 0
        while delivered < self.num_samples:
            try:
                if iterator is None:
                    iterator = self._make_iterator(
                        range(self._num_samples), training=False, seed=self._seed, policy=LastBatchPolicy.PARTIAL
                    )
                out = next(iterator)[0]
            except RuntimeError as err:
                corrupt = self._corrupt_error(err, range(self._start + delivered, self._stop))
                if corrupt is not None:
                    raise corrupt from err
                raise
            if out["index"].shape[0] == 0:
                continue  # a batch made only of padding on a shorter shard
            batch = self._convert(out)
            delivered += batch[1].shape[0]
            yield batch


def build_dali_data(cfg: DataConfig, place: Placement, *, gpu: bool, views_in_dali: bool = False) -> Data:
    """Builds the DALI training and validation loaders of an ImageNet-layout folder `cfg.root`.

    Args:
        cfg: the `data` section (root, image_size, val_resize_ratio, train_crop, min_crop_scale, hflip,
            dali_threads, dali_prefetch).
        place: this rank's placement; `unique_per_rank` is the training batch, the run seed orders the samples on
            every rank and, mixed with the rank, seeds the augmentation.
        gpu: decode on the GPU (nvJPEG "mixed" decoder) instead of on the CPU; the device must then be CUDA.
        views_in_dali: random_resized views per copy resized by DALI (`random_resized_crop`), not by torch from
            DALI's draws; always on the GPU. The tests set it on the CPU to run the GPU's graph there.
    Returns:
        Data with backend "dali-gpu" or "dali-cpu".
    Raises:
        ValueError: a CPU device with `gpu`, or a bad dataset (missing split, class mismatch, too few validation
            images for the ranks).
    """
    if gpu and (place.device.type != "cuda" or not torch.cuda.is_available()):
        raise ValueError(
            f"data.backend dali-gpu decodes on a CUDA device, but the device is {place.device} "
            f"(CUDA available: {torch.cuda.is_available()}); use dali-cpu or torch"
        )
    classes, train_table, val_table = folder_tables(cfg.root, cfg.index_dir, rescan=cfg.rescan, first=place.rank == 0)
    if len(val_table) < place.world_size:
        raise ValueError(
            f"{cfg.root}/val holds {len(val_table)} images, fewer than the {place.world_size} ranks: every rank "
            "needs one"
        )
    aug = _Augment(
        image_size=cfg.image_size,
        train_crop=cfg.train_crop,
        min_crop_scale=float(cfg.min_crop_scale),
        hflip=bool(cfg.hflip),
        val_resize=round(cfg.image_size / cfg.val_resize_ratio),
        mean_255=tuple(255.0 * v for v in place.mean),
        std_255=tuple(255.0 * v for v in place.std),
        channels_last=place.channels_last,
        gpu=gpu,
        views_in_dali=gpu or bool(views_in_dali),
        views=place.views_per_image,
    )
    common = dict(
        aug=aug,
        rank=place.rank,
        world_size=place.world_size,
        threads=cfg.dali_threads,
        prefetch=cfg.dali_prefetch,
        device=place.device,
        seed=place.seed,
    )
    train = DaliTrainLoader(
        table=train_table,
        batch_size=place.unique_per_rank,
        num_samples=len(train_table),
        **common,
    )
    val = DaliValLoader(
        table=val_table,
        batch_size=place.val_batch_size,
        num_samples=len(val_table),
        **common,
    )
    return Data(
        train=train,
        val=val,
        classes=classes,
        mean=place.mean,
        std=place.std,
        num_train=len(train_table),
        num_val=len(val_table),
        backend="dali-gpu" if gpu else "dali-cpu",
    )
