"""Gradient accumulation through the real Trainer: one step of `optim.grad_accum_steps=2` over micro-batches A and B
has the gradient of the mean of two `grad_accum_steps=1` passes over A and over B with the same mixing draws.

Both trainers start from the same seed, so they build the same weights and their mixing generators draw the same
sequence (A's draws, then B's). BatchNorm uses each micro-batch's own statistics in both. The gradients are read
inside `optimizer.step`, i.e. after the backward passes and before any update.
"""

from __future__ import annotations

import pytest
import torch

from mixmo_dist.config import load_config
from mixmo_dist.runtime.accelerator import build_accelerator
from mixmo_dist.training.trainer import Trainer


def _trainer(tmp_path, accum: int) -> Trainer:
    cfg = load_config(
        [
            "--data.backend=synthetic",
            "--data.synthetic_size=64",
            "--data.image_size=16",
            "--data.batch_size=8",
            "--data.copy_augmentation=shared",  # the batches below are handed in: one view per image
            f"--optim.grad_accum_steps={accum}",
            "--schedule.epochs=100",  # a long schedule: the cut probability stays p0 over the steps compared
            f"--run.output_dir={tmp_path / f'accum{accum}'}",
            "--log.progress=lines",
            "--checkpoint.every_n_minutes=null",
        ]
    )
    return Trainer(cfg, build_accelerator("no", output_dir=str(tmp_path)))


def _capture_grads(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """Replaces the optimizer's step by one that records every gradient and updates nothing."""
    seen = []

    def step(*args, **kwargs):
        seen.append({n: p.grad.detach().clone() for n, p in trainer.raw.named_parameters() if p.grad is not None})

    trainer.optimizer.step = step
    return seen


def test_two_micro_batches_give_the_mean_gradient_of_two_single_passes(tmp_path):
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    micro = [(torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)) for _ in range(2)]

    accumulated = _trainer(tmp_path, accum=2)
    singles = _trainer(tmp_path, accum=1)
    try:
        for a, b in zip(accumulated.raw.state_dict().values(), singles.raw.state_dict().values()):
            assert torch.equal(a, b)  # same seed, same weights
        two = _capture_grads(accumulated)
        one = _capture_grads(singles)
        res = accumulated.train_step(micro)
        first, second = singles.train_step(micro[:1]), singles.train_step(micro[1:])
    finally:
        accumulated.close()
        singles.close()
    assert len(two) == 1 and len(one) == 2
    assert two[0].keys() == one[0].keys() == one[1].keys() and len(two[0]) > 10
    for name, grad in two[0].items():
        mean = (one[0][name] + one[1][name]) / 2
        torch.testing.assert_close(grad, mean, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # The step's reported figures are the means over its micro-batches too (loss, each member's, kappa, cut share).
    for field in ("loss", "member_losses", "kappa_mean", "cut"):
        mean = (getattr(first, field) + getattr(second, field)) / 2
        torch.testing.assert_close(getattr(res, field), mean, rtol=1e-5, atol=1e-7, msg=lambda m, f=field: f"{f}: {m}")
    assert not torch.allclose(first.loss, second.loss)  # two different halves: a sum of one alone would differ
    # The check can fail: the two micro-batches pull the weights differently.
    assert any(not torch.allclose(one[0][n], one[1][n], rtol=1e-2, atol=1e-4) for n in one[0])


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))
