"""The project's one way to write a file atomically, plus the fsync and hashing helpers that durability needs.

A file written through `atomic_path` (or the `write_*_atomic` shortcuts) either exists whole under its final name or
not at all, whatever moment the process is killed at: the content goes to a hidden temporary file in the same
directory, is fsynced, and is `os.replace`d onto the name (atomic on POSIX file systems). Every writer of the
package (checkpoints, run.json, metrics, the resolved config, exports) goes through here, so every output gets the
mode a plain `open()` gives (0o666 minus the umask), whatever wrote the content: safetensors' `save_file` alone
creates 0o600, which left weights unreadable to the owner's group and to a container running as another uid.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def part_path(path: Path) -> Path:
    """The hidden temporary name `path` is written under first (unique per writer: pids repeat across hosts)."""
    return path.with_name(f".{path.name}.part-{uuid.uuid4().hex}")


def is_part_name(name: str, of: str) -> bool:
    """Whether `name` is a temporary file left by a writer of the file called `of`."""
    return name.startswith(f".{of}.part-")


@contextmanager
def naming_the_file(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError raised in the block carries `path` as its file name: a write or fsync that fails for lack of space
    names no file (or only the hidden temporary one), and the line a user reads must say which file it was."""
    try:
        yield
    except OSError as err:
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from err


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s content to; on success it is fsynced and renamed onto `path`.

    On any exception (or a kill) the temporary file is removed (or left hidden) and `path` keeps its old content.
    The parent directory must exist.

    Args:
        path: the final file.
        fsync: fsync the content before the rename (off only for files whose loss costs nothing).
    """
    path = Path(path)
    part = part_path(path)
    try:
        yield part
        os.chmod(part, 0o666 & ~_umask())
        if fsync:
            fsync_file(part)
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def _umask() -> int:
    # Read from /proc where possible: os.umask can only be read by setting it, for a moment, for every thread.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, fsync=fsync) as part, open(part, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, fsync: bool = True) -> None:
    """Write UTF-8 `text` to `path` atomically (see `atomic_path`)."""
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `obj` as JSON (plus a final newline) to `path` atomically (see `atomic_path`)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's content to stable storage."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a directory durable (a rename or a new name is durable only after this)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so a multi-GB checkpoint never sits in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
