"""The DALI backend on real CPU pipelines over tiny generated JPEG folders (and dali-gpu when CUDA is present)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import without_root_file_access
from PIL import Image

pytest.importorskip("nvidia.dali")

from mixmo_dist.config import DataConfig  # noqa: E402
from mixmo_dist.data import Placement  # noqa: E402
from mixmo_dist.data.dali import build_dali_data  # noqa: E402
from mixmo_dist.data.folder import CorruptImageError, load_rgb  # noqa: E402
from mixmo_dist.data.plan import EpochPlan  # noqa: E402

CPU = torch.device("cpu")
SIZE = 24


def _solid_color(split: int, cls: int, k: int) -> tuple[int, int, int]:
    """A colour unique to (split, class, file): the image content then identifies the file."""
    return (40 + 15 * k, 40 + 60 * cls, 120 + 60 * split)


@pytest.fixture(scope="module")
def solid_root(tmp_path_factory) -> Path:
    """train: 11 solid-colour JPEGs in 3 classes (4, 4, 3); val: 7 in the same classes (3, 2, 2)."""
    root = tmp_path_factory.mktemp("solid")
    for split_id, (split, counts) in enumerate((("train", (4, 4, 3)), ("val", (3, 2, 2)))):
        k = 0
        for cls, count in enumerate(counts):
            folder = root / split / f"n{cls:08d}"
            folder.mkdir(parents=True)
            for _ in range(count):
                color = _solid_color(split_id, cls, k)
                Image.new("RGB", (44, 36), color).save(folder / f"img_{k:03d}.JPEG", quality=95)
                k += 1
    return root


@pytest.fixture(scope="module")
def noise_root(tmp_path_factory) -> Path:
    """Random-noise JPEGs (2 classes, 10 train / 4 val): every crop and flip changes the pixels."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 5), ("val", 2)):
        for cls in range(2):
            folder = root / split / f"c{cls}"
            folder.mkdir(parents=True)
            for k in range(per_class):
                pixels_HW3 = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels_HW3).save(folder / f"{k}.JPEG", quality=90)
    return root


def _build(
    root,
    *,
    batch=3,
    val_batch=2,
    rank=0,
    world_size=1,
    seed=0,
    channels_last=False,
    views=1,
    views_in_dali=False,
    **cfg_kwargs,
):
    """dali-cpu data; `views_in_dali`: random_resized views per copy resized by DALI, the GPU's graph."""
    cfg_kwargs.setdefault("dali_threads", 1)
    cfg = DataConfig(root=str(root), backend="dali-cpu", image_size=SIZE, **cfg_kwargs)
    place = Placement(
        unique_per_rank=batch,
        views_per_image=views,
        val_batch_size=val_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=CPU,
        channels_last=channels_last,
    )
    return build_dali_data(cfg, place, gpu=False, views_in_dali=views_in_dali)


# Shared view; one view per copy resized by torch from DALI's draws (the CPU's graph); and resized in DALI (the GPU's).
VIEWS = pytest.mark.parametrize(
    ("views", "views_in_dali"), [(1, False), (8, False), (8, True)], ids=["shared", "per_copy", "per_copy_dali_resize"]
)


def _to_pixels(images_BCHW: torch.Tensor, data) -> torch.Tensor:
    """Undoes the normalisation: float [B,3,H,W] in 0-255 units."""
    mean = torch.tensor(data.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.std).view(1, 3, 1, 1) * 255
    return images_BCHW * std + mean


def _file_color(path: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(load_rgb(path), dtype=np.float32).reshape(-1, 3).mean(0))


