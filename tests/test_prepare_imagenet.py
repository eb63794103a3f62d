"""ImageNet validation preparation on a generated miniature: devkit tarball (real meta.mat) and Kaggle CSV."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mixmo_dist.data.folder import scan_split
from mixmo_dist.data.index import folder_tables
from mixmo_dist.data.prepare_imagenet import MARKER, labels_from_csv, labels_from_devkit, main

# ILSVRC2012_ID -> WNID of the miniature; ID 4 is a non-leaf synset no image uses (as in the real meta.mat).
SYNSETS = {1: "n01440764", 2: "n01443537", 3: "n01484850", 4: "n00001740"}
# Ground truth in file order: image k (1-based) has ILSVRC2012_ID TRUTH[k-1].
TRUTH = [2, 1, 3, 3, 1, 2, 1]
REPO = Path(__file__).resolve().parents[1]


def _write_devkit(path: Path, truth: list[int], top: str = "ILSVRC2012_devkit_t12/") -> None:
    scipy_io = pytest.importorskip("scipy.io")
    records = np.zeros(
        len(SYNSETS), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    )
    for row, (ilsvrc_id, wnid) in enumerate(SYNSETS.items()):
        records[row] = (ilsvrc_id, wnid, f"words of {wnid}", 0 if ilsvrc_id < 4 else 3)
    meta = io.BytesIO()
    scipy_io.savemat(meta, {"synsets": records})
    members = {
        top + "data/meta.mat": meta.getvalue(),
        top + "data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{i}\n" for i in truth).encode(),
        top + "readme.txt": b"miniature devkit\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _write_csv(path: Path, truth: list[int]) -> None:
    lines = ["ImageId,PredictionString"]
    # Kaggle's file is not in image order, and a row may hold several boxes of the same synset.
    for k in reversed(range(1, len(truth) + 1)):
        wnid = SYNSETS[truth[k - 1]]
        lines.append(f"ILSVRC2012_val_{k:08d},{wnid} 10 20 30 40 {wnid} 1 2 3 4")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def mini(tmp_path) -> Path:
    """tmp/val with 7 flat validation JPEGs, tmp/train with the 3 leaf synsets, a devkit and a CSV."""
    val = tmp_path / "imagenet" / "val"
    val.mkdir(parents=True)
    for k in range(1, len(TRUTH) + 1):
        Image.new("RGB", (8, 6), (10 * k, 0, 0)).save(val / f"ILSVRC2012_val_{k:08d}.JPEG")
    for wnid in list(SYNSETS.values())[:3]:
        (tmp_path / "imagenet" / "train" / wnid).mkdir(parents=True)
        Image.new("RGB", (8, 6)).save(tmp_path / "imagenet" / "train" / wnid / "a.JPEG")
    _write_csv(tmp_path / "LOC_val_solution.csv", TRUTH)
    return tmp_path


@pytest.fixture
def devkit(mini) -> Path:
    """A miniature ILSVRC2012_devkit_t12.tar.gz next to `mini`'s folders (needs scipy to write meta.mat)."""
    _write_devkit(mini / "devkit.tar.gz", TRUTH)
    return mini / "devkit.tar.gz"


def _layout(val: Path) -> dict[str, str]:
    """{file name: parent folder name} of every validation JPEG below `val`."""
    return {p.name: p.parent.name for p in val.rglob("*.JPEG")}


def _expected() -> dict[str, str]:
    return {f"ILSVRC2012_val_{k:08d}.JPEG": SYNSETS[i] for k, i in enumerate(TRUTH, start=1)}


def test_devkit_and_csv_give_the_same_labels(mini, devkit):
    assert labels_from_devkit(devkit) == _expected()
    assert labels_from_csv(mini / "LOC_val_solution.csv") == _expected()


