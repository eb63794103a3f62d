"""The Trainer's loop (`fit`) in process, where test_trainer_fit.py does not look: what a hang report names at each
phase, the start-up clock, the log lines, a signal in the middle of a run, runs that end at their first step or
are run again with other end-of-run options, saves by time, the counters of every checkpoint after a resume, and a
metrics write that fails after the last save. Written from training/trainer's mutation survivors (issue 22); each
run is a 0.01M-parameter ResNet on the synthetic backend, a few seconds.

Shapes: 24 synthetic images, 8 rows per step of 2 repetitions = 4 unique images per step, so 6 steps per epoch
(epochs like 5/6 need the 4-decimal rounding the rows promise); 2 epochs = 12 steps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
import types
from pathlib import Path

import pytest
import torch
from tiny_arch import ARCH

import mixmo_dist.training.trainer as trainer_module
from mixmo_dist.config import load_config
from mixmo_dist.runtime.accelerator import build_accelerator
from mixmo_dist.runtime.faults import FaultState
from mixmo_dist.runtime.startup import StartupClock
from mixmo_dist.training.trainer import Trainer

BASE = [
    f"--model.arch={ARCH}",
    "--data.backend=synthetic",
    "--data.synthetic_size=24",
    "--data.image_size=16",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--schedule.epochs=2",
    "--schedule.warmup_epochs=0.5",
    "--run.mixed_precision=no",
    "--log.progress=lines",
    "--checkpoint.every_n_minutes=null",
]
STEPS = 12
COUNTERS = ("step", "nonfinite_total", "nonfinite_run", "last_eval", "best_top1", "best_step")


def _trainer(out: Path, *args: str) -> Trainer:
    torch.set_num_threads(1)
    cfg = load_config([*BASE, f"--run.output_dir={out}", *args])
    return Trainer(cfg, build_accelerator("no", output_dir=str(out)))


def _fit(out: Path, *args: str) -> str:
    trainer = _trainer(out, *args)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))


def _state(out: Path, step: int) -> dict:
    return json.loads((out / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("img_per_s", "unique_img_per_s", "data_time", "compute_time")}


def _record_phases(monkeypatch) -> list[str]:
    """Every operation name a FaultState is told (what a hang or a lost peer would be reported as)."""
    seen: list[str] = []
    during = FaultState.during

    def recording(self, op, **kwargs):
        seen.append(op)
        return during(self, op, **kwargs)

    monkeypatch.setattr(FaultState, "during", recording)
    return seen


def test_phases_startup_clock_logs_and_rows_of_a_run(tmp_path, monkeypatch, caplog, capsys):
    out = tmp_path / "run"
    clock = StartupClock()
    monkeypatch.setattr(trainer_module, "STARTUP", clock)
    monkeypatch.setenv("MIXMO_FAULT_NAN", "0:2")  # the 3rd step's loss is NaN: skipped and logged
    phases = _record_phases(monkeypatch)
    caplog.set_level(logging.INFO, logger="mixmo_dist")
    args = (
        "--log.every_n_steps=5",
        "--log.progress=bar",
        "--eval.every_n_epochs=1",
        "--fault.watchdog_s=400",
        "--fault.startup_timeout_s=900",
    )
    trainer = _trainer(out, *args)
    assert trainer.watchdog.limit_s == 900  # start-up's allowance until the first step
    assert trainer.faults.stacks_dir == out / "stacks"
    taken = []
    take = trainer.guard.take

    def recording_take(batches, n):
        taken.append((trainer.faults.op, trainer.faults.step, trainer.faults.checkpoint_step))
        return take(batches, n)

    trainer.guard.take = recording_take
    after_first = trainer._after_first_step
    first_steps = []
    trainer._after_first_step = lambda: (first_steps.append(trainer.step), after_first())
    beats_in_save = []
    beat = trainer.watchdog.beat
    in_save = lambda: trainer.faults.op == "checkpoint save"  # noqa: E731
    trainer.watchdog.beat = lambda: (beats_in_save.append(1) if in_save() else None, beat())
    try:
        assert trainer.fit() == "completed"
    finally:
        trainer.close()
    assert trainer.watchdog.limit_s == 400  # after the first step: the run's own limit
    assert first_steps == [1]  # once, after the first step
    assert beats_in_save  # the watchdog hears from a save as its files are written, not only once it is over

    # What a report would name, in order: start-up, resume, each step's backward, validation, the save.
    assert phases[0] == "start-up (DDP broadcasts rank 0's weights)"
    assert phases[1] == "resume"
    named = [p for p in phases if p in ("gradient all-reduce (DDP backward)", "validation", "checkpoint save")]
    backward = ["gradient all-reduce (DDP backward)"] * 6
    assert named == [*backward, "validation", *backward, "validation", "checkpoint save"]
    assert taken == [("training step", s, -1) for s in range(STEPS)]
    assert trainer.faults.checkpoint_step == STEPS
    assert list(clock.parts) == ["dataset index", "model build", "resume", "first batch", "first step"]
    assert clock.done

    rows = _rows(out)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in train] == [5, 10, 12]  # the last step has its row
    assert [r["step"] for r in val] == [6, 12]
    for r in rows:
        assert r["epoch"] == round(r["step"] / 6, 4), r  # 5/6 = 0.8333, not 0.83333
    for r in train:
        assert r["unique_img_per_s"] == pytest.approx(r["img_per_s"] / 2, rel=1e-12)  # 2 batch repetitions
        assert r["nonfinite_skipped"] == 1
    for r in val:
        assert "reliability" not in r and r["val_split"] == "val" and len(r["member_top1"]) == 2
    messages = [rec.getMessage() for rec in caplog.records]
    assert "step 2: non-finite loss on at least one rank; all ranks skip this step" in messages
    for r in val:
        members = " ".join(f"{v:.3f}" for v in r["member_top1"])
        line = (
            f"val step {r['step']}: top1 {r['top1']:.4f} top5 {r['top5']:.4f} nll {r['nll']:.4f} ece {r['ece']:.4f} "
            f"members {members} (best {r['best_top1']:.4f} at step {r['best_step']}, val split)"
        )
        assert line in messages
    assert "\r[" in capsys.readouterr().err  # log.progress=bar draws a bar, not log lines
    assert not any(m.startswith("step 5/12") for m in messages)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGUSR2, "preempted"), (signal.SIGINT, "interrupted")])
def test_a_signal_mid_run_saves_that_step_and_the_rerun_finishes_as_if_uninterrupted(tmp_path, caplog, signum, status):
    caplog.set_level(logging.INFO, logger="mixmo_dist")
    full, split = tmp_path / "full", tmp_path / "split"
    assert _fit(full, "--log.every_n_steps=1") == "completed"
    trainer = _trainer(split, "--log.every_n_steps=1")
    take = trainer.guard.take

    def signalling_take(batches, n):
        if trainer.step == 3:
            os.kill(os.getpid(), signum)  # arrives during the 4th step: that step finishes, is saved, the run stops
        return take(batches, n)

    trainer.guard.take = signalling_take
    try:
        assert trainer.fit() == status
    finally:
        trainer.close()
    assert _steps(split) == [4]
    assert json.loads((split / "PREEMPTED").read_text())["step"] == 4
    caplog.clear()
    assert _fit(split, "--log.every_n_steps=1") == "completed"
    assert not (split / "PREEMPTED").exists()  # the resume clears the marker
    resumed = f"resumed from step 4 ({split / 'checkpoints' / 'step_00000004'}); dropped 0 metric lines past it"
    assert resumed in [rec.getMessage() for rec in caplog.records]
    assert [_untimed(r) for r in _rows(split)] == [_untimed(r) for r in _rows(full)]


def test_a_run_of_one_step_saves_it_and_running_it_again_adds_nothing(tmp_path):
    out = tmp_path / "run"
    assert _fit(out, "--schedule.max_steps=1", "--log.every_n_steps=1") == "completed"
    assert _steps(out) == [1]
    before = (out / "metrics.jsonl").read_text()
    assert _fit(out, "--schedule.max_steps=1", "--log.every_n_steps=1") == "completed"
    assert (out / "metrics.jsonl").read_text() == before and _steps(out) == [1]


def test_the_end_of_run_validation_is_in_the_last_checkpoint_when_a_periodic_save_falls_on_the_last_step(tmp_path):
    out = tmp_path / "run"
    # No periodic validation (every 5 epochs of 2), a save every 6 steps: the 12th step is both the end and a
    # periodic save, which must come after the end-of-run validation so that it records it.
    assert _fit(out, "--eval.every_n_epochs=5", "--checkpoint.every_n_steps=6") == "completed"
    assert [r["step"] for r in _rows(out) if r["split"] == "val"] == [STEPS]
    assert _state(out, STEPS)["last_eval"] == STEPS
    before = (out / "metrics.jsonl").read_text()
    assert _fit(out, "--eval.every_n_epochs=5", "--checkpoint.every_n_steps=6") == "completed"
    assert (out / "metrics.jsonl").read_text() == before


def test_a_finished_run_run_again_with_eval_at_end_validates_once_and_a_failed_row_write_stops_it(tmp_path):
    out = tmp_path / "run"
    args = ("--eval.every_n_epochs=5", "--eval.at_end=false", "--log.every_n_steps=4")
    assert _fit(out, *args) == "completed"
    assert [r["split"] for r in _rows(out)] == ["train"] * 3
    # The same run with eval.at_end: no step left, one validation of the finished weights, nothing saved again.
    trainer = _trainer(out, *args[:1], "--log.every_n_steps=4")

    def full_disk(rec):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "metrics.jsonl"))

    trainer.metrics.append = full_disk
    try:
        with pytest.raises(Exception, match="cannot append to") as failed:
            trainer.fit()
    finally:
        trainer.close()
    assert str(failed.value) == (
        f"cannot append to {out / 'metrics.jsonl'}: No space left on device at step {STEPS}; the rows before it are "
        f"whole and the last complete checkpoint ({out / 'checkpoints' / 'step_00000012'}) is intact: free space "
        "and run the same command again to resume"
    )
    assert _fit(out, *args[:1], "--log.every_n_steps=4") == "completed"
    rows = _rows(out)
    assert [(r["split"], r["step"]) for r in rows] == [("train", 4), ("train", 8), ("train", 12), ("val", 12)]
    assert _steps(out) == [STEPS]
    assert _fit(out, *args[:1], "--log.every_n_steps=4") == "completed"  # found in metrics.jsonl: not again
    assert _rows(out) == rows


def test_saves_by_time_come_when_the_interval_has_passed(tmp_path, monkeypatch):
    """The trainer's clock made to advance 10 s per step (nothing else reads it): with every_n_minutes = 0.5, a save
    is due at exactly 30 s, every 3rd step."""
    clock = [1000.0]
    fake = types.SimpleNamespace(monotonic=lambda: clock[0], sleep=time.sleep, time=time.time)
    monkeypatch.setattr(trainer_module, "time", fake)
    out = tmp_path / "run"
    trainer = _trainer(out, "--checkpoint.every_n_minutes=0.5", "--checkpoint.keep_last=100", "--fault.watchdog_s=0")
    assert trainer.watchdog.limit_s == 0  # no watchdog, not even for the start-up
    take = trainer.guard.take

    def ticking_take(batches, n):
        clock[0] += 10.0
        return take(batches, n)

    trainer.guard.take = ticking_take
    try:
        assert trainer.fit() == "completed"
    finally:
        trainer.close()
    assert _steps(out) == [3, 6, 9, 12]


def test_a_run_stopped_by_max_steps_validates_at_its_end_with_the_epoch_rounded(tmp_path):
    out = tmp_path / "run"
    assert _fit(out, "--schedule.max_steps=5", "--eval.every_n_epochs=5") == "completed"
    assert [(r["split"], r["step"], r["epoch"]) for r in _rows(out) if r["split"] == "val"] == [("val", 5, 0.8333)]


def _strip_last_eval(checkpoint: Path) -> None:
    """Make `checkpoint` look written by a version before `last_eval` (its COMPLETE marker's digest updated)."""
    state = json.loads((checkpoint / "state.json").read_text())
    del state["last_eval"]
    (checkpoint / "state.json").write_text(json.dumps(state))
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    marker["state.json"] = hashlib.sha256((checkpoint / "state.json").read_bytes()).hexdigest()
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))


