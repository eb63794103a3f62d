"""Making a resumed multi-rank run sum its gradients in the order an uninterrupted run does.

DDP groups gradients into buckets, first in reverse registration order, then, after the first synchronised backward,
rebuilt in the order the gradients became ready (once per process). With 3 or more ranks gloo's (and NCCL's) ring
all-reduce sums each element in an order set by its position in the bucket, so a run that restarts at step k sums
step k's gradients with the initial layout while the uninterrupted run used the rebuilt one: the weights differ by
rounding (seen: 50 of 125 tensors after one step, 4 ranks). With 2 ranks a + b = b + a and nothing shows.

`settle_buckets` runs one synchronised backward before the resumed run's first step and throws everything of it away
(gradients, BN statistics, RNG draws), so the reducer records the ready order and rebuilds its buckets exactly as the
uninterrupted run did after its step 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    for target, source in zip(targets, sources):
        target.copy_(source)


def settle_buckets(
    raw: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, forward_backward: Callable[[], None]
) -> None:
    """One throw-away synchronised forward/backward (every rank calls it: it all-reduces once).

    Args:
        raw: the unwrapped network (its buffers are restored afterwards).
        optimizer: whose gradients are cleared afterwards.
        generator: the mixing generator (its state is restored afterwards).
        forward_backward: runs the training forward and backward through the DDP-wrapped model, synchronised.
    """
    buffers = list(raw.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    generator_state = generator.get_state()
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    forward_backward()
    optimizer.zero_grad(set_to_none=True)
    _copy_into(buffers, saved_buffers)
    generator.set_state(generator_state)
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state_all(cuda_state)
