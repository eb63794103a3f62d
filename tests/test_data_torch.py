"""Torch and synthetic data backends, dataset scanning and decoding, on tiny real JPEG folders."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from mixmo_dist.config import DataConfig
from mixmo_dist.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    Placement,
    build_data,
    load_rgb,
    resolve_backend,
    scan_split,
    timm_mean_std,
)
from mixmo_dist.data.batch_pool import BatchPool, PooledImages
from mixmo_dist.data.plan import EpochPlan
from mixmo_dist.data.torch_loader import TrainSet
from mixmo_dist.data.transforms import Normalisation, pad_random_views, random_resized_crop_box
from mixmo_dist.data.workers import WorkerTimeoutError, _DeviceNormalizer
from mixmo_dist.training.members import member_inputs

CPU = torch.device("cpu")
SIZE = 16
CLASSES = ["ant", "bee", "cat"]
TRAIN_COUNTS = (4, 5, 4)  # N = 13: never a multiple of world * unique in these tests
VAL_COUNTS = (3, 3, 3)


# ----------------------------------------------------------------------------------------------------------------
# Tiny datasets. In the "id" dataset every image is one solid colour: red encodes the class, green the sample's
# index in sorted-path order, so a delivered batch can be traced back to its files after decoding and resizing.
# ----------------------------------------------------------------------------------------------------------------


def _id_colour(label: int, index: int) -> tuple[int, int, int]:
    return 40 + 80 * label, 8 + 12 * index, 128


def _write_id_split(root: Path, split: str, counts: tuple[int, ...]) -> None:
    index = 0
    for label, (name, count) in enumerate(zip(CLASSES, counts)):
        (root / split / name).mkdir(parents=True)
        for k in range(count):
            size = (20 + 4 * (k % 3), 24 + 3 * (k % 2))  # varied sizes and aspect ratios
            img = Image.new("RGB", size, _id_colour(label, index))
            img.save(root / split / name / f"{k:03d}.JPEG", quality=95)
            index += 1


@pytest.fixture(scope="module")
def id_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("id_data")
    _write_id_split(root, "train", TRAIN_COUNTS)
    _write_id_split(root, "val", VAL_COUNTS)
    return root


@pytest.fixture(scope="module")
def noise_root(tmp_path_factory) -> Path:
    """12 train images of random noise (so every crop and flip shows), 2 val images per class."""
    root = tmp_path_factory.mktemp("noise_data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, size=(22 + k, 26, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k:03d}.JPEG", quality=90)
    return root


def _cfg(root: Path, **overrides) -> DataConfig:
    fields = dict(root=str(root), backend="torch", image_size=SIZE, num_workers=0, min_crop_scale=0.25)
    fields.update(overrides)
    return DataConfig(**fields)


def _build(cfg: DataConfig, *, unique=4, val_batch=4, rank=0, world=1, seed=0, channels_last=False, views=1):
    place = Placement(
        unique_per_rank=unique,
        views_per_image=views,
        val_batch_size=val_batch,
        rank=rank,
        world_size=world,
        seed=seed,
        device=CPU,
        channels_last=channels_last,
    )
    return build_data(cfg, place)


def _unnormalise(images_B3SS: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images_B3SS * std + mean) * 255.0


def _decode_ids(images_B3SS: torch.Tensor) -> tuple[list[int], list[int]]:
    """(labels from red, sample indices from green) of solid-colour id images."""
    rgb_B3 = _unnormalise(images_B3SS).mean(dim=(2, 3))
    labels = torch.round((rgb_B3[:, 0] - 40) / 80).long().tolist()
    indices = torch.round((rgb_B3[:, 1] - 8) / 12).long().tolist()
    return labels, indices


def _collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(images.clone(), labels.clone()) for images, labels in loader]


# ----------------------------------------------------------------------------------------------------------------
# Batches: shapes, values, labels, sharding.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_are_normalised_and_labelled_like_their_folders(id_root, channels_last):
    data = _build(_cfg(id_root), unique=4, channels_last=channels_last)
    assert data.classes == CLASSES and data.backend == "torch"
    assert (data.num_train, data.num_val) == (13, 9)
    assert data.mean == IMAGENET_MEAN and data.std == IMAGENET_STD
    batches = _collect(data.train)
    assert len(batches) == len(data.train) == 4  # ceil(13 / 4)
    for images, labels in batches:
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert labels.dtype == torch.int64 and labels.shape == (4,)
        pixels = _unnormalise(images)
        assert pixels.min() > -3 and pixels.max() < 258  # 0-255 after undoing the normalisation
        # Each solid image keeps its colour through crop, resize and JPEG: red says which folder it came from.
        decoded_labels, _ = _decode_ids(images)
        assert decoded_labels == labels.tolist()
        assert (pixels[:, 2] - 128).abs().max() < 6


def test_ranks_get_disjoint_parts_covering_the_epoch(id_root):
    world, unique = 2, 3
    loaders = [_build(_cfg(id_root), unique=unique, rank=r, world=world).train for r in range(world)]
    steps = len(loaders[0])
    assert steps == len(loaders[1]) == 3  # ceil(13 / 6): 18 positions, 5 wrapped around
    order = EpochPlan(13, unique_per_rank=unique, rank=0, world_size=world, seed=0).global_order(0)
    per_rank = []
    for loader in loaders:
        ids = []
        for images, labels in loader:
            decoded_labels, indices = _decode_ids(images)
            assert decoded_labels == labels.tolist()
            ids.append(indices)
        assert len(ids) == steps
        per_rank.append(ids)
    # Global step s = rank 0's U samples, then rank 1's: exactly the epoch's wrapped permutation.
    delivered = [i for step in range(steps) for rank in range(world) for i in per_rank[rank][step]]
    assert delivered == order.tolist()
    assert sorted(set(delivered)) == list(range(13))
    assert sorted(delivered[:13]) == list(range(13))  # the first N positions are a permutation, the rest wrap
    # A new epoch is another permutation, the same on both ranks.
    for loader in loaders:
        loader.set_epoch(1)
    epoch1 = [_decode_ids(images)[1] for images, _ in loaders[0]]
    assert [i for batch in epoch1 for i in batch] != [i for batch in per_rank[0] for i in batch]


@pytest.mark.parametrize("num", [1, 7, 12, 13, 50])
@pytest.mark.parametrize("world,unique", [(1, 4), (2, 3), (3, 4), (4, 1)])
def test_epoch_plan_is_equal_length_disjoint_and_covering(num, world, unique):
    plans = [EpochPlan(num, unique_per_rank=unique, rank=r, world_size=world, seed=3) for r in range(world)]
    steps = -(-num // (world * unique))
    assert all(len(plan) == steps for plan in plans)
    positions = torch.cat([plan.rank_positions().flatten() for plan in plans])
    assert sorted(positions.tolist()) == list(range(steps * world * unique))  # disjoint, no gap
    order = plans[0].global_order(5)
    assert torch.equal(order, plans[-1].global_order(5))  # every rank draws the same permutation
    assert sorted(order[:num].tolist()) == list(range(num))
    if num >= 7:
        assert not torch.equal(order[:num], plans[0].global_order(6)[:num])  # a new permutation each epoch


def test_val_union_over_ranks_is_the_split_exactly_once(id_root):
    world = 2
    seen = []
    lengths = []
    for rank in range(world):
        data = _build(_cfg(id_root), unique=4, val_batch=2, rank=rank, world=world)
        batches = _collect(data.val)
        lengths.append(len(data.val))
        assert len(batches) == len(data.val)
        assert [labels.shape[0] for _, labels in batches][:-1] == [2] * (len(batches) - 1)
        for images, labels in batches:
            decoded_labels, indices = _decode_ids(images)
            assert decoded_labels == labels.tolist()
            seen.extend(indices)
    assert lengths == [3, 2]  # 5 and 4 samples in batches of 2: the last batch is short, no padding
    assert sorted(seen) == list(range(9))


def test_resume_yields_the_same_next_batches_with_workers(noise_root):
    cfg = _cfg(noise_root, num_workers=2, hflip=True, min_crop_scale=0.1)
    reference = _build(cfg, unique=2).train  # 12 samples -> 6 batches per epoch
    epoch0 = _collect(reference)
    reference.set_epoch(1)
    epoch1 = _collect(reference)
    assert len(epoch0) == len(epoch1) == 6
    # Augmentations change between epochs (so the comparisons below can fail).
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch0, epoch1))

    interrupted = _build(cfg, unique=2).train
    it = iter(interrupted)
    for step in range(2):
        images, labels = next(it)
        assert torch.equal(images, epoch0[step][0]) and torch.equal(labels, epoch0[step][1])
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert state == {"epoch": 0, "batch": 2}
    del it

    resumed = _build(cfg, unique=2).train
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a trainer calling set_epoch for the restored epoch keeps the position
    rest = _collect(resumed)
    assert len(rest) == 4
    for (images, labels), (ref_images, ref_labels) in zip(rest, epoch0[2:]):
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
    assert resumed.state_dict() == {"epoch": 0, "batch": 6}
    # Iterating a finished epoch moves on to the next one, identical to the uninterrupted run's epoch 1.
    for (images, _), (ref_images, _) in zip(_collect(resumed), epoch1):
        assert torch.equal(images, ref_images)


def test_batches_do_not_depend_on_workers_and_leave_global_rng_alone(noise_root):
    cfg = _cfg(noise_root, hflip=True, min_crop_scale=0.1)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    serial = _collect(_build(cfg, unique=4).train)
    assert torch.equal(torch.rand(3), expected_draw)  # the loader consumed nothing from the global RNG
    parallel = _collect(_build(_cfg(noise_root, hflip=True, min_crop_scale=0.1, num_workers=2), unique=4).train)
    other_seed = _collect(_build(cfg, unique=4, seed=1).train)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(serial, parallel))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(serial, other_seed))


# ----------------------------------------------------------------------------------------------------------------
# One view per copy (data.copy_augmentation=per_copy): V = b*M views per image.
# ----------------------------------------------------------------------------------------------------------------

# b=4 repetitions x M=2 members: the 8 copies of an image in a step.
B_REPS, MEMBERS = 4, 2
COPIES = B_REPS * MEMBERS
# Expected distinct views among the 8 copies when each is drawn independently, as the authors' loader does (it reads
# every copy separately): pad_random has 9 x 9 offsets x 2 flips = 162 equally likely outcomes.
PAD_OUTCOMES = 9 * 9 * 2
AUTHORS_DISTINCT_PAD = PAD_OUTCOMES * (1 - (1 - 1 / PAD_OUTCOMES) ** COPIES)  # 7.829


def distinct_views_per_image(loader, epochs: int, seed: int = 0) -> list[float]:
    """Per step: distinct member inputs / unique images, after `member_inputs` at b=4, M=2 (every image differs)."""
    gen = torch.Generator().manual_seed(seed)
    counts = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:
            x_MRCHW, _ = member_inputs(
                images, labels, num_members=MEMBERS, repetitions=B_REPS, input_repetition=0.0, generator=gen
            )
            flat = x_MRCHW.reshape(-1, x_MRCHW[0, 0].numel())
            counts.append(torch.unique(flat, dim=0).shape[0] / labels.shape[0])
    return counts


@pytest.mark.parametrize("train_crop", ["pad_random", "random_resized"])
def test_one_view_per_copy_gives_the_authors_count_of_distinct_views(noise_root, train_crop):
    """Distinct views of an image among its b x M = 8 copies in a step: 1 with a shared view; with one view per
    copy, what 8 independent draws give (pad_random: 162(1 - (161/162)^8) = 7.83, as the authors' loader;
    random_resized: continuous boxes, so 8)."""
    cfg = _cfg(noise_root, train_crop=train_crop, hflip=True, min_crop_scale=0.1)
    shared = distinct_views_per_image(_build(cfg, unique=4).train, epochs=2)
    assert set(shared) == {1.0}
    per_copy = distinct_views_per_image(_build(cfg, unique=4, views=COPIES).train, epochs=30)
    mean = float(np.mean(per_copy))
    if train_crop == "pad_random":
        # 360 image-steps; the count's std is ~0.4, so the mean is within ~0.02 (3 sigma < 0.08) of 7.83.
        assert abs(mean - AUTHORS_DISTINCT_PAD) < 0.08, mean
    else:
        assert mean > 7.95, mean


@pytest.mark.parametrize("train_crop", ["pad_random", "random_resized"])
def test_views_per_copy_are_independent_of_workers_and_world_and_resume_exactly(noise_root, train_crop):
    """Every view comes from (seed, epoch, position): 0, 1 or 2 workers, 1 or 2 ranks and a resume give the same
    bits (random_resized views are made and normalised in the workers, pad_random ones cut on the device)."""
    cfg = _cfg(noise_root, train_crop=train_crop, hflip=True)
    serial = _collect(_build(cfg, unique=4, views=COPIES).train)
    assert serial[0][0].shape == (4 * COPIES, 3, SIZE, SIZE) and serial[0][1].shape == (4,)
    for workers in (1, 2):
        cfg_w = _cfg(noise_root, train_crop=train_crop, hflip=True, num_workers=workers)
        got = _collect(_build(cfg_w, unique=4, views=COPIES).train)
        assert len(got) == len(serial)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(serial, got)), workers
    # Two ranks of 2 unique images: global step s is rank 0's images then rank 1's, views and all.
    ranks = [_collect(_build(cfg, unique=2, views=COPIES, rank=r, world=2).train) for r in range(2)]
    for step, (images, labels) in enumerate(serial):
        assert torch.equal(images, torch.cat([ranks[0][step][0], ranks[1][step][0]]))
        assert torch.equal(labels, torch.cat([ranks[0][step][1], ranks[1][step][1]]))
    # The comparisons above can fail: an image's views differ from each other.
    first = serial[0][0].view(4, COPIES, -1)
    assert all(torch.unique(first[u], dim=0).shape[0] > 1 for u in range(4))
    for workers in (0, 2):
        cfg_w = _cfg(noise_root, train_crop=train_crop, hflip=True, num_workers=workers)
        resumed = _build(cfg_w, unique=4, views=COPIES).train
        resumed.load_state_dict({"epoch": 0, "batch": 1})
        got = _collect(resumed)
        assert len(got) == len(serial) - 1
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got, serial[1:])), workers


@pytest.mark.parametrize("out_channels_last", [False, True])
@pytest.mark.parametrize("in_channels_last", [False, True])
@pytest.mark.parametrize("side", [16, 7])  # 7 x 7 pixels do not fill whole rows of 32: the broadcast path
def test_normalisation_into_any_layout_is_the_formula_bit_for_bit(in_channels_last, out_channels_last, side):
    norm = Normalisation(IMAGENET_MEAN, IMAGENET_STD)
    images = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0, :, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    images = images.contiguous(memory_format=torch.channels_last) if in_channels_last else images
    out = torch.empty(2, 3, side, side)
    out = out.contiguous(memory_format=torch.channels_last) if out_channels_last else out
    norm.into(out, images)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(out.double(), (images.double() / 255.0 - mean) / std, rtol=0, atol=1e-5)
    assert torch.equal(out, norm(images))  # what the device path computes


class _ArrivalDtypes:
    """Wraps a `_DeviceNormalizer`, recording the dtype of each batch as it reaches the training process."""

    def __init__(self, inner: _DeviceNormalizer) -> None:
        self.inner, self.device, self.dtypes = inner, inner.device, []

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        self.dtypes.append(images.dtype)
        return self.inner(images, labels)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_random_resized_views_normalised_in_the_workers_equal_the_formula_and_the_device_path(
    noise_root, channels_last, num_workers
):
    """On a CPU device the workers normalise random_resized views: the values are (x / 255 - mean) / std of the
    uint8 views drawn from the same generator, bit for bit what normalising the uint8 batch on the device gives
    (the GPU path), in the requested memory format."""
    cfg = _cfg(noise_root, hflip=True, min_crop_scale=0.1, num_workers=num_workers)
    loader = _build(cfg, unique=4, views=COPIES, channels_last=channels_last).train
    assert loader._decoder.dataset.normalise is not None  # the CPU placement normalises in the dataset
    raw = TrainSet(loader._decoder.dataset.source, cfg, 0, COPIES)  # uint8 views, as a GPU placement makes them
    device_path = _DeviceNormalizer(CPU, IMAGENET_MEAN, IMAGENET_STD, channels_last)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    recorder = _ArrivalDtypes(loader._decoder.to_device)
    loader._decoder.to_device = recorder
    batches = _collect(loader)
    assert recorder.dtypes == [torch.float32] * len(batches)  # normalised by the dataset, not the training process
    for keys, (images, labels) in zip(loader.epoch_keys(0), batches):
        assert images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
        views_u8, raw_labels = raw.__getitems__(keys)
        assert views_u8.dtype == torch.uint8 and torch.equal(labels, raw_labels)
        formula = (views_u8.double() / 255.0 - mean) / std
        torch.testing.assert_close(images.double(), formula, rtol=0, atol=1e-5)
        assert torch.equal(images, device_path(views_u8, raw_labels)[0])


def test_a_pool_slot_is_handed_out_again_only_when_its_batch_is_dropped():
    """`BatchPool` bookkeeping in the training process: a slot goes to one batch at a time, stays taken while the
    batch is in flight and while any tensor delivered from it lives (views included), and is free again after; a
    batch finding no free slot gets none (a new buffer); a new pass frees slots whose batches were never delivered."""
    pool = BatchPool(2, (2, 3, 1, 1), (3, 1, 1, 1), torch.float32)
    first = iter(pool.keyed([["a"], ["b"], ["c"]]))
    a, b, c = next(first), next(first), next(first)
    assert (a, a.slot, b.slot, c.slot) == (["a"], 0, 1, None)
    pool.buffers[0].fill_(7.0)
    held = pool.received(PooledImages(0))
    assert torch.equal(held, torch.full((2, 3, 1, 1), 7.0)) and held.data_ptr() == pool.buffers[0].data_ptr()
    view = held[1:]
    del held
    again = iter(pool.keyed([["d"], ["e"]]))  # slot 1 was sent but never delivered; slot 0's batch lives on
    assert next(again).slot == 1 and next(again).slot is None
    del view
    assert next(iter(pool.keyed([["f"]]))).slot == 0
    images = torch.zeros(1)
    assert pool.received(images) is images  # a batch written elsewhere passes through


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reused_batch_buffers_never_overwrite_a_batch_still_held(noise_root, num_workers):
    """On a CPU device random_resized batches are written into a pool of reused shared-memory buffers: a consumer
    that drops each batch gets every batch in a pool slot; one that keeps every batch (more than the pool has
    slots) and abandons a pass midway still holds each batch exactly as the dataset makes it without a pool."""
    cfg = _cfg(noise_root, hflip=True, min_crop_scale=0.1, num_workers=num_workers)
    loader = _build(cfg, unique=4, views=COPIES).train
    pooled = loader._decoder.dataset
    assert len(pooled.pool.buffers) == 2 * num_workers + 2
    plain = TrainSet(pooled.source, cfg, 0, COPIES, normalise=pooled.normalise)
    slots = {buffer.data_ptr() for buffer in pooled.pool.buffers}
    for keys, (images, labels) in zip(loader.epoch_keys(0), loader):
        assert images.data_ptr() in slots
        expected_images, expected_labels = plain.__getitems__(keys)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    held = []
    for epoch in (1, 2, 3, 4):
        loader.set_epoch(epoch)
        for step, (images, labels) in enumerate(loader):
            held.append((loader.epoch_keys(epoch)[step], images, labels))
            if epoch == 2:
                break  # the workers had more of this pass in flight: drained when the next pass starts
    assert len(held) == 10 > len(slots)
    for keys, images, labels in held:
        expected_images, expected_labels = plain.__getitems__(keys)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


# Held by a thread of the test process while workers start: a forked worker would inherit it held, forever.
_HELD = threading.Lock()


class _LockingSet(Dataset):
    """Wraps a train set; each sample takes `_HELD` first (in the worker's copy of this module)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key):
        with _HELD:
            return self.inner[key]


def test_workers_start_clean_while_another_thread_holds_a_lock(noise_root):
    """Workers come from the forkserver, not from a fork of this multi-threaded process (fails with fork)."""
    loader = _build(_cfg(noise_root, num_workers=2), unique=2).train
    loader._decoder.dataset = _LockingSet(loader._decoder.dataset)
    release = threading.Event()

    def hold() -> None:
        with _HELD:
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    result = []
    reader = threading.Thread(target=lambda: result.append(len(_collect(loader))), daemon=True)
    try:
        reader.start()
        reader.join(timeout=120)
        assert result == [6], "workers deadlocked on a lock held by another thread of the parent"
    finally:
        release.set()
        holder.join()


def test_train_workers_persist_across_epochs_and_ignore_group_signals(noise_root):
    loader = _build(_cfg(noise_root, num_workers=2), unique=2).train
    first = _collect(loader)
    workers = loader._decoder._loader._iterator._workers
    pids = [w.pid for w in workers]
    second = _collect(loader)  # epoch 1, same worker processes
    assert [w.pid for w in loader._decoder._loader._iterator._workers] == pids and all(w.is_alive() for w in workers)
    assert len(first) == len(second) == 6
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        assert os.getpgid(pid) == pid != os.getpgid(0)  # out of the rank's process group
        assert int(re.search(r"PPid:\s+(\d+)", status).group(1)) != os.getpid()  # forked by the forkserver
        ignored = int(re.search(r"SigIgn:\s+([0-9a-f]+)", status).group(1), 16)
        blocked = int(re.search(r"SigBlk:\s+([0-9a-f]+)", status).group(1), 16)
        for sig in (signal.SIGUSR2, signal.SIGINT):
            assert ignored >> (sig - 1) & 1
        assert not blocked >> (signal.SIGTERM - 1) & 1 and not ignored >> (signal.SIGTERM - 1) & 1
    # A preemption signal to a worker is ignored; the loader keeps serving batches from the same processes.
    os.kill(pids[0], signal.SIGUSR2)
    assert len(_collect(loader)) == 6 and [w.pid for w in loader._decoder._loader._iterator._workers] == pids


class _StallingSet(Dataset):
    """Wraps a dataset; fetching `stall_index` writes the worker's PID to `pid_file` and then never returns."""

    def __init__(self, inner: Dataset, stall_index, pid_file: str) -> None:
        self.inner, self.stall_index, self.pid_file = inner, stall_index, pid_file

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key):
        if key == self.stall_index or (isinstance(key, tuple) and key[-1] == self.stall_index):
            Path(self.pid_file).write_text(str(os.getpid()))
            threading.Event().wait()  # a hung read: blocks forever, ignores nothing
        return self.inner[key]


