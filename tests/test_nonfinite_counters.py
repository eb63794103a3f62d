"""The non-finite counters of the real Trainer over a long synthetic pattern of finite and non-finite steps.

`MIXMO_FAULT_NAN` (the trainer's test hook) makes the loss NaN at chosen steps. The pattern holds many runs of
non-finite steps shorter than `optim.max_nonfinite_steps`, so a counter whose reset after a finite step is lost
(or that counts from 1 instead of 0, or compares with > instead of >=) aborts early or late; only a pattern that
a long run produces shows it. After every step the test compares `nonfinite_total` and `nonfinite_run` with its
own count, checks that a skipped step changed no weight, and expects the abort at exactly the step where a run of
`max_nonfinite_steps` completes. In process, so `make mutation` can select it for training/trainer.
"""

from __future__ import annotations

import random

import pytest
import torch
from tiny_arch import ARCH

from mixmo_dist.config import load_config
from mixmo_dist.runtime.accelerator import build_accelerator
from mixmo_dist.training.trainer import Trainer


def _pattern(rng: random.Random, limit: int, length: int) -> list[bool]:
    """True = non-finite. Runs of 1..limit-1 bad steps between 1..3 good ones, then one run of `limit`."""
    bad: list[bool] = []
    while len(bad) < length:
        bad += [False] * rng.randint(1, 3) + [True] * rng.randint(1, limit - 1)
    return bad + [False] + [True] * limit


@pytest.mark.parametrize("limit", [3, 4])
def test_nonfinite_counters_over_a_long_pattern_match_a_reference_count(tmp_path, monkeypatch, limit):
    torch.set_num_threads(2)
    rng = random.Random(limit)
    bad = _pattern(rng, limit, 40)
    monkeypatch.setenv("MIXMO_FAULT_NAN", "0:" + ",".join(str(i) for i, b in enumerate(bad) if b))
    cfg = load_config(
        [
            f"--model.arch={ARCH}",  # a 0.01M-parameter ResNet: the counters, not the network, are under test
            "--data.backend=synthetic",
            "--data.synthetic_size=64",
            "--data.image_size=16",
            "--data.batch_size=8",
            "--data.copy_augmentation=shared",  # the batches below are handed in: one view per image
            f"--optim.max_nonfinite_steps={limit}",
            "--schedule.epochs=100",
            f"--run.output_dir={tmp_path / 'run'}",
            "--log.progress=lines",
            "--checkpoint.every_n_minutes=null",
        ]
    )
    trainer = Trainer(cfg, build_accelerator("no", output_dir=str(tmp_path)))
    gen = torch.Generator().manual_seed(limit)
    micro = [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen))]
    total = run = 0
    try:
        for step, is_bad in enumerate(bad):
            before = next(trainer.raw.parameters()).detach().clone()
            if is_bad:
                total, run = total + 1, run + 1
            else:
                run = 0
            if run == limit:
                with pytest.raises(RuntimeError, match=f"{limit} consecutive non-finite losses"):
                    trainer.train_step(micro)
                assert step == len(bad) - 1, f"aborted at step {step}, the pattern ends at {len(bad) - 1}"
                break
            res = trainer.train_step(micro)
            assert (trainer.nonfinite_total, trainer.nonfinite_run) == (total, run), f"step {step}"
            assert res.skipped is is_bad, f"step {step}"
            assert res.save_due is False and res.stop == 0.0  # no save asked for, no signal
            after = next(trainer.raw.parameters()).detach()
            assert torch.equal(before, after) is is_bad, f"step {step}: weights {'changed' if is_bad else 'kept'}"
        else:
            raise AssertionError("the final run of non-finite steps did not abort the run")
        assert (trainer.nonfinite_total, trainer.nonfinite_run) == (total, limit) and total > 2 * limit
    finally:
        trainer.close()
