"""The index of an image-folder split, built once and cached, and the file table that DataLoader workers share.

Scanning ImageNet's train split (1.28M files in 1,000 folders) takes seconds on a local disk and minutes on a network
file system, and every rank of every start used to do it. The index keeps the scan's result in one file per split:

    <dir>/<split>.idx      b"MIXMOIX1", the header's length (8 bytes, little-endian), the header (JSON), zero
                           padding to a multiple of 64 bytes, then offsets int64 [N+1], labels int64 [N] and the
                           paths relative to the split folder (UTF-8 bytes, concatenated), in sample order
    <dir>/<split>.idx.lock the lock that makes one process scan while the others wait

`<dir>` is `data.index_dir/<hash of the split folder>/` when that key is set, else `<data.root>/.mixmo_index/` (next
to the data) when it exists (it is then read even on a read-only mount) or the root is writable; otherwise nothing
is cached and every start scans (with a warning naming the key). The header records, for every folder the scan
listed, its mtime and inode as seen *before* listing it: adding, removing or renaming a file changes its folder's
mtime, so a later check (one stat per folder: 1,001 at ImageNet) finds the index stale and scans again; a copy of
the tree elsewhere has other inodes, while the same tree mounted at another path keeps them (the paths are joined
to the folder the index is read for, so it stays valid there). A header that does not parse, a file of the wrong size, another class list or
extension set, or (on the process that checks fully) a CRC-32 that does not match the arrays also mean a new scan:
the index is never trusted blindly. `data.rescan` forces a scan.

The index is written atomically (a temporary file renamed into place), so a reader sees a whole old index or a whole
new one. Readers hold the lock shared, a builder exclusively, and a builder re-checks after it gets the lock: of
processes racing on a stale index, one scans and the others read its result. A file system without locks
(Lustre without `-o flock`) loses only that economy: each process then scans and replaces the file atomically.

`PathTable` serves the samples from the file through a read-only memory map: a DataLoader worker receives the
file's name (a few hundred bytes when pickled) and maps it, so its pages live once in the page cache of the node
instead of once per worker (111 MB per worker at 1.28M paths as private copies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mixmo_dist.runtime.files import atomic_path

from .folder import IMAGE_EXTENSIONS, load_rgb, scan

log = logging.getLogger("mixmo_dist")

MAGIC = b"MIXMOIX1"
FORMAT = 1
_ALIGN = 64


class PathTable:
    """Sample paths and labels in flat arrays: `table[i]` -> (path, label), `table.load(i)` -> (RGB image, label).

    Built from (path, label) pairs (`PathTable(samples)`: arrays in memory, pickled whole into each worker) or
    opened from an index file (`PathTable.open`: memory-mapped, pickled as the file's name and the position of its
    arrays, and mapped again by the worker, so the pages are shared). A list of N Python strings would instead be
    copied into every worker page by page as soon as the workers touch the refcounts.

    Args:
        samples: (path, label) pairs in sample order.
    """

    def __init__(self, samples: Sequence[tuple[str, int]] = ()) -> None:
        encoded = [os.fsencode(path) for path, _ in samples]
        lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
        self._offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._labels = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        self._prefix = b""
        self._file: tuple[str, int, int, int, str] | None = None  # (path, N, blob bytes, arrays' start, prefix)

    @classmethod
    def open(cls, file: str | Path, count: int, blob_bytes: int, start: int, prefix: str) -> PathTable:
        """The table stored in an index file at byte `start` (offsets, labels, blob), paths joined to `prefix`."""
        table = cls.__new__(cls)
        table._map((str(file), count, blob_bytes, start, prefix))
        return table

    def _map(self, where: tuple[str, int, int, int, str]) -> None:
        file, count, blob_bytes, start, prefix = where
        with open(file, "rb") as f:
            # The mapping outlives the file object; a file replaced later keeps its old inode mapped here.
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        labels_at = start + 8 * (count + 1)
        blob_at = labels_at + 8 * count
        self._offsets = np.frombuffer(buf, dtype="<i8", count=count + 1, offset=start)
        self._labels = np.frombuffer(buf, dtype="<i8", count=count, offset=labels_at)
        self._blob = np.frombuffer(buf, dtype=np.uint8, count=blob_bytes, offset=blob_at)
        self._prefix = os.fsencode(prefix)
        self._file = where

    def __getstate__(self) -> dict[str, Any]:
        if self._file is not None:
            return {"file": self._file}  # the worker maps the file: a few hundred bytes instead of the arrays
        return {"offsets": self._offsets, "blob": self._blob, "labels": self._labels, "prefix": self._prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "file" in state:
            self._map(state["file"])
        else:
            self._offsets, self._blob, self._labels = state["offsets"], state["blob"], state["labels"]
            self._prefix, self._file = state["prefix"], None

    def __len__(self) -> int:
        return len(self._labels)

    def path(self, index: int) -> str:
        start, stop = self._offsets[index], self._offsets[index + 1]
        return os.fsdecode(self._prefix + self._blob[start:stop].tobytes())

    def crc32(self) -> int:
        """CRC-32 of the arrays as stored (offsets, labels, paths), the check of an index file."""
        crc = 0
        for array in (self._offsets.astype("<i8", copy=False), self._labels.astype("<i8", copy=False), self._blob):
            crc = zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"), crc)  # no copy of a mapped file
        return crc

    @property
    def paths(self) -> _Paths:
        """The paths as a read-only sequence (`paths[i]`, `len(paths)`), without building a list."""
        return _Paths(self)

    def label(self, index: int) -> int:
        return int(self._labels[index])

    def labels(self) -> np.ndarray:
        """int64 [N] labels (a read-only view when memory-mapped)."""
        return self._labels

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.path(index), self.label(index)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Sample `index` decoded to RGB (a `Source`); a corrupt file raises CorruptImageError naming it."""
        path, label = self[index]
        return load_rgb(path), label