def _wait_gone(pid: int, seconds: float = 30.0) -> bool:
    """Whether process `pid` has exited (or is a zombie) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if "State:\tZ" in Path(f"/proc/{pid}/status").read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_stuck_worker_is_an_error_naming_the_timeout_key_not_a_hang(noise_root, tmp_path, split):
    data = _build(_cfg(noise_root, num_workers=2, worker_timeout_s=3.0), unique=2, val_batch=2)
    loader = getattr(data, split)
    pid_file = tmp_path / "stuck.pid"
    loader._decoder.dataset = _StallingSet(loader._decoder.dataset, 1, str(pid_file))
    start = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match=rf"{split} loader: .*data\.worker_timeout_s=3 s \(batch \d+ of"):
        _collect(loader)
    assert time.monotonic() - start < 60
    stuck = int(pid_file.read_text())
    assert _wait_gone(stuck), "the stuck worker was left running"
    # Nothing is kept that would hang the next pass: a healthy dataset is served again by fresh workers, from the
    # batch that failed on (train) or from the start (val).
    loader._decoder.dataset = loader._decoder.dataset.inner
    delivered = loader.state_dict()["batch"] if split == "train" else 0
    assert len(_collect(loader)) == len(loader) - delivered


def test_worker_timeout_is_checked_where_it_is_set():
    with pytest.raises(ValueError, match=r"data\.worker_timeout_s"):
        DataConfig(worker_timeout_s=-1.0)


def test_restore_skips_batches_without_decoding_them(noise_root, tmp_path):
    """A corrupt file that only the skipped batches hold must not be touched by a resumed pass."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for src in sorted((noise_root / split / name).iterdir()):
                (root / split / name / src.name).write_bytes(src.read_bytes())
    loader = _build(_cfg(root), unique=4).train  # 12 samples, 3 batches, no wrap-around
    first_keys = loader.epoch_keys(0)[0]
    _, samples = scan_split(root, "train")
    victim = Path(samples[first_keys[0][2]][0])
    victim.write_bytes(victim.read_bytes()[:100])
    loader.load_state_dict({"epoch": 0, "batch": 1})
    assert len(_collect(loader)) == 2
    fresh = _build(_cfg(root), unique=4).train
    with pytest.raises(CorruptImageError, match=victim.name):
        _collect(fresh)


