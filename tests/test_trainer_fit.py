"""The real Trainer's loop (`fit`) in process, on a 0.01M-parameter ResNet and the synthetic backend, so that
`make mutation` selects these tests for training/trainer (issue 22): a run's metrics rows, LR, cut probability,
validations and checkpoints against values computed here, a resume equal to the uninterrupted run with every
stateful option on, and a finished run run again adding nothing.

Precision: fp32. bf16 is covered by test_resume_all_state.py (2 ranks, the real resnet18): with bf16 autocast and
channels_last on this CPU, torch 2.14's backward of a 3x3 stride-2 convolution on a 1 x 1 input returns NaN in some
runs and not others (reproduced in plain torch, no mixmo_dist code involved), and this tiny network's layer4 sees
exactly that input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_arch import ARCH

from mixmo_dist.config import load_config
from mixmo_dist.ops.mixing import cut_probability
from mixmo_dist.runtime.accelerator import build_accelerator
from mixmo_dist.training.optim import LRSchedule
from mixmo_dist.training.trainer import Trainer

BASE = [
    f"--model.arch={ARCH}",
    "--data.backend=synthetic",
    "--data.synthetic_size=32",
    "--data.image_size=16",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--schedule.epochs=2",
    "--schedule.warmup_epochs=0.5",
    "--run.mixed_precision=no",
    "--log.progress=lines",
    "--checkpoint.every_n_minutes=null",
]
# Every stateful option at once (issue 22's rule), each at a value where plausible bugs differ.
ALL_STATE = [
    "--optim.ema_decay=0.75",
    "--optim.grad_accum_steps=2",
    "--mixmo.input_repetition=0.3",
    "--data.copy_augmentation=per_copy",
    "--optim.max_nonfinite_steps=4",
    "--eval.every_n_epochs=0.5",
    "--eval.at_end=false",
    "--log.every_n_steps=1",
]
TIMING = ("img_per_s", "unique_img_per_s", "data_time", "compute_time")


def _fit(out: Path, *args: str) -> str:
    torch.set_num_threads(1)
    cfg = load_config([*BASE, f"--run.output_dir={out}", *args])
    trainer = Trainer(cfg, build_accelerator("no", output_dir=str(out)))
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))


def test_fit_logs_validates_and_saves_at_the_steps_it_should(tmp_path):
    out = tmp_path / "run"
    assert _fit(out, "--log.every_n_steps=3", "--eval.every_n_epochs=1", "--mixmo.cut_prob=0.6") == "completed"
    rows = _rows(out)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    # 32 images, 8 rows per step of 2 repetitions: 4 unique images per step, 8 steps per epoch, 16 in all.
    assert [r["step"] for r in train] == [3, 6, 9, 12, 15, 16]  # and the last step, a multiple of 3 or not
    assert [r["step"] for r in val] == [8, 16]
    schedule = LRSchedule(peak_lr=0.8 * 4 / 256, warmup_steps=4, total_steps=16)
    for r in train:
        assert r["lr"] == pytest.approx(schedule(r["step"] - 1), rel=1e-12), r["step"]
        assert r["epoch"] == pytest.approx(r["step"] / 8), r["step"]
        assert r["cut_prob"] == pytest.approx(cut_probability((r["step"] - 1) / 16, 0.6), rel=1e-12), r["step"]
        assert math.isfinite(r["loss"]) and r["nonfinite_skipped"] == 0
        assert r["loss"] == pytest.approx(r["loss_member_0"] + r["loss_member_1"], rel=1e-5)
        assert 0.0 <= r["cut_share"] <= 1.0 and 0.0 < r["kappa_mean"] < 1.0
    # The gradient norm is measured on logged steps only (the clip is off): none elsewhere is needed.
    assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in train)
    for r in val:
        assert r["count"] == 3 and r["epoch"] == pytest.approx(r["step"] / 8)
    best = max(val, key=lambda r: (r["top1"], -r["step"]))
    assert val[-1]["best_top1"] == best["top1"]
    assert _steps(out) == [16]
    state = json.loads((out / "checkpoints" / "step_00000016" / "state.json").read_text())
    assert state["step"] == 16 and state["last_eval"] == 16 and state["nonfinite_total"] == 0
    assert state["schedule"] == {"step": 16, "lr": schedule(16)}
    run = json.loads((out / "run.json").read_text())
    assert run["plan"]["total_steps"] == 16 and run["plan"]["stop_step"] == 16
    # The same command again finds the run finished: no new row, no new checkpoint.
    before = (out / "metrics.jsonl").read_text()
    assert _fit(out, "--log.every_n_steps=3", "--eval.every_n_epochs=1", "--mixmo.cut_prob=0.6") == "completed"
    assert (out / "metrics.jsonl").read_text() == before and _steps(out) == [16]


def test_checkpoints_every_n_steps_and_keep_last(tmp_path):
    out = tmp_path / "run"
    _fit(out, "--schedule.max_steps=7", "--checkpoint.every_n_steps=2", "--checkpoint.keep_last=2")
    assert _steps(out) == [6, 7]  # 2, 4, 6 saved on the way and the end; the oldest pruned
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000007"


def test_resume_equals_the_uninterrupted_run_with_every_stateful_option_on(tmp_path, monkeypatch):
    # Non-finite losses at steps 2 and 3 (the 3rd and 4th) on the only rank: the split run stops in the middle of
    # that run of bad steps (nonfinite_run = 1 at its checkpoint) and must carry it on.
    monkeypatch.setenv("MIXMO_FAULT_NAN", "0:2,3")
    full, split = tmp_path / "full", tmp_path / "split"
    assert _fit(full, *ALL_STATE) == "completed"
    assert _fit(split, *ALL_STATE, "--schedule.max_steps=3") == "completed"
    stopped = json.loads((split / "checkpoints" / "step_00000003" / "state.json").read_text())
    assert (stopped["nonfinite_total"], stopped["nonfinite_run"]) == (1, 1)
    assert _fit(split, *ALL_STATE) == "completed"

    last = "step_00000008"  # 32 images, 4 unique per micro-batch, 2 micro-batches per step: 4 steps per epoch
    for name in ("model.safetensors", "trainer.safetensors"):
        a, b = load_file(full / "checkpoints" / last / name), load_file(split / "checkpoints" / last / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key}"
    assert any(k.startswith("ema/") for k in load_file(full / "checkpoints" / last / "trainer.safetensors"))
    sa, sb = (json.loads((d / "checkpoints" / last / "state.json").read_text()) for d in (full, split))
    for key in ("step", "nonfinite_total", "nonfinite_run", "last_eval", "best_top1", "best_step"):
        assert sa[key] == sb[key], key
    assert (sa["nonfinite_total"], sa["nonfinite_run"]) == (2, 0)
    ra, rb = [_untimed(r) for r in _rows(full)], [_untimed(r) for r in _rows(split)]
    assert ra == rb  # every row, once: the resume dropped nothing and repeated nothing
    assert [r["step"] for r in ra if r["split"] == "val"] == [2, 4, 6, 8]
    assert [r["nonfinite_skipped"] for r in ra if r["split"] == "train"] == [0, 0, 1, 2, 2, 2, 2, 2]
    # The run moved (the equality above is not trivially true of two untrained copies).
    first = load_file(split / "checkpoints" / "step_00000003" / "model.safetensors")
    end = load_file(split / "checkpoints" / last / "model.safetensors")
    assert any(not torch.equal(first[k], end[k]) for k in first)


def test_rows_after_the_last_checkpoint_of_a_dead_run_are_dropped_on_resume(tmp_path, monkeypatch):
    """A run that dies between saves has logged rows its checkpoint does not cover: the resume drops them and logs
    those steps again, once, so the file equals an uninterrupted run's."""
    args = ("--log.every_n_steps=1", "--checkpoint.every_n_steps=3", "--optim.max_nonfinite_steps=2")
    full, split = tmp_path / "full", tmp_path / "split"
    assert _fit(full, *args) == "completed"
    monkeypatch.setenv("MIXMO_FAULT_NAN", "0:4,5")  # two bad steps in a row: the run aborts at the 6th step
    with pytest.raises(RuntimeError, match="2 consecutive non-finite losses"):
        _fit(split, *args)
    assert _steps(split) == [3]
    logged = [r["step"] for r in _rows(split) if r["split"] == "train"]
    assert logged == [1, 2, 3, 4, 5]  # step 5 (the first bad one) logged, not covered by the checkpoint
    monkeypatch.delenv("MIXMO_FAULT_NAN")
    assert _fit(split, *args) == "completed"
    assert [_untimed(r) for r in _rows(split)] == [_untimed(r) for r in _rows(full)]