def test_a_checkpoint_of_an_older_version_without_last_eval_resumes_as_never_validated(tmp_path):
    args = ("--eval.every_n_epochs=1", "--checkpoint.every_n_steps=1", "--checkpoint.keep_last=100")
    full, split = tmp_path / "full", tmp_path / "split"
    assert _fit(full, *args) == "completed"
    assert _fit(split, *args, "--schedule.max_steps=3", "--eval.at_end=false") == "completed"
    _strip_last_eval(split / "checkpoints" / "step_00000003")
    assert _fit(split, *args) == "completed"
    for step in range(4, STEPS + 1):
        a, b = _state(full, step), _state(split, step)
        assert {k: a[k] for k in COUNTERS} == {k: b[k] for k in COUNTERS}, step
    assert _state(split, 4)["last_eval"] == -1 and _state(split, 6)["last_eval"] == 6


def test_a_row_write_failing_before_a_save_commits_no_checkpoint(tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(out, "--log.every_n_steps=1", "--checkpoint.every_n_steps=3")
    append = trainer.metrics.append

    def full_disk_at_3(rec):
        if rec["step"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "metrics.jsonl"))
        append(rec)

    trainer.metrics.append = full_disk_at_3
    try:
        with pytest.raises(Exception, match="cannot append to") as failed:
            trainer.fit()
    finally:
        trainer.close()
    assert "the last complete checkpoint (none yet) is intact" in str(failed.value)
    assert _steps(out) == []  # step 3's save would record a step whose row is lost


