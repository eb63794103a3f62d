"""CIFAR-10/100 and Tiny ImageNet readers on tiny files written in the official formats (no download)."""

from __future__ import annotations

import io
import math
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixmo_dist.config import DataConfig
from mixmo_dist.data import Placement
from mixmo_dist.data.cifar import build_cifar_data, read_cifar
from mixmo_dist.data.tinyimagenet import build_tinyimagenet_data, read_tinyimagenet
from mixmo_dist.model.registry import CIFAR_MEAN, CIFAR_STD

CPU = torch.device("cpu")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------------------------------------------------------
# CIFAR files. Every image is one solid colour: red encodes its index in the split, green its label, so a delivered
# (augmented, normalised) batch can be traced back to its source. The training files are written like the official
# ones: Python-2 pickles (byte-string keys and data, `numpy.core.multiarray._reconstruct`), protocol 2.
# ----------------------------------------------------------------------------------------------------------------


class _Py2StylePickler(pickle._Pickler):
    """Writes `bytes` with the Python 2 `str` opcodes, as the official CIFAR pickles (made by Python 2) hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write(
            pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj
        )
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _write_py2_pickle(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    # Files made with numpy 1.x name the old module path.
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))


def _colour(index: int, label: int) -> tuple[int, int, int]:
    return 10 + 12 * index, 5 + 20 * label, 100


def _cifar_arrays(labels: list[int]) -> np.ndarray:
    data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        data[i] = np.array(_colour(i, label), dtype=np.uint8)[:, None, None]
    return data.reshape(len(labels), 3072)


TRAIN10 = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1], [2, 3, 4]]  # 5 files x 3 images
TEST10 = [5, 6, 7, 8, 9, 0, 1]


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    flat = [label for batch in TRAIN10 for label in batch]
    data = _cifar_arrays(flat)
    for i, batch in enumerate(TRAIN10):
        rows = slice(3 * i, 3 * i + 3)
        _write_py2_pickle(
            folder / f"data_batch_{i + 1}",
            {
                b"batch_label": f"training batch {i + 1} of 5".encode(),
                b"labels": batch,
                b"data": data[rows],
                b"filenames": [f"img_{k}.png".encode() for k in range(3)],
            },
        )
    _write_py2_pickle(folder / "test_batch", {b"labels": TEST10, b"data": _cifar_arrays(TEST10)})
    _write_py2_pickle(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    return root


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory) -> Path:
    """CIFAR-100 files written by Python 3 (str keys, protocol 4): the reader accepts both spellings."""
    root = tmp_path_factory.mktemp("cifar100")
    folder = root / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{k:02d}" for k in range(6)]
    for name, labels in (("train", [0, 1, 2, 3, 4, 5, 0, 1]), ("test", [5, 4, 3, 2])):
        obj = {"fine_labels": labels, "coarse_labels": [k // 2 for k in labels], "data": _cifar_arrays(labels)}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=4))
    meta = {"fine_label_names": names, "coarse_label_names": ["a", "b", "c"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return root


def _cfg(root: Path, dataset: str, **overrides) -> DataConfig:
    fields = dict(
        root=str(root),
        dataset=dataset,
        backend="torch",
        image_size=32,
        val_resize_ratio=1.0,
        train_crop="pad_random",
        num_workers=0,
    )
    fields.update(overrides)
    return DataConfig(**fields)


def _build(builder, cfg, *, rank=0, world=1, unique=2, val_batch=3, mean=CIFAR_MEAN, std=CIFAR_STD, views=1):
    place = Placement(
        unique_per_rank=unique,
        views_per_image=views,
        val_batch_size=val_batch,
        rank=rank,
        world_size=world,
        seed=7,
        device=CPU,
        channels_last=False,
        mean=mean,
        std=std,
    )
    return builder(cfg, place)


def _pixels(images_B3SS: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the normalisation: uint8-valued float [B,3,S,S]."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((images_B3SS * s + m) * 255).round()


def test_cifar10_reads_python2_official_format(cifar10_root):
    classes, train, val = read_cifar(cifar10_root, "cifar10")
    assert classes == CIFAR10_NAMES
    assert len(train) == 15 and len(val) == 7
    assert train.labels_N.tolist() == [label for batch in TRAIN10 for label in batch]
    # Row-major R, G, B planes became HWC pixels: image 4 of the train split is solid _colour(4, label 4).
    assert train.images_NHWC.shape == (15, 32, 32, 3)
    assert (train.images_NHWC[4] == np.array(_colour(4, 4), dtype=np.uint8)).all()
    # The reader also accepts `root` being the batches folder itself.
    assert read_cifar(cifar10_root / "cifar-10-batches-py", "cifar10")[0] == CIFAR10_NAMES


@pytest.mark.parametrize("views", [1, 8], ids=["shared", "per_copy"])
def test_cifar10_loaders_follow_the_torch_backend_contract(cifar10_root, views):
    cfg = _cfg(cifar10_root, "cifar10")
    data = _build(build_cifar_data, cfg, views=views)
    assert (data.num_train, data.num_val, data.backend, data.classes) == (15, 7, "torch", CIFAR10_NAMES)
    assert data.val_split == "test"  # CIFAR validates on its test split, and says so
    assert data.mean == CIFAR_MEAN and data.std == CIFAR_STD
    # Validation: every test image once, in order, exactly (32 px at ratio 1 is the identity), last batch short.
    batches = list(data.val)
    assert [b[0].shape[0] for b in batches] == [3, 3, 1]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert labels.tolist() == TEST10
    expected = torch.tensor([_colour(i, label) for i, label in enumerate(TEST10)], dtype=torch.float32)
    torch.testing.assert_close(_pixels(images, CIFAR_MEAN, CIFAR_STD)[:, :, 16, 16], expected)
    assert (_pixels(images, CIFAR_MEAN, CIFAR_STD) == expected[:, :, None, None]).all()
    # Training: ceil(15 / 2) batches of 2; pad-4 random crops show zero padding on some images but the centre is
    # always the image; every label travels with its own image; an epoch covers every image.
    assert len(data.train) == math.ceil(15 / 2)
    seen, padded = [], 0
    flat = [label for batch in TRAIN10 for label in batch]
    for images, labels in data.train:
        px = _pixels(images, CIFAR_MEAN, CIFAR_STD)
        assert images.shape[0] == labels.shape[0] * views  # V views of each image, in a row
        for b in range(images.shape[0]):
            index = int((px[b, 0, 16, 16] - 10) / 12)
            assert tuple(px[b, :, 16, 16].tolist()) == _colour(index, flat[index])
            assert int(labels[b // views]) == flat[index]
            seen.append(index)
            padded += int((px[b].sum(0) == 0).any())
    assert sorted(set(seen)) == list(range(15)) and len(seen) == 16 * views
    assert padded > 0  # the pad-and-crop augmentation really ran


def test_cifar_train_resume_and_rank_split(cifar10_root):
    cfg = _cfg(cifar10_root, "cifar10")
    a = _build(build_cifar_data, cfg).train
    full = [labels.tolist() for _, labels in a]
    images_full = [images for images, _ in _build(build_cifar_data, cfg).train]
    b = _build(build_cifar_data, cfg).train
    it = iter(b)
    next(it), next(it), next(it)
    state = b.state_dict()
    c = _build(build_cifar_data, cfg).train
    c.load_state_dict(state)
    rest = list(c)
    assert [labels.tolist() for _, labels in rest] == full[3:]
    torch.testing.assert_close(rest[0][0], images_full[3])  # same augmentation after the restore
    # Two ranks: disjoint val shards covering the test split; the same number of train batches each.
    ranks = [_build(build_cifar_data, cfg, rank=r, world=2) for r in range(2)]
    assert len(ranks[0].train) == len(ranks[1].train) == math.ceil(15 / 4)
    val = [torch.cat([labels for _, labels in d.val]).tolist() for d in ranks]
    assert val[0] == TEST10[0::2] and val[1] == TEST10[1::2]


def test_cifar100_python3_files_and_fine_labels(cifar100_root):
    data = _build(build_cifar_data, _cfg(cifar100_root, "cifar100"), unique=4)
    assert data.classes == [f"class_{k:02d}" for k in range(6)]
    assert (data.num_train, data.num_val) == (8, 4)
    assert torch.cat([labels for _, labels in data.val]).tolist() == [5, 4, 3, 2]


def test_cifar_pickle_may_only_rebuild_numpy_arrays(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    victim = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(victim), "w"))

    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"], "x": Evil()}, protocol=4))
    with pytest.raises(ValueError, match=r"batches\.meta: refusing to load global (io|builtins)\.open"):
        read_cifar(tmp_path, "cifar10")
    assert not victim.exists()


def test_cifar_errors_name_the_file(cifar10_root, tmp_path):
    with pytest.raises(ValueError, match="no cifar-100-python/ folder"):
        read_cifar(cifar10_root, "cifar100")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=4))
    with pytest.raises(ValueError, match="data_batch_1"):
        read_cifar(tmp_path, "cifar10")
    (folder / "data_batch_1").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="cannot read CIFAR file .*data_batch_1"):
        read_cifar(tmp_path, "cifar10")
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _cifar_arrays([0, 5]), "labels": [0, 5]}))
    with pytest.raises(ValueError, match=r"data_batch_1: labels outside \[0, 2\)"):
        read_cifar(tmp_path, "cifar10")


# ----------------------------------------------------------------------------------------------------------------
# Tiny ImageNet in its own layout.
# ----------------------------------------------------------------------------------------------------------------

WNIDS = ["n02124075", "n01443537", "n09246464"]  # sorted: n01443537 (0), n02124075 (1), n09246464 (2)


def _tiny_colour(index: int, label: int) -> tuple[int, int, int]:
    return 30 + 20 * index, 40 + 60 * label, 90


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    for label, wnid in enumerate(sorted(WNIDS)):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for k in range(3):
            Image.new("RGB", (16, 16), _tiny_colour(k, label)).save(images / f"{wnid}_{k}.JPEG", quality=100)
            boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t15\t15\n")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    (root / "val" / "images").mkdir(parents=True)
    val_labels = [2, 0, 1, 1, 0]
    lines = []
    for i, label in enumerate(val_labels):
        Image.new("RGB", (16, 16), _tiny_colour(i, label)).save(root / "val" / "images" / f"val_{i}.JPEG", quality=100)
        lines.append(f"val_{i}.JPEG\t{sorted(WNIDS)[label]}\t0\t0\t15\t15\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    (root / "test" / "images").mkdir(parents=True)  # unlabelled: must be ignored
    return root


def test_tinyimagenet_layout_and_labels(tiny_root):
    classes, train, val = read_tinyimagenet(tiny_root)
    assert classes == sorted(WNIDS)
    assert len(train) == 9 and all(Path(p).parent.name == "images" for p, _ in train)
    assert [Path(p).parent.parent.name for p, label in train] == [classes[label] for _, label in train]
    assert [(Path(p).name, label) for p, label in val] == [
        (f"val_{i}.JPEG", lab) for i, lab in enumerate([2, 0, 1, 1, 0])
    ]


def test_tinyimagenet_loaders(tiny_root):
    cfg = _cfg(tiny_root, "tinyimagenet", image_size=16)
    half = (0.5, 0.5, 0.5)
    data = _build(build_tinyimagenet_data, cfg, unique=2, val_batch=2, mean=half, std=half)
    assert (data.num_train, data.num_val, data.classes, data.backend) == (9, 5, sorted(WNIDS), "torch")
    assert data.val_split == "val"
    images = torch.cat([b[0] for b in data.val])
    labels = torch.cat([b[1] for b in data.val])
    assert labels.tolist() == [2, 0, 1, 1, 0]
    centre = _pixels(images, half, half)[:, :, 8, 8]
    expected = torch.tensor([_tiny_colour(i, label) for i, label in enumerate([2, 0, 1, 1, 0])], dtype=torch.float32)
    assert (centre - expected).abs().max() <= 3  # JPEG rounding of a solid colour
    batches = list(data.train)
    assert len(batches) == len(data.train) == 5 and all(b[0].shape == (2, 3, 16, 16) for b in batches)
    for images, labels in batches:  # labels travel with their images (green encodes the label)
        green = _pixels(images, half, half)[:, 1, 8, 8]
        assert ((green - (40 + 60 * labels)).abs() <= 3).all()


def test_tinyimagenet_val_in_class_folders(tiny_root, tmp_path):
    root = tmp_path / "tiny"
    shutil.copytree(tiny_root, root)
    shutil.rmtree(root / "val")
    for label, wnid in enumerate(sorted(WNIDS)):
        (root / "val" / wnid).mkdir(parents=True)
        Image.new("RGB", (16, 16), _tiny_colour(0, label)).save(root / "val" / wnid / "v.JPEG")
    _, _, val = read_tinyimagenet(root)
    assert [label for _, label in val] == [0, 1, 2]


def test_tinyimagenet_errors_name_the_culprit(tiny_root, tmp_path):
    with pytest.raises(ValueError, match="wnids.txt"):
        read_tinyimagenet(tmp_path)
    root = tmp_path / "tiny"
    shutil.copytree(tiny_root, root)
    annotations = root / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations\.txt:6: class 'n99999999'"):
        read_tinyimagenet(root)
    annotations.write_text(f"val_9.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match=r"val_annotations\.txt:1: listed image .*val_9\.JPEG does not exist"):
        read_tinyimagenet(root)
    shutil.rmtree(root / "train" / WNIDS[2])
    with pytest.raises(ValueError, match="n09246464"):
        read_tinyimagenet(root)
