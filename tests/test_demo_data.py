"""The demo dataset generator: deterministic bytes, ImageNet layout, real JPEGs, idempotent and atomic writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mixmo_dist.data import scan_split
from mixmo_dist.data.demo import CLASSES, GENERATOR_VERSION, IMAGE_SIZE, MARKER, generate

TRAIN, VAL = 3, 2


def _hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo"
    assert generate(root, seed=0, train_per_class=TRAIN, val_per_class=VAL) is True
    return root


def test_same_seed_gives_byte_identical_files(demo_root, tmp_path):
    again = tmp_path / "again"
    assert generate(again, seed=0, train_per_class=TRAIN, val_per_class=VAL) is True
    first, second = _hashes(demo_root), _hashes(again)
    assert len(first) == len(CLASSES) * (TRAIN + VAL) + 1  # + the marker
    assert first == second
    other = tmp_path / "other_seed"
    generate(other, seed=1, train_per_class=TRAIN, val_per_class=VAL)
    third = _hashes(other)
    assert third.keys() == first.keys()
    images = [name for name in first if name.endswith(".JPEG")]
    assert all(first[name] != third[name] for name in images)


def test_layout_is_imagenet_style_with_real_jpegs(demo_root):
    assert sorted(p.name for p in demo_root.iterdir()) == sorted([MARKER, "train", "val"])
    classes, train = scan_split(demo_root, "train")
    _, val = scan_split(demo_root, "val", classes)
    assert classes == sorted(CLASSES) and len(classes) == 10
    assert len(train) == 10 * TRAIN and len(val) == 10 * VAL
    for path, label in train + val:
        assert Path(path).parent.name == classes[label]
        assert Path(path).suffix == ".JPEG"
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (IMAGE_SIZE, IMAGE_SIZE)
    # Images of one class differ from each other (nuisance variation), and train differs from val.
    digests = {hashlib.sha256(Path(p).read_bytes()).digest() for p, _ in train + val}
    assert len(digests) == len(train) + len(val)
    marker = json.loads((demo_root / MARKER).read_text())
    assert marker["version"] == GENERATOR_VERSION and marker["seed"] == 0
    assert (marker["train_per_class"], marker["val_per_class"]) == (TRAIN, VAL)


def test_cli_is_idempotent_and_refuses_foreign_directories(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "mixmo_dist.data.demo", "--out", str(out), "--train-per-class", "2"]
    cmd += ["--val-per-class", "1", "--seed", "3"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "wrote" in first.stdout
    before = _hashes(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")}
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert second.stdout.startswith("exists")
    assert _hashes(out) == before and {p: p.stat().st_mtime_ns for p in out.rglob("*.JPEG")} == mtimes
    # No temporary directories are left next to the dataset.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("precious")
    refused = subprocess.run(
        [sys.executable, "-m", "mixmo_dist.data.demo", "--out", str(foreign)], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "is not a demo dataset" in refused.stderr
    assert (foreign / "thesis.txt").read_text() == "precious"


def test_outdated_demo_dataset_is_replaced(tmp_path):
    out = tmp_path / "demo"
    generate(out, seed=0, train_per_class=1, val_per_class=1)
    marker = json.loads((out / MARKER).read_text())
    marker["version"] = GENERATOR_VERSION - 1
    (out / MARKER).write_text(json.dumps(marker))
    first = sorted((out / "train").iterdir())[0]
    (first / "stale.JPEG").write_bytes(b"old")
    assert generate(out, seed=0, train_per_class=2, val_per_class=1) is True
    assert not (first / "stale.JPEG").exists()
    assert len(list(first.iterdir())) == 2
    assert json.loads((out / MARKER).read_text())["version"] == GENERATOR_VERSION
    assert generate(out, seed=0, train_per_class=2, val_per_class=1) is False
    with pytest.raises(ValueError, match="must be >= 1"):
        generate(tmp_path / "bad", train_per_class=0)