@VIEWS
@pytest.mark.parametrize("channels_last", [False, True])
def test_train_batches_shape_dtype_values_and_labels(solid_root, channels_last, views, views_in_dali):
    data = _build(solid_root, batch=4, channels_last=channels_last, views=views, views_in_dali=views_in_dali)
    assert data.backend == "dali-cpu" and data.num_train == 11 and data.num_val == 7
    assert data.classes == ["n00000000", "n00000001", "n00000002"]
    assert len(data.train) == math.ceil(11 / 4) == 3
    paths = data.train.paths
    batches = list(data.train.iter_with_indices())
    assert len(batches) == 3
    for images, labels_B, index_B in batches:
        assert images.shape == (4 * views, 3, SIZE, SIZE) and images.dtype == torch.float32
        assert labels_B.dtype == torch.int64 and labels_B.shape == (4,)
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        pixels = _to_pixels(images, data)
        assert pixels.min() > -1.5 and pixels.max() < 256.5
        for row in range(4 * views):
            # The label is the class folder of the file the row came from, and the pixels are that file's colour.
            idx = index_B[row // views].item()
            assert labels_B[row // views].item() == data.classes.index(Path(paths[idx]).parent.name)
            torch.testing.assert_close(pixels[row].mean((1, 2)), _file_color(paths[idx]), atol=2.0, rtol=0)
            assert pixels[row].std((1, 2)).max() < 2.0  # a solid image stays solid through crop and resize


def test_ranks_are_disjoint_cover_each_epoch_and_have_equal_steps(solid_root):
    # 11 samples over 2 ranks of 3: DALI would shard them 5/6; both ranks must still yield ceil(11/6) = 2 batches.
    loaders = [_build(solid_root, batch=3, rank=r, world_size=2, seed=7).train for r in range(2)]
    orders = []
    for epoch in range(3):
        seen = []
        for loader in loaders:
            batches = list(loader.iter_with_indices())
            assert len(batches) == len(loader) == 2
            assert all(b[0].shape[0] == 3 for b in batches)
            seen.append(torch.cat([b[2] for b in batches]).tolist())
        assert set(seen[0]) | set(seen[1]) == set(range(11))
        # 12 slots for 11 samples: exactly one sample is read twice, and never the same sample over and over.
        assert len(seen[0]) + len(seen[1]) == 12 and len(set(seen[0] + seen[1])) == 11
        for rank, loader in enumerate(loaders):
            assert seen[rank] == loader.epoch_indices(epoch).tolist()  # DALI's shard is the planned part
        orders.append(seen[0] + seen[1])
    assert orders[0] != orders[1] and orders[1] != orders[2]  # a fresh global shuffle every epoch


def test_three_ranks_uneven_steps(solid_root):
    # 11 samples, 3 ranks of 2: DALI's natural shards would be 3/4/4; every rank yields ceil(11/6) = 2 batches.
    counts = []
    union = set()
    for rank in range(3):
        loader = _build(solid_root, batch=2, rank=rank, world_size=3).train
        batches = list(loader.iter_with_indices())
        counts.append(len(batches))
        union |= {i for b in batches for i in b[2].tolist()}
    assert counts == [2, 2, 2]
    assert union == set(range(11))


@pytest.mark.parametrize("world_size", [1, 3])
def test_val_counts_every_sample_exactly_once(solid_root, world_size):
    indices, total_batches = [], 0
    for rank in range(world_size):
        data = _build(solid_root, val_batch=2, rank=rank, world_size=world_size)
        val = data.val
        paths = val.paths
        for _ in range(2):  # a second pass repeats the first exactly
            got = []
            for images, labels_B, index_B in val.iter_with_indices():
                assert images.shape[1:] == (3, SIZE, SIZE) and 1 <= images.shape[0] <= 2
                assert labels_B.tolist() == [data.classes.index(Path(paths[i]).parent.name) for i in index_B.tolist()]
                pixels = _to_pixels(images, data)
                for row, idx in enumerate(index_B.tolist()):
                    torch.testing.assert_close(pixels[row].mean((1, 2)), _file_color(paths[idx]), atol=2.0, rtol=0)
                got.append(index_B.tolist())
            assert len(got) == len(val)
            assert sum(len(b) for b in got) == val.num_samples
        total_batches += len(got)
        indices += [i for b in got for i in b]
    assert sorted(indices) == list(range(7))  # no padding, no duplicate, nothing missing
    assert total_batches == 4  # one rank: 2+2+2+1; three ranks: shards 2/2/3 -> 1+1+2


def _batches(loader, count):
    out = []
    for images, labels, index in loader.iter_with_indices():
        out.append((images.clone(), labels.clone(), index.clone()))
        if len(out) == count:
            break
    return out


@VIEWS
@pytest.mark.parametrize("train_crop", ["random_resized", "pad_random"])
def test_mid_epoch_resume_is_bit_identical(noise_root, train_crop, views, views_in_dali):
    kwargs = dict(batch=2, rank=1, world_size=2, seed=3, train_crop=train_crop, channels_last=True, views=views)
    kwargs.update(views_in_dali=views_in_dali)
    reference = _build(noise_root, **kwargs).train
    assert len(reference) == 3
    expected = _batches(reference, 3) + _batches(reference, 3)  # epochs 0 and 1

    interrupted = _build(noise_root, **kwargs).train
    first = _batches(interrupted, 2)
    for (a, la, ia), (b, lb, ib) in zip(first, expected[:2]):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ia, ib)
    state = json.loads(json.dumps(interrupted.state_dict()))  # must survive JSON
    assert state["epoch"] == 0 and state["batch"] == 2 and isinstance(state["dali_checkpoint"], str)

    resumed = _build(noise_root, **kwargs).train
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # what a trainer does at the top of the epoch: must keep the restored position
    assert resumed.state_dict() == state
    got = _batches(resumed, 1) + _batches(resumed, 3)  # the rest of epoch 0, then epoch 1
    assert len(got) == 4
    for (a, la, ia), (b, lb, ib) in zip(got, expected[2:]):
        assert torch.equal(ia, ib) and torch.equal(la, lb)
        assert torch.equal(a, b)
    # The check can fail: the same sample comes out differently in another epoch (random crop / flip).
    epoch0 = {b[2][i].item(): b[0][i * views] for b in expected[:3] for i in range(2)}
    later = [
        (epoch0[b[2][i].item()], b[0][i * views]) for b in expected[3:] for i in range(2) if b[2][i].item() in epoch0
    ]
    assert later and not any(torch.equal(a, b) for a, b in later)
    assert expected[0][0].shape[0] == 2 * views


def _spy_cpu_views(loader) -> list:
    """Records every call of the loader's CPU view builder: (decoded images, draws, views built)."""
    calls, build = [], loader._cpu_views

    def spy(images_HW3, draws_BD):
        out = build(images_HW3, draws_BD)
        calls.append(([image.clone() for image in images_HW3], draws_BD.clone(), out.clone()))
        return out

    loader._cpu_views = spy
    return calls


@pytest.mark.parametrize(("channels_last", "hflip"), [(False, True), (True, False)])
def test_cpu_views_per_copy_are_random_resized_crops_of_dalis_decoded_image(noise_root, channels_last, hflip):
    """Random_resized with one view per copy on the CPU: DALI decodes each image once and draws every view's box and
    flip; torch resizes. Each view is torchvision's resized_crop (antialiased bilinear) of its own image at its own
    box, flipped on its own coin and normalised; each box lies in the image with RandomResizedCrop's area (from
    min_crop_scale = 0.5) and aspect ratio (3/4 to 4/3)."""
    from torchvision.transforms.v2 import functional as TF

    views = 8
    data = _build(noise_root, batch=4, views=views, min_crop_scale=0.5, hflip=hflip, channels_last=channels_last)
    calls = _spy_cpu_views(data.train)
    delivered = [(images.clone(), index.clone()) for images, _, index in data.train.iter_with_indices()]
    assert len(calls) == len(delivered) == 3  # 10 images, 4 per batch
    mean = torch.tensor(data.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float64).view(3, 1, 1)
    flipped, worst = [], 0.0
    for (decoded, draws, built), (images, index) in zip(calls, delivered):
        assert torch.equal(images, built) and images.shape == (4 * views, 3, SIZE, SIZE)
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for b, image_HW3 in enumerate(decoded):
            # The decoded image is this row's file (the same libjpeg-turbo decode as Pillow's, within a grey level).
            from_file = torch.from_numpy(np.asarray(load_rgb(data.train.paths[index[b]]), dtype=np.float32))
            assert (image_HW3.float() - from_file).abs().mean() < 1.0
            height, width = image_HW3.shape[:2]
            for v in range(views):
                top, left, box_h, box_w = draws[b, 4 * v : 4 * v + 4].tolist()
                flip = bool(draws[b, 4 * views + v])
                assert 0 <= top and top + box_h <= height and 0 <= left and left + box_w <= width
                assert 0.5 - 0.05 <= box_h * box_w / (height * width) <= 1.0
                assert 3 / 4 - 0.06 <= box_w / box_h <= 4 / 3 + 0.06
                image_3HW = image_HW3.permute(2, 0, 1)
                expected = TF.resized_crop(image_3HW, top, left, box_h, box_w, [SIZE, SIZE], antialias=True)
                if flip:
                    expected = expected.flip(2)
                expected = (expected.double() / 255 - mean) / std
                grey_levels = ((images[b * views + v].double() - expected) * std * 255).abs().max().item()
                worst = max(worst, grey_levels)
                flipped.append(flip)
    assert worst <= 1.0 + 1e-3, worst  # torch's channels_last uint8 kernel vs torchvision's path: rounding only
    if hflip:
        assert 0 < sum(flipped) < len(flipped)
    else:
        assert not any(flipped)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_view_threads_do_every_sample_once_and_raise_a_failure(threads):
    from mixmo_dist.data.dali import _on_threads

    done = []
    _on_threads(done.append, 40, threads)
    assert sorted(done) == list(range(40))

    def fail_at_7(i: int) -> None:
        if i == 7:
            raise ValueError("sample 7")

    with pytest.raises(ValueError, match="sample 7"):
        _on_threads(fail_at_7, 40, threads)
    assert not [t for t in threading.enumerate() if t.name == "mixmo-dali-views"]


@pytest.mark.parametrize("saved_in_dali", [True, False])
def test_a_state_of_the_other_views_graph_resumes_at_its_batch(noise_root, caplog, saved_in_dali):
    """A mid-epoch state written by the other per-copy graph (DALI's resize before 2026-12-07, or the GPU's): its DALI
    checkpoint cannot restore this graph, so the loader resumes at the same batch, same files, with new draws."""
    kwargs = dict(batch=2, views=8, seed=4)
    writer = _build(noise_root, views_in_dali=saved_in_dali, **kwargs).train
    _batches(writer, 2)
    state = writer.state_dict()
    assert state["batch"] == 2 and state["dali_checkpoint"] is not None
    if saved_in_dali:
        del state["graph"]  # as the states written before the key existed
    reference = [index for _, _, index in _batches(_build(noise_root, **kwargs).train, 5)]
    reader = _build(noise_root, views_in_dali=not saved_in_dali, **kwargs).train
    with caplog.at_level("WARNING", logger="mixmo_dist"):
        reader.load_state_dict(state)
    assert "another pipeline graph" in caplog.text and "resuming at batch 2" in caplog.text
    got = _batches(reader, 3)
    assert [index.tolist() for _, _, index in got] == [index.tolist() for index in reference[2:]]


def test_cpu_views_per_copy_do_not_depend_on_the_number_of_threads(noise_root):
    """The same bits with 1 and 3 DALI threads (and as many view-building threads)."""
    kwargs = dict(batch=3, views=8, seed=5, channels_last=True)
    one = _batches(_build(noise_root, **kwargs).train, 3)
    three = _batches(_build(noise_root, dali_threads=3, **kwargs).train, 3)
    for (a, la, ia), (b, lb, ib) in zip(one, three, strict=True):
        assert torch.equal(ia, ib) and torch.equal(la, lb) and torch.equal(a, b)


def test_a_held_batch_of_cpu_views_is_never_written_again_and_dropped_ones_are_reused(noise_root):
    """The view buffers are reused only once the consumer has dropped every tensor of the batch."""
    loader = _build(noise_root, batch=2, views=8).train
    assert len(loader) == 5
    it = loader.iter_with_indices()
    held, _, _ = next(it)
    held_row = held[3]  # a view of the batch keeps it alive as well
    snapshot = held.clone()
    del held
    buffers = set()
    for _epoch in range(2):
        for images, _, _ in it:
            buffers.add(images.data_ptr())
            del images
        it = loader.iter_with_indices()
    assert torch.equal(held_row, snapshot[3])
    slots = {slot[0].data_ptr() for slot in loader._view_slots}
    # 3 slots: the held batch, the one the loop has, and the next (the generator holds the last one it yielded).
    assert len(loader._view_slots) == 3 and buffers <= slots and held_row.data_ptr() not in buffers


@pytest.mark.parametrize(
    ("train_crop", "views_in_dali"), [("pad_random", False), ("random_resized", False), ("random_resized", True)]
)
def test_one_view_per_copy_gives_the_authors_count_of_distinct_views(noise_root, train_crop, views_in_dali):
    """As for the torch backend: 1 distinct view among an image's 8 copies (b=4, M=2) with a shared view; with one
    view per copy what 8 independent draws give (pad_random: 7.83 on average; random_resized: 8)."""
    from test_data_torch import AUTHORS_DISTINCT_PAD, COPIES, distinct_views_per_image

    kwargs = dict(batch=5, train_crop=train_crop, hflip=True, min_crop_scale=0.1, views_in_dali=views_in_dali)
    assert set(distinct_views_per_image(_build(noise_root, **kwargs).train, epochs=2)) == {1.0}
    loader = _build(noise_root, views=COPIES, **kwargs).train
    images, _ = next(iter(loader))
    assert images.shape == (5 * COPIES, 3, SIZE, SIZE)
    mean = float(np.mean(distinct_views_per_image(loader, epochs=40)))  # 400 image-steps
    if train_crop == "pad_random":
        assert abs(mean - AUTHORS_DISTINCT_PAD) < 0.08, mean
    else:
        assert mean > 7.95, mean


def test_set_epoch_jumps_to_the_same_batches_as_iterating(noise_root):
    kwargs = dict(batch=2, world_size=2, seed=5)
    walker = _build(noise_root, **kwargs).train
    _batches(walker, 3)
    epoch1 = _batches(walker, 3)
    jumper = _build(noise_root, **kwargs).train
    jumper.set_epoch(1)
    for (a, _, ia), (b, _, ib) in zip(_batches(jumper, 3), epoch1):
        assert torch.equal(ia, ib) and torch.equal(a, b)
    with pytest.raises(ValueError, match="epoch"):
        jumper.set_epoch(-1)


def test_state_from_another_layout_is_refused(noise_root):
    state = _build(noise_root, batch=2, world_size=2).train.state_dict()
    other = _build(noise_root, batch=2, world_size=1).train  # another global batch: another epoch plan
    with pytest.raises(ValueError, match="steps is 3 in the checkpoint but 5 now"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="steps"):
        other.load_resharded([state], step=0)
    same_global = _build(noise_root, batch=4, world_size=1).train  # same global batch, one rank instead of two
    with pytest.raises(ValueError, match="world_size is 2 in the checkpoint but 1 now"):
        same_global.load_state_dict(state)  # a rank's own state only fits its own rank: resharding is explicit
    same_global.load_resharded([state, state], step=0)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({"epoch": 0, "batch": 0})


@pytest.mark.parametrize("views", [1, 8], ids=["shared", "per_copy"])
def test_pad_random_pads_four_black_pixels_at_most(solid_root, views):
    data = _build(solid_root, batch=4, train_crop="pad_random", hflip=False, views=views)
    widths = set()
    for _ in range(3):
        for images, _, index_B in data.train.iter_with_indices():
            pixels = _to_pixels(images, data)
            is_black_BHW = pixels.abs().amax(1) < 1.0  # the zero padding, in pixel units
            for row in range(images.shape[0]):
                cols = is_black_BHW[row].all(0)  # fully black columns
                rows = is_black_BHW[row].all(1)
                # The padding is a band of whole rows/columns on at most one side per axis, never wider than 4.
                left, right = int(cols[: SIZE // 2].sum()), int(cols[SIZE // 2 :].sum())
                top, bottom = int(rows[: SIZE // 2].sum()), int(rows[SIZE // 2 :].sum())
                assert min(left, right) == 0 and max(left, right) <= 4
                assert min(top, bottom) == 0 and max(top, bottom) <= 4
                assert bool(cols[:left].all()) and not bool(cols[left : SIZE - right].any())
                widths.add((left - right, top - bottom))
                inner = pixels[row][:, top : SIZE - bottom, left : SIZE - right]
                color = _file_color(data.train.paths[index_B[row // views].item()])
                torch.testing.assert_close(inner.mean((1, 2)), color, atol=2.0, rtol=0)
    assert len(widths) >= 5  # the offsets really vary (9 x 9 possibilities)


@VIEWS
@pytest.mark.parametrize("hflip", [False, True])
def test_horizontal_flip(tmp_path, hflip, views, views_in_dali):
    """Flips are drawn per view: with one view per copy an image's views are flipped on their own coins."""
    for split in ("train", "val"):
        folder = tmp_path / split / "a"
        folder.mkdir(parents=True)
        for k in range(8):
            pixels_HW3 = np.zeros((32, 40, 3), np.uint8)
            pixels_HW3[:, :20] = (220, 30, 30)  # red left half, blue right half
            pixels_HW3[:, 20:] = (30, 30, 220)
            Image.fromarray(pixels_HW3).save(folder / f"{k}.JPEG", quality=95)
    # min_crop_scale=1: the whole image, so both halves are always inside the crop.
    data = _build(tmp_path, batch=4, min_crop_scale=1.0, hflip=hflip, views=views, views_in_dali=views_in_dali)
    flipped = []
    for _ in range(4):
        for images, _ in data.train:
            pixels = _to_pixels(images, data)
            red_left = pixels[:, 0, :, : SIZE // 4].mean((1, 2)) > pixels[:, 2, :, : SIZE // 4].mean((1, 2))
            flipped += (~red_left).view(-1, views).tolist()  # [image][view]
    if hflip:
        assert 0 < sum(map(sum, flipped)) < views * len(flipped)
        if views > 1:  # 32 images: all 8 views alike in every one has probability 2^-224
            assert any(0 < sum(image) < views for image in flipped)
    else:
        assert not any(map(any, flipped))
    for images, _ in data.val:  # validation never flips
        pixels = _to_pixels(images, data)
        assert bool((pixels[:, 0, :, :4].mean((1, 2)) > pixels[:, 2, :, :4].mean((1, 2))).all())


def test_quirky_files_decode(tmp_path):
    expected = {"cmyk.JPEG": (200, 60, 30), "gray.JPEG": (90, 90, 90), "png.JPEG": (10, 220, 130)}
    for split in ("train", "val"):
        folder = tmp_path / split / "a"
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 36), expected["cmyk.JPEG"]).convert("CMYK").save(folder / "cmyk.JPEG")
        Image.new("L", (40, 36), 90).save(folder / "gray.JPEG")
        Image.new("RGB", (40, 36), expected["png.JPEG"]).save(folder / "png.JPEG", format="PNG")
        other = tmp_path / split / "b"
        other.mkdir(parents=True)
        Image.new("RGB", (40, 36), (70, 80, 90)).save(other / "rgb.JPEG")
    expected["rgb.JPEG"] = (70, 80, 90)
    data = _build(tmp_path, batch=4, val_batch=4)
    for loader in (data.train, data.val):
        seen = set()
        for images, _, index_B in loader.iter_with_indices():
            pixels = _to_pixels(images, data)
            for row, idx in enumerate(index_B.tolist()):
                name = Path(loader.paths[idx]).name
                seen.add(name)
                want = torch.tensor(expected[name], dtype=torch.float32)
                torch.testing.assert_close(pixels[row].mean((1, 2)), want, atol=2.0, rtol=0)
        assert seen == set(expected)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_file_error_names_the_file(tmp_path, damage):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for k in range(3):
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{k}.JPEG")
    for split in ("train", "val"):
        bad = tmp_path / split / "b" / "1.JPEG"
        raw = bad.read_bytes()
        # truncated: DALI's own message names the file; garbage (a damaged header): it does not, we find it.
        bad.write_bytes(raw[: len(raw) // 3] if damage == "truncated" else rng.bytes(len(raw)))
    data = _build(tmp_path, batch=2, val_batch=2)
    with pytest.raises(CorruptImageError, match=str(tmp_path / "train" / "b" / "1.JPEG")):
        for _ in range(2):
            for _batch in data.train:
                pass
    with pytest.raises(RuntimeError, match="failed earlier"):
        next(iter(data.train))
    with pytest.raises(CorruptImageError, match=str(tmp_path / "val" / "b" / "1.JPEG")):
        for _batch in data.val:
            pass


def test_bad_arguments_name_the_culprit(solid_root):
    cfg = DataConfig(root=str(solid_root), backend="dali-cpu", image_size=SIZE)
    common = dict(unique_per_rank=2, val_batch_size=2, rank=0, world_size=1, seed=0, device=CPU)
    with pytest.raises(ValueError, match="unique_per_rank"):
        Placement(**{**common, "unique_per_rank": 0})
    with pytest.raises(ValueError, match="dali-gpu"):
        build_dali_data(cfg, Placement(**common), gpu=True)
    with pytest.raises(ValueError, match="rank"):
        Placement(**{**common, "rank": 1})
    with pytest.raises(ValueError, match="fewer than the 8 ranks"):
        build_dali_data(cfg, Placement(**{**common, "world_size": 8}), gpu=False)
    missing = DataConfig(root=str(solid_root / "nowhere"), backend="dali-cpu", image_size=SIZE)
    with pytest.raises(ValueError, match="nowhere"):
        build_dali_data(missing, Placement(**common), gpu=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decoding_matches_cpu_and_resumes(solid_root, noise_root):
    cuda = torch.device("cuda", 0)
    place = Placement(
        unique_per_rank=4, val_batch_size=4, rank=0, world_size=1, seed=0, channels_last=True, device=cuda
    )
    cfg = DataConfig(root=str(solid_root), backend="dali-gpu", image_size=SIZE, dali_threads=2)
    gpu = build_dali_data(cfg, place, gpu=True)
    cpu = _build(solid_root, batch=4, val_batch=4, channels_last=True)
    pairs = list(zip(gpu.val, cpu.val))
    assert len(pairs) == 2
    for (xg, yg), (xc, yc) in pairs:
        assert xg.device.type == "cuda" and yg.device.type == "cuda"
        assert xg.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yg.cpu(), yc)
        # Solid colours: nvJPEG and libjpeg-turbo agree up to rounding (1/255 / std ~ 0.02 per level).
        assert (xg.cpu() - xc).abs().max() < 0.1

    cfg = DataConfig(root=str(noise_root), backend="dali-gpu", image_size=SIZE, dali_threads=2)
    first = build_dali_data(cfg, place, gpu=True)
    images, labels = next(iter(first.train))
    assert images.shape == (4, 3, SIZE, SIZE) and images.device.type == "cuda" and labels.device.type == "cuda"
    state = json.loads(json.dumps(first.train.state_dict()))
    expected = next(iter(first.train))[0].cpu()
    again = build_dali_data(cfg, place, gpu=True)
    again.train.load_state_dict(state)
    assert torch.equal(next(iter(again.train))[0].cpu(), expected)


@pytest.mark.parametrize(("world", "new_world", "taken"), [(4, 2, 1), (2, 1, 1), (1, 2, 1), (2, 4, 2)])
def test_resume_on_another_world_size_reads_the_rest_of_the_epoch(noise_root, world, new_world, taken):
    """The DALI loader follows the shared epoch plan: a global batch of 4 stopped after `taken` steps at `world`
    ranks and resumed at `new_world` reads exactly the samples (padding included) an uninterrupted run reads,
    global step by global step; the torch backend's plan gives the same order."""
    glob = 4

    def run(loaders, steps):
        iters = [loader.iter_with_indices() for loader in loaders]
        return [sorted(i for it in iters for i in next(it)[2].tolist()) for _ in range(steps)]

    whole = _build(noise_root, batch=glob, world_size=1, seed=11).train
    expected = run([whole], len(whole))
    old = [_build(noise_root, batch=glob // world, rank=r, world_size=world, seed=11).train for r in range(world)]
    before = run(old, taken)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in old]
    new = [_build(noise_root, batch=glob // new_world, rank=r, world_size=new_world, seed=11).train
           for r in range(new_world)]  # fmt: skip
    for loader in new:
        loader.load_resharded(states, step=taken)
    after = run(new, len(new[0]) - taken)
    assert before + after == expected
    order = EpochPlan(10, unique_per_rank=glob, rank=0, world_size=1, seed=11).global_order(0).tolist()
    assert expected == [sorted(order[s * glob : (s + 1) * glob]) for s in range(len(expected))]


def test_an_unreadable_file_is_named_unreadable_not_corrupt(tmp_path):
    """A file the training user may not read (chmod 000) is intact: the error says permission, naming the file, not
    "cannot decode" (issue 20). Run in a child that has lost root's right to ignore file modes."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for k in range(3):
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / f"{k}.JPEG")
    bad = {split: tmp_path / split / "b" / "1.JPEG" for split in ("train", "val")}
    for path in bad.values():
        path.chmod(0)
    child = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_data_dali import _build
        from mixmo_dist.data.folder import CorruptImageError, load_rgb
        data = _build({str(tmp_path)!r}, batch=2, val_batch=2)
        for name, loader in (("train", data.train), ("val", data.val)):
            try:
                for _ in range(2):
                    for _batch in loader:
                        pass
            except CorruptImageError as err:
                print(name, type(err).__name__, err)
        try:
            load_rgb({str(bad["train"])!r})  # the torch backend's decoder
        except CorruptImageError as err:
            print("pillow", type(err).__name__, err)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", child],
        preexec_fn=without_root_file_access,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and len(lines) == 3, res.stdout[-3000:] + res.stderr[-3000:]
    for line, who, path in zip(
        lines, ("train", "val", "pillow"), (bad["train"], bad["val"], bad["train"]), strict=True
    ):
        assert line.startswith(f"{who} UnreadableImageError cannot read image {path}: Permission denied"), line
