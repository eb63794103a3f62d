"""Resume equals the uninterrupted run with every stateful option on at once (issue 22's rule).

The older bit-identical resume tests each turn on one or two options; state restored only on the default path
(EMA weights, an accumulation position, a counter) passes them. Here, on 2 gloo ranks: EMA (`optim.ema_decay`),
accumulation (`optim.grad_accum_steps=2`), bf16, input repetition, one view per copy, validation every 2 steps
(the best validation) and the non-finite counters (NaN at steps 2, 3, 4 through the trainer's MIXMO_FAULT_NAN
hook, so `nonfinite_run` is 2 at the stop and must carry on to 3). The split run stops at step 4, resumes to 5
(a checkpoint the full run also writes), then to 8; both checkpoints equal the full run's, tensors bit-identical
and counters equal. The validation rows after the resume equal the full run's too: this combination of options
(EMA on 2 ranks, a resume) found that the EMA's BatchNorm buffers were rank-local at validation (now synced from
rank 0). DALI keeps its own resume test (`test_resume.py`), the data is the torch backend here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, run_train, tiny_args, train_env
from safetensors.torch import load_file

COMMON = (
    "--model.arch=test_resnet",  # timm's 0.37M-parameter ResNet: the state is what is checked, not the network
    "--optim.ema_decay=0.9",
    "--optim.grad_accum_steps=2",
    "--run.mixed_precision=bf16",
    "--mixmo.input_repetition=0.3",  # not 0.5: rho and 1 - rho give the same count there
    "--data.copy_augmentation=per_copy",
    "--optim.max_nonfinite_steps=4",
    "--checkpoint.every_n_steps=5",
    "--checkpoint.keep_last=5",
    "--eval.every_n_epochs=0.5",
    "--eval.at_end=false",
)
NAN = train_env(MIXMO_FAULT_NAN="1:2,3,4")  # rank 1 only: every rank must agree to skip


def _same_checkpoint(a: Path, b: Path) -> None:
    files = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "COMPLETE")
    assert files == sorted(p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json"))
    assert any(key.startswith("ema/") for key in load_file(a / "trainer.safetensors"))  # EMA is really saved
    for name in files:
        if name.endswith(".safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys(), name
            for key in ta:
                assert torch.equal(ta[key], tb[key]), f"{a.name}/{name}:{key} differs"
    sa, sb = (json.loads((d / "state.json").read_text()) for d in (a, b))
    for key in ("step", "nonfinite_total", "nonfinite_run", "last_eval", "best_top1", "best_step"):
        assert sa[key] == sb[key], (a.name, key, sa[key], sb[key])


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> tuple[Path, Path]:
    """The full run of 8 steps and the split run (stopped at 4, resumed to 5, resumed to 8)."""
    root = tmp_path_factory.mktemp("all_state")
    full, split = root / "full", root / "split"
    rc, log = run_train(tiny_args(tiny_data, full, *COMMON, "--schedule.max_steps=8"), env=NAN)
    assert rc == 0, log[-3000:]
    for stop in (4, 5, 8):
        rc, log = run_train(tiny_args(tiny_data, split, *COMMON, f"--schedule.max_steps={stop}"), env=NAN)
        assert rc == 0, log[-3000:]
    return full, split


def test_resume_with_every_stateful_option_on_is_bit_identical(runs):
    full, split = runs
    run = json.loads((split / "run.json").read_text())
    assert run["plan"]["views_per_image"] == 2 * 2 and run["mixed_precision"] == "bf16", run
    stopped = json.loads((split / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert (stopped["nonfinite_total"], stopped["nonfinite_run"]) == (2, 2)
    for step in (5, 8):
        name = f"step_{step:08d}"
        _same_checkpoint(split / "checkpoints" / name, full / "checkpoints" / name)
    at5 = json.loads((full / "checkpoints" / "step_00000005" / "state.json").read_text())
    assert (at5["nonfinite_total"], at5["nonfinite_run"]) == (3, 3)
    val = [r for r in read_metrics(full) if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4, 6, 8]
    # The checkpoints can differ: the run moved between them (so the equality above is not trivially true).
    a = load_file(full / "checkpoints" / "step_00000005" / "model.safetensors")
    b = load_file(full / "checkpoints" / "step_00000008" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_validation_rows_after_the_resume_equal_the_uninterrupted_run(runs):
    full, split = runs
    val_full = [(r["step"], r["top1"], r["nll"], r["best_step"]) for r in read_metrics(full) if r["split"] == "val"]
    val_split = [(r["step"], r["top1"], r["nll"], r["best_step"]) for r in read_metrics(split) if r["split"] == "val"]
    assert len(val_full) == 4 and val_full == val_split
