"""Batch buffers in shared memory that the torch backend's train loader reuses from one batch to the next.

A DataLoader worker normally writes each batch into new shared memory, which the training process maps and frees
once it has let go of the batch. On the 2-core VM of docs/BENCHMARKS.md every new 4 KiB page costs ~1.3 us (the
kernel allocates and zeroes it, then frees it): 0.27 ms per 224 px float32 view in the worker and 0.08 ms in the
training process, against 0.38 ms for everything else a view costs, paid once per view, so 8 views per image pay
it 8 times. A pool of buffers, made once in the training
process and mapped by every worker once (the dataset that holds it is pickled into persistent workers once), is
written again and again without a page fault.

Who may write a buffer is decided in the training process only, when the DataLoader asks its batch sampler for the
next batch to send: a slot is free when no batch in flight uses it and every tensor delivered from it has been
dropped (a weak reference to the delivered tensor's storage has expired). The delivered tensor is an alias of the
slot with a storage of its own, so its lifetime is the consumer's, and views or slices of it keep it alive. When
no slot is free (a consumer holding many batches), the batch goes to a new buffer, as without a pool.

Shape legend: R rows (U unique images x V views), S image side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef


class SlotKeys(list):
    """The keys of one batch (a list, as the dataset receives them) and the pool slot its images go to (None: a
    new buffer)."""

    def __init__(self, keys: Sequence[Any], slot: int | None) -> None:
        super().__init__(keys)
        self.slot = slot


@dataclass(frozen=True)
class PooledImages:
    """What a worker sends instead of a batch's images: they are in pool slot `slot`."""

    slot: int


class BatchPool:
    """`slots` buffers of [R,3,S,S] `dtype` images in shared memory, with the given strides.

    Args:
        slots: how many batches may be in flight or held at once before a batch gets a new buffer (the
            DataLoader's prefetch plus what the consumer holds).
        shape: (R, 3, S, S) of every batch that uses the pool; a batch of another shape gets a new buffer.
        strides: the batches' strides (their memory format).
        dtype: the images' dtype.
    """

    def __init__(self, slots: int, shape: tuple[int, int, int, int], strides: tuple[int, ...], dtype: torch.dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        # Pages are allocated when first written, so slots that are never used cost nothing.
        self.buffers = [
            torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes), 0, shape, strides)
            for _ in range(slots)
        ]
        self._main_side()

    def _main_side(self) -> None:
        """The training process's bookkeeping (not sent to workers)."""
        self._in_flight: set[int] = set()
        self._delivered: dict[int, StorageWeakRef] = {}
        self._arrays: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        return {"buffers": self.buffers}  # the shared storages travel by file descriptor, not by value

    def __setstate__(self, state: dict) -> None:
        self.buffers = state["buffers"]
        self._main_side()

    # -- training process --------------------------------------------------------------------------------------

    def keyed(self, batches: Sequence[Sequence[Any]]) -> _KeyedPass:
        """`batches` for the DataLoader's batch sampler: each one is given a free slot when it is sent."""
        return _KeyedPass(self, batches)

    def _assign(self) -> int | None:
        for slot in range(len(self.buffers)):
            ref = self._delivered.get(slot)
            if slot not in self._in_flight and (ref is None or ref.expired()):
                self._in_flight.add(slot)
                self._delivered.pop(slot, None)
                return slot
        return None

    def received(self, images: Tensor | PooledImages) -> Tensor:
        """The delivered batch's images: a pool slot becomes a tensor aliasing it, tracked until it is dropped."""
        if not isinstance(images, PooledImages):
            return images
        slot = images.slot
        self._in_flight.discard(slot)
        if slot not in self._arrays:
            self._arrays[slot] = self.buffers[slot].numpy()
        # A tensor of its own storage over the slot's memory (it holds the array, which holds the slot): when the
        # consumer has dropped it, and every view of it, the weak reference expires and the slot may be written.
        alias = torch.from_numpy(self._arrays[slot])
        self._delivered[slot] = StorageWeakRef(alias.untyped_storage())
        return alias

    # -- worker ------------------------------------------------------------------------------------------------

    def buffer(self, keys: Sequence[Any], rows: int) -> Tensor | None:
        """The buffer that the batch of `keys` ([rows,...] images) is to be written into, or None for a new one."""
        slot = getattr(keys, "slot", None)
        if slot is None or self.buffers[slot].shape[0] != rows:
            return None
        return self.buffers[slot]


class _KeyedPass:
    """One pass's batches, each handed out with a pool slot at the moment the DataLoader sends it to a worker."""

    def __init__(self, pool: BatchPool, batches: Sequence[Sequence[Any]]) -> None:
        self._pool = pool
        self._batches = batches

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[SlotKeys]:
        # The DataLoader asks for a pass's first batch only after the workers have finished every batch sent in the
        # pass before (persistent workers drain it when a pass starts; without workers nothing is ever pending), so
        # no earlier batch can still be writing a slot; one that was sent but never delivered frees its slot here.
        self._pool._in_flight.clear()
        for keys in self._batches:
            yield SlotKeys(keys, self._pool._assign())
