"""The train epoch plan shared by the backends: which samples every rank reads at every step of every epoch.

Shape legend: N samples, U unique images per rank per step, W world size, S steps per epoch.

Train batches are planned at index level: one global permutation per epoch, drawn from (seed, epoch) identically
on every rank and wrapped to a whole number of steps, so every rank yields exactly the same number of batches and a
restore skips batches without decoding them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mixmo_dist.runtime.seeds import derive_seed


class EpochPlan:
    """Index-level plan of the train epochs of one rank, with the position inside the current epoch.

    Every epoch is one permutation of the N samples drawn from (seed, epoch), the same on every rank, wrapped
    around to `steps * W * U` positions with `steps = ceil(N / (W * U))`. Global step s covers positions
    [s*W*U, (s+1)*W*U); rank r takes the r-th run of U positions in it, so the ranks' parts are disjoint and a
    global step holds the same images whatever W is, for a fixed W*U.

    Position semantics: `state_dict()["batch"]` counts the batches of epoch `state_dict()["epoch"]` already
    yielded. `set_epoch(e)` moves to the start of epoch e unless e is the current epoch (then it keeps the
    position, so a trainer may call it right after `load_state_dict`). Iterating a finished epoch starts the next.

    The position is the same on every rank and means the same global step whatever the world size (for a fixed
    global batch W*U), so a run saved at W ranks can resume at W' (`load_resharded`): the remaining global steps
    hold exactly the samples the uninterrupted run would have read, split W' ways instead of W.
    """

    def __init__(self, num_samples: int, *, unique_per_rank: int, rank: int, world_size: int, seed: int) -> None:
        if num_samples < 1:
            raise ValueError(f"cannot train on an empty dataset (num_samples={num_samples})")
        if unique_per_rank < 1:
            raise ValueError(f"unique_per_rank must be >= 1, got {unique_per_rank}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the world of size {world_size}")
        self.num_samples = num_samples
        self.unique_per_rank = unique_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.steps = math.ceil(num_samples / (world_size * unique_per_rank))
        self._epoch = 0
        self._batch = 0

    def __len__(self) -> int:
        return self.steps

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of `epoch`; a no-op when `epoch` is the current one (keeps a restored position)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = epoch
            self._batch = 0

    def state_dict(self) -> dict[str, int]:
        """JSON-able position: {"epoch": e, "batch": batches of epoch e already yielded}."""
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by `state_dict`; the next batch yielded is the one that would have come next."""
        if not isinstance(state, dict) or set(state) != {"epoch", "batch"}:
            raise ValueError(f"data state must be a dict with keys 'epoch' and 'batch', got {state!r}")
        epoch, batch = state["epoch"], state["batch"]
        for key, value in (("epoch", epoch), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data state {key!r} must be a non-negative int, got {value!r}")
        if batch > self.steps:
            raise ValueError(
                f"data state batch={batch} exceeds the {self.steps} batches per epoch of this run "
                "(was the checkpoint written with another world size, batch size or dataset?)"
            )
        self._epoch, self._batch = epoch, batch

    def load_resharded(self, states: list[dict[str, Any]], step: int) -> None:
        """Restores the position from the states of the ranks of another world size (same global batch).

        Args:
            states: every old rank's `state_dict()` (they hold the same position).
            step: the optimizer step of the checkpoint (unused: the position says it all).
        """
        positions = {(s.get("epoch"), s.get("batch")) for s in states}
        if len(positions) != 1:
            raise ValueError(f"data states of the checkpoint's ranks disagree on the position: {sorted(positions)}")
        epoch, batch = positions.pop()
        self.load_state_dict({"epoch": epoch, "batch": batch})

    def global_order(self, epoch: int) -> Tensor:
        """int64 [steps*W*U] dataset index at each position of `epoch` (the permutation, wrapped around)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        perm_N = torch.randperm(self.num_samples, generator=gen)
        total = self.steps * self.world_size * self.unique_per_rank
        # Modulo rather than one extra copy: with a tiny dataset the padding can exceed N.
        return perm_N[torch.arange(total) % self.num_samples]

    def rank_positions(self) -> Tensor:
        """int64 [steps, U] positions in the epoch's global order that this rank reads at each step."""
        width = self.world_size * self.unique_per_rank
        steps_S1 = torch.arange(self.steps).unsqueeze(1) * width
        return steps_S1 + self.rank * self.unique_per_rank + torch.arange(self.unique_per_rank)

    def rank_indices(self, epoch: int) -> Tensor:
        """int64 [steps, U] dataset index this rank reads at each step of `epoch`."""
        return self.global_order(epoch)[self.rank_positions()]

    def advance(self) -> None:
        """Count one more batch of the current epoch as yielded."""
        self._batch += 1

    def begin_pass(self) -> tuple[int, int]:
        """(epoch, first batch) of the pass about to start; a finished epoch rolls over to the next one."""
        if self._batch >= self.steps:
            self._epoch += 1
            self._batch = 0
        return self._epoch, self._batch
