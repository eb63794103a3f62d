"""Ctrl-C on a single-process run: the first SIGINT saves at the next step boundary and exits 130 (the shell's
status for SIGINT); a second one stops at once. (Ctrl-C under `accelerate launch` is in test_resume.py.)"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from conftest import launch, read_metrics, tiny_args


def _train_steps(out: Path) -> list[int]:
    try:
        return [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _start(tiny_data: Path, out: Path):
    args = tiny_args(tiny_data, out, "--checkpoint.every_n_steps=1000", "--eval.every_n_epochs=1000")
    proc = launch(args, nproc=1)
    t0 = time.monotonic()
    while len(_train_steps(out)) < 2:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() - t0 < 300, "no training step within 300 s"
        time.sleep(0.1)
    return args, proc


def test_first_ctrl_c_saves_and_exits_130_then_the_run_resumes(tiny_data, tmp_path):
    out = tmp_path / "run"
    args, proc = _start(tiny_data, out)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log[-3000:]
    assert "received SIGINT" in log and "Traceback" not in log, log[-3000:]
    marker = json.loads((out / "PREEMPTED").read_text())
    assert marker["signal"] == "SIGINT"
    step = marker["step"]
    assert (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").is_file()
    assert "requeueing" not in log  # a person stopped it: never requeued
    proc = launch(args, nproc=1)
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-3000:]
    assert f"resumed from step {step}" in log
    assert _train_steps(out) == list(range(1, 37))  # one process: 18 steps per epoch, each logged once


def test_second_ctrl_c_stops_at_once_without_saving(tiny_data, tmp_path):
    out = tmp_path / "run"
    _, proc = _start(tiny_data, out)
    proc.send_signal(signal.SIGINT)
    seen = []
    for line in proc.stdout:  # two signals sent back to back would merge into one: wait until the first is handled
        seen.append(line)
        if "received SIGINT" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(seen) + rest
    assert proc.returncode == 130, log[-3000:]
    assert "stopped without saving" in log and "Traceback" not in log, log[-3000:]
    assert not list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else True
