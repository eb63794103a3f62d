"""One run per output directory: a kernel lock (`flock`) on `<output_dir>/.lock`.

The kernel drops the lock when the holding process dies, however it dies (SIGKILL, node loss on a network file
system once the client's lease expires), so there is no stale lock to detect: a lock that cannot be taken is held
by a live process. The file's content only names the holder ({pid, host, started}) for the error message; it is
rewritten by every new holder and never deleted (deleting a lock file races with a process that has just opened it).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from mixmo_dist.checkpoint import CheckpointError

LOCK_NAME = ".lock"
# errno values of a file system that does not implement flock (Lustre without -o flock, some NFS mounts with
# local_lock=none or nolock, FUSE file systems).
_NO_LOCK_SUPPORT = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLock:
    """An exclusive, non-blocking kernel lock on `<output_dir>/.lock`, taken by the one process of a run that
    writes (global rank 0). Usable as a context manager; released when the process exits, whatever the cause.

    Args:
        output_dir: the run's output directory; created when missing.
    """

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        if not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"output_dir must be a str or Path, got {type(output_dir).__name__}")
        self.output_dir = Path(output_dir).expanduser()
        self.path = self.output_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock; a no-op when this object already holds it.

        Raises:
            CheckpointError: another process holds it (the message names it), the directory cannot be written
                (read-only, no permission), or the file system refuses locks.
        """
        if self.held:
            return
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            # O_CLOEXEC: a program this process execs must not inherit (and so keep) the lock.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            where = f": {err.filename}" if err.filename else ""
            raise CheckpointError(
                f"run.output_dir={self.output_dir} cannot be written ({err.strerror or err}{where}); choose a "
                "writable directory with --run.output_dir=DIR"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointError(self._held_message()) from None
        except OSError as err:
            os.close(fd)
            if err.errno in _NO_LOCK_SUPPORT:
                raise CheckpointError(
                    f"the file system of {self.output_dir} refuses file locks ({os.strerror(err.errno)}), so this run "
                    "cannot make sure no other run writes into the same directory; put run.output_dir on a file "
                    "system with flock support (NFS with locking, Lustre mounted with -o flock, a local disk)"
                ) from None
            raise
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode() + b"\n", 0)
        self._fd = fd

    def _held_message(self) -> str:
        try:
            holder = json.loads(self.path.read_bytes())
            who = f"pid {holder['pid']} on host {holder['host']} since {holder['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "a process that did not say who it is"
        return (
            f"another run ({who}) is using {self.output_dir}: its lock {self.path} is held. Wait for it to end, "
            "stop it, or choose another run.output_dir"
        )

    def release(self) -> None:
        """Release the lock; safe to call twice."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the last descriptor of the open file drops the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(output_dir: str | os.PathLike[str], comm, *, main: bool) -> RunLock | None:
    """Global rank 0 takes the output directory's lock; every rank learns the outcome, so all stop together.

    Args:
        output_dir: the run's output directory.
        comm: the run's `Collectives` (a broadcast from rank 0).
        main: whether this is global rank 0.

    Returns:
        The held lock on rank 0, None elsewhere.

    Raises:
        CheckpointError: on every rank, when rank 0 could not take the lock.
    """
    error, lock = None, None
    if main:
        lock = RunLock(output_dir)
        try:
            lock.acquire()
        except CheckpointError as err:
            error, lock = str(err), None
    error = comm.broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return lock
