"""The collectives of a run, on top of Accelerate's operations (NCCL on GPU, gloo on CPU).

Every rank must call each method in the same order (they are collectives). With one process they are no-ops that
return their input, so single-process code pays nothing. Stages that need collectives (the trainer, the checkpoint
manager, evaluation) receive a `Collectives` instead of reaching for `torch.distributed` themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from accelerate.utils import broadcast, broadcast_object_list, gather_object, reduce
from torch import nn

from mixmo_dist.runtime.faults import FaultState


class StopAllRanks(Exception):
    """A user error that every rank stops for, together, so that no rank is left waiting in a collective.

    Attributes:
        report: True on the one rank that prints the message (the lowest rank that found the error), False on the
            others, which stop quietly.
    """

    def __init__(self, message: str, *, report: bool) -> None:
        super().__init__(message)
        self.report = report


class Collectives:
    """Collectives over the Accelerator's process group.

    Every collective runs as a named operation of `faults` (a FaultState): when the process group breaks inside
    it (a timeout, a closed connection), this rank writes its stacks and raises `PeerLost` naming the operation.

    Args:
        accelerator: the run's `accelerate.Accelerator` (or anything with `num_processes` and `wait_for_everyone`).
    """

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes
        self.rank = getattr(accelerator, "process_index", 0)
        self.faults = FaultState(rank=self.rank)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (any picklable value) on every rank."""
        if self.world_size == 1:
            return obj
        with self.faults.during(f"broadcast from rank 0 in {self.faults.op}", always=True):
            return broadcast_object_list([obj])[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by global rank, on every rank."""
        if self.world_size == 1:
            return [obj]
        with self.faults.during(f"gather in {self.faults.op}", always=True):
            return list(gather_object([obj]))

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` (any picklable value), by global rank, on rank 0 only; None on the other ranks.

        What only a writer needs travels to the writer: a rank sends its object once and receives nothing, so the
        bytes a rank other than 0 moves do not grow with the world (an all-gather grows them W-fold).
        """
        if self.world_size == 1:
            return [obj]
        with self.faults.during(f"gather to rank 0 in {self.faults.op}", always=True):
            out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object(obj, out, dst=0)
            return out

    def gather_rows_to_main(self, t_NX: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's rows of `t_NX` (any number per rank, the same trailing shape and dtype), by global rank, on
        rank 0 only; None on the other ranks, which send their rows once and receive nothing but the row count."""
        if self.world_size == 1:
            return [t_NX]
        rows = torch.tensor([t_NX.shape[0]], dtype=torch.int64, device=t_NX.device)
        most = int(self.max(rows).item())  # every rank pads to it: a tensor gather takes equal shapes
        counts = self.gather_to_main(int(t_NX.shape[0]))
        padded = t_NX.new_zeros((most, *t_NX.shape[1:]))
        padded[: t_NX.shape[0]] = t_NX
        with self.faults.during(f"gather of rows to rank 0 in {self.faults.op}", always=True):
            parts = [torch.empty_like(padded) for _ in range(self.world_size)] if self.rank == 0 else None
            dist.gather(padded, parts, dst=0)
        if parts is None:
            return None
        return [part[:count] for part, count in zip(parts, counts, strict=True)]

    def agree(self, error: str | None) -> None:
        """Stop every rank when any rank has an `error` (a message; None when this rank is fine).

        Raises:
            StopAllRanks: on every rank when at least one rank passed an error; the message is the lowest failing
                rank's, and that rank alone has `report` set.
        """
        if self.world_size == 1:
            if error is not None:
                raise StopAllRanks(error, report=True)
            return
        # One all-reduce of a flag, and a message only when there is one: the bytes a rank moves do not grow with
        # the world (an all-gather of every rank's None made it W-fold, at every save).
        device = getattr(self.accelerator, "device", "cpu")
        flag = torch.tensor([0 if error is None else self.world_size - self.rank], dtype=torch.int64, device=device)
        lowest = int(self.max(flag).item())
        if lowest == 0:
            return
        first = self.world_size - lowest
        with self.faults.during(f"broadcast from rank {first} in {self.faults.op}", always=True):
            message = broadcast_object_list([error], from_process=first)[0]
        raise StopAllRanks(message, report=self.rank == first)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (a new tensor)."""
        if self.world_size == 1:
            return t.clone()
        with self.faults.during(f"all-reduce (max) in {self.faults.op}", always=True):
            return reduce(t, "max")

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a new tensor)."""
        if self.world_size == 1:
            return t.clone()
        with self.faults.during(f"all-reduce (sum) in {self.faults.op}", always=True):
            return reduce(t, "sum")

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise mean over ranks (a new tensor)."""
        if self.world_size == 1:
            return t.clone()
        with self.faults.during(f"all-reduce (mean) in {self.faults.op}", always=True):
            return reduce(t, "mean")

    def sync_buffers(self, module: nn.Module) -> None:
        """Give every rank rank 0's buffers (BN statistics), in place.

        DDP broadcasts buffers only at the start of a forward (and not at all with `broadcast_buffers=False`), so
        after a step each rank holds its own statistics; evaluation and checkpoints must see one model.
        """
        if self.world_size > 1:
            with self.faults.during(f"broadcast of BatchNorm statistics in {self.faults.op}", always=True):
                for buf in module.buffers():
                    broadcast(buf, from_process=0)

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        if self.world_size == 1:
            return
        with self.faults.during(f"barrier in {self.faults.op}", always=True):
            self.accelerator.wait_for_everyone()