def test_pad_random_crop_pads_with_zeros(tmp_path):
    root = tmp_path / "white"
    for split in ("train", "val"):
        (root / split / "only").mkdir(parents=True)
        for k in range(8):
            Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(root / split / "only" / f"{k}.JPEG", quality=95)
    data = _build(_cfg(root, train_crop="pad_random", hflip=False), unique=8)
    ((images, _),) = _collect(data.train)
    pixels = _unnormalise(images)
    assert images.shape == (8, 3, SIZE, SIZE)
    # The centre is always image, the 4-px border is zero padding for most crops (9x9 offsets, 1 centred).
    assert pixels[:, :, 4:-4, 4:-4].min() > 240
    padded = (pixels.amin(dim=(1, 2, 3)) < 15).sum().item()
    assert padded >= 5


@pytest.mark.parametrize("channels_last", [False, True])
def test_pad_random_views_are_padded_crops_and_flips(channels_last):
    """The batched cut equals, view by view, torchvision's RandomCrop(S, padding=4) at that offset, then the flip;
    at S = 8 and S = 12 (at 8, `4 - S` and `4 + S` index the same row of the padded image: only another size tells
    a sign slip in the paste apart)."""
    gen = torch.Generator().manual_seed(0)
    for side in (8, 12):
        images = torch.randn(3, 3, side, side, generator=gen)
        offsets = torch.randint(0, 9, (3, 5, 2), generator=gen)
        flips = torch.rand(3, 5, generator=gen) < 0.5
        fill = torch.tensor([-1.5, 0.25, 2.0])
        views = pad_random_views(images, offsets, flips, fill, channels_last=channels_last)
        assert views.shape == (15, 3, side, side)
        assert views.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for u in range(3):
            padded = fill.view(3, 1, 1).expand(3, side + 8, side + 8).clone()
            padded[:, 4 : 4 + side, 4 : 4 + side] = images[u]
            for v in range(5):
                top, left = offsets[u, v].tolist()
                expected = padded[:, top : top + side, left : left + side]
                expected = expected.flip(2) if flips[u, v] else expected
                assert torch.equal(views[u * 5 + v], expected), (side, u, v)