def test_tensorboard_gets_each_row_once_across_a_resume_in_the_runs_own_directory(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.INFO, logger="mixmo_dist")
    out = tmp_path / "run"
    args = ("--log.trackers=[tensorboard]", "--log.every_n_steps=1", "--checkpoint.every_n_steps=2")
    assert _fit(out, *args, "--schedule.max_steps=5") == "completed"
    assert _fit(out, *args) == "completed"
    assert not [r for r in caplog.records if "new tracker runs" in r.getMessage()]  # the resume continued the run
    run_name = load_config([*BASE, f"--run.output_dir={out}"]).run.name
    events = sorted(out.glob("**/events.out.tfevents*"))
    assert events and all(run_name in e.relative_to(out).parts[:-1] for e in events), events
    steps = []
    for event_file in events:
        acc = EventAccumulator(str(event_file))
        acc.Reload()
        tags = [t for t in acc.Tags()["scalars"] if t.endswith("loss") and "member" not in t and "val" not in t]
        steps += [e.step for t in tags for e in acc.Scalars(t)]
    assert sorted(steps) == list(range(1, STEPS + 1))
    sent = json.loads((out / "trackers.json").read_text())["tensorboard"]["sent_through"]
    assert sent == STEPS
    # Its checkpoints gone, the run starts again from step 0: new tracker runs, said once.
    shutil.rmtree(out / "checkpoints")
    caplog.clear()
    assert _fit(out, *args, "--schedule.max_steps=1") == "completed"
    assert [r for r in caplog.records if "starting from step 0: new tracker runs" in r.getMessage()]