class _Paths(Sequence[str]):
    def __init__(self, table: PathTable) -> None:
        self._table = table

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self._table.path(i) for i in range(len(self._table))[index]]
        if index < 0:
            index += len(self._table)
        if not 0 <= index < len(self._table):
            raise IndexError(index)
        return self._table.path(index)


# ---------------------------------------------------------------------------------------------------------- file


def index_dir(root: Path | str, split: str, cache_dir: str | None) -> Path | None:
    """Where the index of `root/<split>` lives (see the module's docstring), or None when nowhere is writable."""
    split_dir = (Path(root) / split).resolve()
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / hashlib.sha256(os.fsencode(split_dir)).hexdigest()[:16]
    here = Path(root).resolve() / ".mixmo_index"
    # An index someone wrote next to a dataset that is now read-only (a shared mount) is still read.
    if here.is_dir():
        return here
    return here if os.access(Path(root).resolve(), os.W_OK) else None


def _header(split_dir: Path, classes: list[str], paths: list[str], dirs: list[list]) -> tuple[dict, bytes]:
    encoded = [os.fsencode(p) for p in paths]
    return {
        "format": FORMAT,
        "split_dir": str(split_dir),
        "classes": classes,
        "extensions": sorted(IMAGE_EXTENSIONS),
        "count": len(paths),
        "blob_bytes": sum(len(b) for b in encoded),
        "dirs": dirs,
    }, b"".join(encoded)