@pytest.mark.parametrize("source", ["devkit", "csv"])
def test_moves_into_synset_folders_then_refuses_a_second_run(mini, source, capsys, caplog, request):
    val = mini / "imagenet" / "val"
    before = {p.name: p.read_bytes() for p in val.iterdir()}
    flag = (
        ["--devkit", str(request.getfixturevalue("devkit"))]
        if source == "devkit"
        else ["--labels-csv", str(mini / "LOC_val_solution.csv")]
    )
    args = ["--val-dir", str(val), *flag, "--train-dir", str(mini / "imagenet" / "train")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "moved 7 of 7 images into 3 synset folders" in out
    root = mini / "imagenet"
    assert "7 val images of 3 classes in " in out and (root / ".mixmo_index" / "val.idx").is_file(), out
    # The index it wrote is current: the loaders read it without scanning, with the train split's class order.
    # (Only the records of this check: building the index above logged its own scans, which caplog keeps whenever an
    # earlier test of the session left the root logger at INFO.)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mixmo_dist"):
        classes_i, train_i, val_i = folder_tables(root, None, first=True)
    assert not [r for r in caplog.records if "scanning" in r.getMessage()]
    assert _layout(val) == _expected()
    assert all((val / wnid / name).read_bytes() == before[name] for name, wnid in _expected().items())
    assert (val / MARKER).is_file()
    # The result is what the loaders read, with the train split's class order.
    classes, samples = scan_split(mini / "imagenet", "train")
    _, val_samples = scan_split(mini / "imagenet", "val", classes)
    assert sorted((Path(p).name, classes[c]) for p, c in val_samples) == sorted(_expected().items())
    assert classes_i == classes and [(Path(p).name, c) for p, c in val_samples] == [
        (Path(val_i.path(i)).name, val_i.label(i)) for i in range(len(val_i))
    ]

    assert main(args) == 2
    assert "already prepared" in capsys.readouterr().err
    (val / MARKER).unlink()
    assert main(args) == 2  # no marker, but the images are already in synset folders
    assert "already in synset folders" in capsys.readouterr().err
    assert _layout(val) == _expected()


def test_count_mismatch_is_refused_before_moving_anything(mini, capsys):
    val = mini / "imagenet" / "val"
    (val / "ILSVRC2012_val_00000005.JPEG").unlink()
    assert main(["--val-dir", str(val), "--labels-csv", str(mini / "LOC_val_solution.csv")]) == 2
    err = capsys.readouterr().err
    assert "holds 6 validation images but the labels list 7" in err and "ILSVRC2012_val_00000005.JPEG" in err
    assert set(_layout(val).values()) == {"val"}  # all still flat

    _write_csv(mini / "short.csv", TRUTH[:5])  # labels for 5 of the 6 images present
    assert main(["--val-dir", str(val), "--labels-csv", str(mini / "short.csv")]) == 2
    assert "not in the labels: ILSVRC2012_val_00000006.JPEG" in capsys.readouterr().err
    assert set(_layout(val).values()) == {"val"} and not (val / MARKER).exists()


def test_class_mismatch_with_train_is_refused(mini, capsys):
    val = mini / "imagenet" / "val"
    (mini / "imagenet" / "train" / "n09999999").mkdir()
    args = ["--val-dir", str(val), "--labels-csv", str(mini / "LOC_val_solution.csv")]
    assert main([*args, "--train-dir", str(mini / "imagenet" / "train")]) == 2
    assert "only in train: n09999999" in capsys.readouterr().err
    assert set(_layout(val).values()) == {"val"}


def test_interrupted_run_is_finished(mini, devkit):
    val = mini / "imagenet" / "val"
    # Simulate a run killed after moving two images.
    for name in ("ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"):
        (val / _expected()[name]).mkdir(exist_ok=True)
        os.replace(val / name, val / _expected()[name] / name)
    assert main(["--val-dir", str(val), "--devkit", str(devkit)]) == 0
    assert _layout(val) == _expected()


def test_bad_label_files_name_the_culprit(mini, devkit, capsys):
    val = mini / "imagenet" / "val"
    _write_devkit(mini / "bad.tar.gz", [*TRUTH[:3], 99, *TRUTH[4:]])
    assert main(["--val-dir", str(val), "--devkit", str(mini / "bad.tar.gz")]) == 2
    assert "line 4: '99' is not an ILSVRC2012_ID" in capsys.readouterr().err
    (mini / "bad.csv").write_text("ImageId,Label\nILSVRC2012_val_00000001,n01440764\n")
    assert main(["--val-dir", str(val), "--labels-csv", str(mini / "bad.csv")]) == 2
    assert "bad.csv: needs the columns ImageId,PredictionString" in capsys.readouterr().err
    (mini / "notatar.tar.gz").write_bytes(b"plain text")
    assert main(["--val-dir", str(val), "--devkit", str(mini / "notatar.tar.gz")]) == 2
    assert "notatar.tar.gz: cannot read it as a tarball" in capsys.readouterr().err
    assert set(_layout(val).values()) == {"val"}


def test_module_entry_point(mini):
    val = mini / "imagenet" / "val"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mixmo_dist.data.prepare_imagenet", "--val-dir", str(val)]
    done = subprocess.run(
        [*cmd, "--labels-csv", str(mini / "LOC_val_solution.csv")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert _layout(val) == _expected()
    again = subprocess.run(
        [*cmd, "--labels-csv", str(mini / "LOC_val_solution.csv")], env=env, capture_output=True, text=True
    )
    assert again.returncode == 2 and "already prepared" in again.stderr


def test_devkit_without_scipy_says_what_to_do(mini, monkeypatch):
    path = mini / "raw_devkit.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("data/meta.mat", b"not read"), ("data/ILSVRC2012_validation_ground_truth.txt", b"1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # makes `from scipy.io import loadmat` raise ImportError
    with pytest.raises(ValueError, match="needs scipy.*--labels-csv"):
        labels_from_devkit(path)