def test_random_resized_crop_box_stays_in_range():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_box(40, 30, 0.2, gen)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30
        assert 0.2 * 1200 * 0.8 <= h * w <= 1200
        assert 0.7 <= w / h <= 1.45
    # An image far outside the ratio range: after 10 failed tries, the centred fallback clamped to ratio 4/3.
    assert random_resized_crop_box(10, 200, 0.9, gen) == (0, 93, 10, 13)
    assert random_resized_crop_box(8, 8, 1.0, gen) == (0, 0, 8, 8)


# ----------------------------------------------------------------------------------------------------------------
# Decoding odd files, and errors that name their culprit.
# ----------------------------------------------------------------------------------------------------------------


def _odd_files(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Writes one file per odd format; returns name -> expected RGB colour."""
    directory.mkdir(parents=True, exist_ok=True)
    Image.new("L", (20, 20), 90).save(directory / "gray.JPEG", quality=95)
    Image.new("RGB", (20, 20), (200, 60, 30)).convert("CMYK").save(directory / "cmyk.JPEG", quality=95)
    Image.new("RGB", (20, 20), (10, 220, 70)).save(directory / "png_named.JPEG", format="PNG")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 30, 40, 250] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(directory / "palette.png", transparency=0)
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(directory / "sixteen.png")
    return {
        "gray.JPEG": (90, 90, 90),
        "cmyk.JPEG": (200, 60, 30),
        "png_named.JPEG": (10, 220, 70),
        "palette.png": (30, 40, 250),
        "sixteen.png": (156, 156, 156),
    }


def test_odd_formats_load_as_rgb_and_through_the_loader(tmp_path):
    expected = _odd_files(tmp_path / "data" / "train" / "odd")
    for name, colour in expected.items():
        img = load_rgb(tmp_path / "data" / "train" / "odd" / name)
        assert img.mode == "RGB" and img.size == (20, 20)
        assert np.abs(np.asarray(img, np.int32).mean(axis=(0, 1)) - np.array(colour)).max() <= 3, name
    _odd_files(tmp_path / "data" / "val" / "odd")
    data = _build(_cfg(tmp_path / "data"), unique=5, val_batch=5)
    ((images, _),) = _collect(data.val)
    by_file = sorted(expected)  # val order is sorted-path order
    got = _unnormalise(images).mean(dim=(2, 3))
    for row, name in enumerate(by_file):
        assert (got[row] - torch.tensor(expected[name], dtype=torch.float32)).abs().max() <= 4, name


def test_truncated_or_non_image_file_raises_naming_the_file(tmp_path, noise_root):
    good = (noise_root / "train" / "ant" / "000.JPEG").read_bytes()
    truncated = tmp_path / "cut.JPEG"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptImageError, match="cut.JPEG"):
        load_rgb(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(CorruptImageError, match="notes.jpg"):
        load_rgb(text)
    # Through DataLoader workers, the error (and the file name) reaches the training process.
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            (root / split / name / "ok.JPEG").write_bytes(good)
    (root / "train" / "bee" / "zz_broken.JPEG").write_bytes(good[: len(good) // 2])
    data = _build(_cfg(root, num_workers=2), unique=4)
    with pytest.raises(CorruptImageError, match="zz_broken.JPEG"):
        _collect(data.train)


def _class_dirs(root: Path, split: str, names: list[str], with_image: bool = True) -> None:
    for name in names:
        (root / split / name).mkdir(parents=True)
        if with_image:
            Image.new("RGB", (8, 8)).save(root / split / name / "a.JPEG")


def test_dataset_errors_name_the_path_and_the_difference(tmp_path):
    _class_dirs(tmp_path, "train", ["ant", "bee", "cat"])
    with pytest.raises(ValueError, match=r"dataset split not found: .*val"):
        scan_split(tmp_path, "val")
    with pytest.raises(ValueError, match="split not found"):
        _build(_cfg(tmp_path))
    _class_dirs(tmp_path, "val", ["ant", "bee", "dog"])
    with pytest.raises(ValueError, match=r"val has classes not in train: \['dog'\]; missing: \['cat'\]"):
        _build(_cfg(tmp_path))
    (tmp_path / "empty" / "val").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "notes.txt").write_text("no class dirs here")
    with pytest.raises(ValueError, match=r"no class directories in .*empty/val"):
        scan_split(tmp_path / "empty", "val")
    _class_dirs(tmp_path / "hollow", "train", ["ant"])
    _class_dirs(tmp_path / "hollow", "train", ["bee"], with_image=False)
    (tmp_path / "hollow" / "train" / "bee" / "readme.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"empty class directory: .*hollow/train/bee"):
        scan_split(tmp_path / "hollow", "train")


def test_scan_finds_all_extensions_sorted_with_labels(tmp_path):
    for name, files in {"b_cls": ["x.PNG", "sub/y.jpeg", "z.webp"], "a_cls": ["k.Jpg", "j.bmp", ".hidden.jpg"]}.items():
        for file in files:
            path = tmp_path / "train" / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    (tmp_path / "train" / "a_cls" / "labels.csv").write_text("ignored")
    classes, samples = scan_split(tmp_path, "train")
    assert classes == ["a_cls", "b_cls"]
    names = [(Path(p).relative_to(tmp_path / "train").as_posix(), label) for p, label in samples]
    assert names == [
        ("a_cls/j.bmp", 0),
        ("a_cls/k.Jpg", 0),
        ("b_cls/sub/y.jpeg", 1),
        ("b_cls/x.PNG", 1),
        ("b_cls/z.webp", 1),
    ]


def test_config_errors_name_the_key(id_root):
    with pytest.raises(ValueError, match="data.dataset='cifar10' is read with the torch backend"):
        _build(_cfg(id_root, dataset="cifar10", backend="dali-cpu"))
    with pytest.raises(ValueError, match="data.backend"):
        resolve_backend("pillow", cuda=False)
    with pytest.raises(ValueError, match="dali-gpu.*needs a CUDA device"):
        resolve_backend("dali-gpu", cuda=False, dali_installed=True)
    with pytest.raises(ValueError, match="needs NVIDIA DALI"):
        resolve_backend("dali-cpu", cuda=False, dali_installed=False)
    train = _build(_cfg(id_root), unique=4).train
    with pytest.raises(ValueError, match="exceeds the 4 batches per epoch"):
        train.load_state_dict({"epoch": 0, "batch": 9})
    with pytest.raises(ValueError, match="keys 'epoch' and 'batch'"):
        train.load_state_dict({"epoch": 0})


def test_backend_resolution():
    assert resolve_backend("auto", cuda=True, dali_installed=True) == "dali-gpu"
    assert resolve_backend("auto", cuda=False, dali_installed=True) == "dali-cpu"
    assert resolve_backend("auto", cuda=True, dali_installed=False) == "torch"
    assert resolve_backend("auto", cuda=False, dali_installed=False) == "torch"
    assert resolve_backend("torch", cuda=True, dali_installed=True) == "torch"
    assert resolve_backend("synthetic", cuda=False) == "synthetic"
    assert resolve_backend("dali-cpu", cuda=True, dali_installed=True) == "dali-cpu"


def test_timm_mean_std():
    assert timm_mean_std("resnet50.a1_in1k") == (IMAGENET_MEAN, IMAGENET_STD)
    assert timm_mean_std("vit_base_patch16_224.augreg_in21k") == ((0.5,) * 3, (0.5,) * 3)
    assert timm_mean_std("no_such_arch_xyz") == (IMAGENET_MEAN, IMAGENET_STD)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic backend.
# ----------------------------------------------------------------------------------------------------------------


def test_synthetic_backend_follows_the_same_contract():
    cfg = DataConfig(backend="synthetic", image_size=SIZE, synthetic_size=30, num_synthetic_classes=4)
    ranks = [_build(cfg, unique=4, val_batch=2, rank=r, world=2, seed=7, channels_last=True) for r in range(2)]
    data = ranks[0]
    assert data.backend == "synthetic" and data.classes == ["class_000", "class_001", "class_002", "class_003"]
    assert (data.num_train, data.num_val) == (30, 3)
    assert len(ranks[0].train) == len(ranks[1].train) == 4  # ceil(30 / 8)
    epoch = [_collect(d.train) for d in ranks]
    for images, labels in epoch[0]:
        assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 4
    everything = torch.cat([images for rank in epoch for images, _ in rank])
    assert abs(everything.mean().item()) < 0.1 and abs(everything.std().item() - 1) < 0.1  # already normalised
    # The two ranks see different images (disjoint positions of one shared permutation).
    assert not torch.equal(epoch[0][0][0], epoch[1][0][0])
    # Resume: same next batches.
    resumed = _build(cfg, unique=4, val_batch=2, rank=1, world=2, seed=7, channels_last=True).train
    resumed.load_state_dict({"epoch": 0, "batch": 3})
    ((images, labels),) = _collect(resumed)
    assert torch.equal(images, epoch[1][3][0]) and torch.equal(labels, epoch[1][3][1])
    # Val: 3 samples split 2 + 1 over the ranks, batches of 2.
    val_sizes = [[labels.shape[0] for _, labels in d.val] for d in ranks]
    assert val_sizes == [[2], [1]] and [len(d.val) for d in ranks] == [1, 1]
    assert _build(cfg, unique=4, seed=8).train.global_order(0).tolist() != ranks[0].train.global_order(0).tolist()


@pytest.mark.parametrize(("world", "new_world", "taken"), [(4, 2, 1), (2, 1, 1), (1, 2, 2), (4, 1, 2)])
def test_resume_on_another_world_size_reads_the_rest_of_the_epoch(id_root, world, new_world, taken):
    """A global batch of 4 over `world` ranks, stopped after `taken` steps, resumed over `new_world` ranks: the
    samples of the epoch (padding included) are exactly those of an uninterrupted run, global step by global step."""
    glob = 4
    uninterrupted = EpochPlan(13, unique_per_rank=glob, rank=0, world_size=1, seed=0).global_order(0).tolist()

    def step_sets(loaders, steps):
        out = []
        iters = [iter(loader) for loader in loaders]
        for _ in range(steps):
            out.append(sorted(i for it in iters for i in _decode_ids(next(it)[0])[1]))
        return out, loaders

    before, old = step_sets([_build(_cfg(id_root), unique=glob // world, rank=r, world=world).train
                             for r in range(world)], taken)  # fmt: skip
    states = [loader.state_dict() for loader in old]
    resumed = [_build(_cfg(id_root), unique=glob // new_world, rank=r, world=new_world).train for r in range(new_world)]
    for loader in resumed:
        loader.load_resharded(states, step=taken)
    after, _ = step_sets(resumed, len(resumed[0]) - taken)
    expected = [sorted(uninterrupted[s * glob : (s + 1) * glob]) for s in range(len(uninterrupted) // glob)]
    assert before + after == expected
    assert sorted(i for step in before + after for i in step) == sorted(uninterrupted)