def write_index(file: Path, split_dir: Path, classes: list[str], paths: list[str], labels: np.ndarray, dirs) -> None:
    """Write the index file of one scanned split, atomically."""
    header, blob = _header(split_dir, classes, paths, dirs)
    lengths = np.fromiter((len(os.fsencode(p)) for p in paths), dtype=np.int64, count=len(paths))
    offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)]).astype("<i8")
    arrays = offsets.tobytes() + labels.astype("<i8").tobytes() + blob
    header["crc32"] = zlib.crc32(arrays)
    text = json.dumps(header, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<Q", len(text)) + text
    head += b"\0" * (-len(head) % _ALIGN)
    with atomic_path(file) as part, open(part, "wb") as f:
        f.write(head)
        f.write(arrays)


def read_index(file: Path, split_dir: Path, classes: list[str] | None, *, full: bool) -> tuple[list[str], PathTable]:
    """Open an index file and check it against the folders it describes.

    Args:
        full: also check the arrays' CRC-32 (reads the whole file; the process that built or first checks it).

    Raises:
        StaleIndex: the index cannot be used; its message says why.
    """
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = f.read(16)
            if len(start) != 16 or start[:8] != MAGIC:
                raise StaleIndex("not an index file (bad magic)")
            (length,) = struct.unpack("<Q", start[8:])
            if length > size:
                raise StaleIndex("header longer than the file")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise StaleIndex("no index yet") from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise StaleIndex(f"unreadable ({type(err).__name__}: {err})") from None
    try:
        count, blob_bytes, dirs = int(header["count"]), int(header["blob_bytes"]), header["dirs"]
        stored_classes = list(header["classes"])
        if header["format"] != FORMAT:
            raise StaleIndex(f"format {header['format']!r}, this version reads {FORMAT}")
        if header["extensions"] != sorted(IMAGE_EXTENSIONS):
            raise StaleIndex("made with another set of image extensions")
    except (KeyError, TypeError, ValueError) as err:
        raise StaleIndex(f"header incomplete ({type(err).__name__}: {err})") from None
    if classes is not None and stored_classes != list(classes):
        raise StaleIndex("made with another class list")
    start = 16 + length + (-(16 + length) % _ALIGN)
    if size != start + 16 * count + 8 + blob_bytes:
        raise StaleIndex(f"{size} bytes, {start + 16 * count + 8 + blob_bytes} expected (truncated?)")
    for rel, mtime_ns, ino in dirs:
        try:
            st = os.stat(os.path.join(split_dir, rel))
        except OSError:
            raise StaleIndex(f"folder {rel or '.'} is gone") from None
        if st.st_mtime_ns != mtime_ns or st.st_ino != ino:
            raise StaleIndex(f"folder {rel or '.'} changed since the index was made")
    table = PathTable.open(file, count, blob_bytes, start, str(split_dir) + os.sep)
    if full:
        if table.crc32() != header.get("crc32"):
            raise StaleIndex("the CRC-32 of its arrays does not match (corrupt)")
        labels = table.labels()
        if count and (labels.min() < 0 or labels.max() >= len(stored_classes)):
            raise StaleIndex("labels outside the class list (corrupt)")
    return stored_classes, table


class StaleIndex(Exception):
    """An index that cannot be used (missing, corrupt, or older than the folders); the message says why."""


@contextlib.contextmanager
def _locked(lock: Path, exclusive: bool) -> Iterator[None]:
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield  # no lock file possible: each process scans and replaces the index atomically
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError:
            pass  # a file system without flock: the same, without the economy
        yield
    finally:
        os.close(fd)


def split_table(
    root: Path | str,
    split: str,
    classes: list[str] | None = None,
    *,
    reference: str = "train",
    cache_dir: str | None = None,
    rescan: bool = False,
    full_check: bool = True,
) -> tuple[list[str], PathTable]:
    """The classes and the file table of `root/<split>`, from its index when that is valid, else scanned (and the
    index written).

    Args:
        classes: when given (the train split's), the split must hold exactly these classes; labels index this list.
        reference: the name of the split `classes` came from, for error messages.
        cache_dir: `data.index_dir` (see the module's docstring).
        rescan: scan even when the index looks valid (`data.rescan`).
        full_check: check the index's CRC-32 too (reads the file once).

    Raises:
        ValueError: as `scan` (a missing split, an empty class folder, another class set).
    """
    split_dir = (Path(root) / split).resolve()
    where = index_dir(root, split, cache_dir)
    if where is not None and not where.is_dir():
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("cannot create the dataset index folder %s (%s): scanning %s", where, err, split_dir)
            where = None
    if where is None:
        log.warning(
            "%s is not writable and data.index_dir is not set: scanning %s without keeping an index (set "
            "data.index_dir to a folder every node sees)", Path(root), split_dir
        )  # fmt: skip
        found, paths, labels, _ = scan(root, split, classes, reference=reference)
        return found, PathTable(list(zip((str(split_dir / p) for p in paths), labels.tolist(), strict=True)))
    file = where / f"{split}.idx"
    lock = where / f"{split}.idx.lock"
    reason = "a rescan was asked (data.rescan)"
    if not rescan:
        with _locked(lock, exclusive=False):
            try:
                return read_index(file, split_dir, classes, full=full_check)
            except StaleIndex as err:
                reason = str(err)
    with _locked(lock, exclusive=True):
        if not rescan:
            try:  # another process may have rebuilt it while this one waited for the lock
                return read_index(file, split_dir, classes, full=full_check)
            except StaleIndex as err:
                reason = str(err)
        log.info("dataset index %s: %s; scanning %s", file, reason, split_dir)
        found, paths, labels, dirs = scan(root, split, classes, reference=reference)
        try:
            write_index(file, split_dir, found, paths, labels, dirs)
        except OSError as err:
            log.warning("cannot write the dataset index %s (%s): using the scan without keeping it", file, err)
            return found, PathTable(list(zip((str(split_dir / p) for p in paths), labels.tolist(), strict=True)))
        return read_index(file, split_dir, classes, full=False)


def folder_tables(
    root: Path | str, cache_dir: str | None, *, rescan: bool = False, first: bool = True
) -> tuple[list[str], PathTable, PathTable]:
    """(classes, train table, val table) of an ImageNet-layout folder, from its index (see `split_table`).

    Args:
        cache_dir: `data.index_dir`.
        rescan: `data.rescan`; honoured by the `first` process only (global rank 0, which the others wait for:
            `training.data_errors.build_data_on_every_rank`), so one start scans once.
        first: this process checks the index fully (its CRC-32); the others check the folders' mtimes only.
    """
    rescan = rescan and first
    classes, train = split_table(root, "train", cache_dir=cache_dir, rescan=rescan, full_check=first)
    _, val = split_table(root, "val", classes, cache_dir=cache_dir, rescan=rescan, full_check=first)
    return classes, train, val
