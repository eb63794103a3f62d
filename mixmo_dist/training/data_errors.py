"""A data error on one rank (a corrupt image, a stuck loader worker) stops every rank together, with one line.

Loader errors are rank-local: the rank whose shard holds a corrupt file fails while the others go on into the
step's gradient all-reduce, where they would wait until the process group's timeout (30 minutes or more). So a rank
whose loader fails keeps taking part: it runs the step on a placeholder batch of zeros, its failure travels in the
flag tensor that every step already agrees on (`comm.max`: no extra collective), and then every rank skips the
step and raises `StopAllRanks`. The failing rank prints the error line; the others stop quietly.

A validation pass has no collective per batch (ranks hold different numbers of batches): a failing rank leaves the
pass, and the ranks agree once after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor

from mixmo_dist.data import CorruptImageError, Data, Placement, build_data
from mixmo_dist.data.folder import UnreadableImageError
from mixmo_dist.data.workers import WorkerTimeoutError
from mixmo_dist.runtime.collectives import Collectives, StopAllRanks

# What a loader raises on one rank while the others are fine.
DATA_ERRORS = (CorruptImageError, WorkerTimeoutError)


def build_data_on_every_rank(cfg, place: Placement, comm: Collectives) -> Data:
    """`build_data` on rank 0, then on the other ranks; when it fails on any rank (missing split, unreadable
    folder), every rank stops.

    Rank 0 goes first because it checks the dataset index, or scans the folders and writes it (data/index.py),
    while the others wait: one scan per start, not one per rank; they then only read it.

    Raises:
        StopAllRanks: on every rank, with the lowest failing rank's message (it reports it).
    """
    data, error = None, None
    for turn in (place.rank == 0, place.rank != 0):
        if turn:
            try:
                data = build_data(cfg, place)
            except ValueError as err:
                error = str(err)
            except OSError as err:
                error = f"cannot read data.root={cfg.root}: {err}"
        comm.agree(error)
    return data


def _hint(err: Exception) -> str:
    if isinstance(err, UnreadableImageError):  # intact: replacing it is not the fix
        return f"{err}, and run the same command again: the run resumes from its last complete checkpoint"
    if isinstance(err, CorruptImageError):
        return (
            f"{err}. Replace the file with an intact copy and run the same command again: the run resumes from its "
            "last complete checkpoint"
        )
    return str(err)


class DataGuard:
    """Holds this rank's data error, if any, until the ranks agree on it.

    Args:
        comm: the run's collectives (rank, world size, `max`).
        device: where the agreement's tensor lives.
        placeholder: returns a batch of the loader's shapes (images [U,3,S,S], labels [U]) to train on after this
            rank's loader failed, so the step's collectives still match.
    """

    def __init__(self, comm: Collectives, device: torch.device, placeholder: Callable[[], tuple[Tensor, Tensor]]):
        self.comm, self.device, self.placeholder = comm, device, placeholder
        self.error: str | None = None

    def take(self, batches: Iterator, n: int) -> list:
        """The next `n` batches of `batches`; after a data error the rest are placeholders (the iterator is over)."""
        out = []
        for _ in range(n):
            if self.error is None:
                try:
                    out.append(next(batches))
                    continue
                except DATA_ERRORS as err:
                    self.error = _hint(err)
            out.append(self.placeholder())
        return out

    def iterate(self, loader: Iterable) -> Iterator:
        """The batches of `loader`, ending early (the error kept) at a data error."""
        try:
            yield from loader
        except DATA_ERRORS as err:
            self.error = _hint(err)

    def flag(self) -> float:
        """This rank's entry in an agreed maximum: world_size - rank after an error (so the maximum names the lowest
        failing rank), else 0."""
        return float(self.comm.world_size - self.comm.rank) if self.error is not None else 0.0

    def stop_if(self, agreed: float) -> None:
        """Raise `StopAllRanks` on every rank when the agreed maximum of `flag()` says a rank failed."""
        if not agreed:
            return
        reporter = self.comm.world_size - int(agreed)
        message = self.error if self.comm.rank == reporter else f"rank {reporter} stopped the run on a data error"
        raise StopAllRanks(message, report=self.comm.rank == reporter)

    def agree(self) -> None:
        """One collective: stop every rank when any rank's pass failed (after `iterate`)."""
        agreed = self.comm.max(torch.tensor([self.flag()], device=self.device))
        self.stop_if(float(agreed.item()))