def test_every_checkpoint_after_a_resume_carries_the_uninterrupted_runs_counters(tmp_path, monkeypatch):
    """Stopped at step 7, after the validation of step 6 and in the middle of a run of two non-finite steps (the 7th
    and 8th): the checkpoints of steps 8 to 12 (saved every step, the next validation only at 12) must hold the
    restored last_eval, best validation and non-finite counters."""
    monkeypatch.setenv("MIXMO_FAULT_NAN", "0:6,7")
    args = (
        "--eval.every_n_epochs=1",
        "--eval.at_end=false",  # else the stopped run validates at its own end, step 7
        "--checkpoint.every_n_steps=1",
        "--checkpoint.keep_last=100",
        "--optim.max_nonfinite_steps=5",
    )
    full, split = tmp_path / "full", tmp_path / "split"
    assert _fit(full, *args) == "completed"
    assert _fit(split, *args, "--schedule.max_steps=7") == "completed"
    assert _fit(split, *args) == "completed"
    for step in range(8, STEPS + 1):
        a, b = _state(full, step), _state(split, step)
        assert {k: a[k] for k in COUNTERS} == {k: b[k] for k in COUNTERS}, step
    assert _state(full, 8)["last_eval"] == 6 and _state(full, 8)["best_step"] == 6
    counts = [(_state(full, s)["nonfinite_total"], _state(full, s)["nonfinite_run"]) for s in (7, 8, 9)]
    assert counts == [(1, 1), (2, 2), (2, 0)]


def test_a_batch_without_the_planned_views_per_image_is_refused(tmp_path):
    """With a view per copy (2 repetitions x 2 members = 4 views per image) a loader batch of one view per image is
    a loader bug, not something to train on: the step refuses it rather than reading the views from the shapes."""
    trainer = _trainer(tmp_path / "run", "--data.copy_augmentation=per_copy")
    try:
        assert trainer.plan.views_per_image == 4
        images, labels = torch.zeros(4, 3, 16, 16), torch.zeros(4, dtype=torch.int64)
        with pytest.raises(ValueError, match="the loader gave 4 images for 4 labels, not 4 views each"):
            trainer.train_step([(images, labels)], save_due=False)
    finally:
        trainer.close()


def test_input_cutmix_runs_in_the_loop_and_changes_the_loss(tmp_path):
    plain, mixed = tmp_path / "plain", tmp_path / "mixed"
    short = ("--schedule.max_steps=2", "--log.every_n_steps=1")
    assert _fit(plain, *short) == "completed"
    assert _fit(mixed, *short, "--mixmo.input_cutmix_prob=1.0") == "completed"
    loss = {d.name: [r["loss"] for r in _rows(d) if r["split"] == "train"] for d in (plain, mixed)}
    assert loss["plain"][0] != loss["mixed"][0] and all(map(math.isfinite, loss["mixed"])), loss
