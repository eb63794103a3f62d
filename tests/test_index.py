"""The dataset index (data/index.py): built once, reused while the folders are unchanged, rebuilt when they change or
the file is damaged, shared by racing processes, and served to DataLoader workers through a memory map.

Real folders and files throughout; "scanned" is read from the one log line a scan writes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import read_only_mount, train_env
from torch.utils.data import DataLoader, Dataset

from mixmo_dist.config import DataConfig
from mixmo_dist.data import Placement, build_data, scan_split
from mixmo_dist.data.forkserver import worker_context
from mixmo_dist.data.index import folder_tables, index_dir, split_table


def _tree(root: Path, classes: int = 3, per_class: int = 5) -> Path:
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"img_{i}.JPEG").write_bytes(b"")
    (root / "train" / "n00000001" / "deeper").mkdir()
    (root / "train" / "n00000001" / "deeper" / "x.png").write_bytes(b"")
    return root


def _rows(table) -> list[tuple[str, int]]:
    return [table[i] for i in range(len(table))]


def _expected(root: Path, split: str = "train") -> list[tuple[str, int]]:
    classes = None if split == "train" else scan_split(root, "train")[0]
    return [(str(Path(p).resolve()), label) for p, label in scan_split(root, split, classes)[1]]


def _scans(caplog) -> int:
    found = sum("scanning" in r.getMessage() for r in caplog.records)
    caplog.clear()
    return found


@pytest.fixture
def tree(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mixmo_dist")
    return _tree(tmp_path / "data")


def test_built_once_then_read_back_equal_to_a_scan(tree, caplog):
    classes, table = split_table(tree, "train")
    assert _scans(caplog) == 1 and (tree / ".mixmo_index" / "train.idx").is_file()
    assert classes == ["n00000000", "n00000001", "n00000002"] and _rows(table) == _expected(tree)
    classes2, table2 = split_table(tree, "train")
    assert _scans(caplog) == 0 and classes2 == classes and _rows(table2) == _expected(tree)


@pytest.mark.parametrize("change", ["add", "remove", "rename", "add_deep", "add_class"])
def test_a_change_to_the_files_rebuilds_the_index(tree, caplog, change):
    split_table(tree, "train")
    _scans(caplog)
    train = tree / "train"
    if change == "add":
        (train / "n00000000" / "new.jpg").write_bytes(b"")
    elif change == "remove":
        (train / "n00000002" / "img_3.JPEG").unlink()
    elif change == "rename":  # the count stays the same; only the name (and so the order) changes
        (train / "n00000000" / "img_0.JPEG").rename(train / "n00000000" / "zz.JPEG")
    elif change == "add_deep":
        (train / "n00000001" / "deeper" / "y.png").write_bytes(b"")
    else:
        (train / "n00000003").mkdir()
        (train / "n00000003" / "a.jpg").write_bytes(b"")
    classes, table = split_table(tree, "train")
    assert _scans(caplog) == 1
    assert _rows(table) == _expected(tree) and classes == scan_split(tree, "train")[0]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped_path_byte", "empty", "header_json"])
def test_a_damaged_index_file_is_rebuilt_not_trusted(tree, caplog, damage):
    split_table(tree, "train")
    _scans(caplog)
    file = tree / ".mixmo_index" / "train.idx"
    data = bytearray(file.read_bytes())
    if damage == "truncated":
        data = data[:-7]
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif damage == "flipped_path_byte":  # same size, header intact: only the CRC-32 can tell
        data[-3] ^= 0x01
    elif damage == "empty":
        data = bytearray()
    else:
        at = data.index(b'"count":')
        data[at : at + 8] = b'"cou"t":'
    file.write_bytes(bytes(data))
    _, table = split_table(tree, "train")
    assert _scans(caplog) == 1 and _rows(table) == _expected(tree)
    _, table = split_table(tree, "train")
    assert _scans(caplog) == 0  # and the rebuilt file is good


def test_rescan_forces_a_scan_and_val_uses_the_train_classes(tree, caplog):
    classes, train, val = folder_tables(tree, None)
    assert _scans(caplog) == 2 and _rows(val) == _expected(tree, "val")
    folder_tables(tree, None, rescan=True, first=False)  # only the first process honours it
    assert _scans(caplog) == 0
    folder_tables(tree, None, rescan=True)
    assert _scans(caplog) == 2


def test_an_explicit_index_dir_and_a_read_only_root(tree, tmp_path, caplog):
    cache = tmp_path / "cache"
    _, table = split_table(tree, "train", cache_dir=str(cache))
    where = index_dir(tree, "train", str(cache))
    assert where.parent == cache and (where / "train.idx").is_file() and not (tree / ".mixmo_index").exists()
    with read_only_mount(tmp_path / "ro", source=tree) as ro:
        caplog.clear()
        _, table = split_table(ro, "train")  # nowhere to keep it: scanned, and said so once, naming the key
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "data.index_dir" in warned[0], warned
        assert [label for _, label in _rows(table)] == [label for _, label in _expected(tree)]
    split_table(tree, "train")  # written next to the data, then the data is mounted read-only elsewhere
    with read_only_mount(tmp_path / "ro2", source=tree) as ro:
        caplog.clear()
        _, table = split_table(ro, "train")
        assert not [r for r in caplog.records if r.levelno >= logging.INFO], [r.getMessage() for r in caplog.records]
        assert _rows(table) == [(str(ro / Path(p).relative_to(tree.resolve())), c) for p, c in _expected(tree)]
        del table  # its memory map holds the mount busy


_RACER = """
import logging, os, sys, time
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
from mixmo_dist.data.index import split_table
open(sys.argv[2] + f".{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[2]):  # the start line: every racer finds no index, then races for the lock
    time.sleep(0.001)
classes, table = split_table(sys.argv[1], "train")
print("ROWS", len(table), table[0][0], table[len(table) - 1][0])
"""


def test_racing_processes_scan_once_and_share_one_good_index(tmp_path):
    tree = _tree(tmp_path / "data", classes=20, per_class=400)  # enough files that the scans would overlap
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(tree), str(go)], stdout=subprocess.PIPE, text=True,
                         env=train_env())
        for _ in range(3)
    ]  # fmt: skip
    while len(list(tmp_path.glob("go.*"))) < 3 and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(out.count("scanning") for out in outs) == 1, outs
    rows = {line for out in outs for line in out.splitlines() if line.startswith("ROWS")}
    assert len(rows) == 1 and rows.pop().startswith(f"ROWS {20 * 400 + 1} "), outs
    _, table = split_table(tree, "train")
    assert _rows(table) == _expected(tree)


class _Rows(Dataset):
    def __init__(self, table) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int):
        return self.table[i]


def test_a_worker_reads_the_parents_table_from_the_shared_file(tmp_path):
    tree = _tree(tmp_path / "data", classes=4, per_class=500)
    _, table = split_table(tree, "train")
    assert len(pickle.dumps(table)) < 1_000  # the file's name travels, not the arrays (2,001 paths: ~100 KB)
    loader = DataLoader(_Rows(table), batch_size=None, num_workers=1, multiprocessing_context=worker_context())
    assert [(path, int(label)) for path, label in loader] == _rows(table)


def test_torch_and_dali_read_the_same_index(tree, caplog):
    pytest.importorskip("nvidia.dali")
    place = Placement(
        rank=0, world_size=1, seed=0, device=torch.device("cpu"), unique_per_rank=2, val_batch_size=2,
        channels_last=False, mean=(0.5,) * 3, std=(0.5,) * 3,
    )  # fmt: skip
    torch_data = build_data(DataConfig(root=str(tree), backend="torch", num_workers=0), place)
    assert _scans(caplog) == 2
    dali = build_data(DataConfig(root=str(tree), backend="dali-cpu"), place)
    assert _scans(caplog) == 0
    assert list(dali.train.paths) == [p for p, _ in _expected(tree)] and dali.classes == torch_data.classes
    assert json.dumps(list(dali.val.paths)) == json.dumps([p for p, _ in _expected(tree, "val")])
