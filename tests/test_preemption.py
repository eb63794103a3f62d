"""A preemption signal that reaches one rank only (2 gloo ranks under `accelerate launch`).

SLURM and the launcher signal every rank at once, which the tests of `test_resume.py` reproduce; a signal can also
reach a single rank (a node-local OOM killer's warning, `kill` by hand, a per-node prolog). The stop decision must
still be agreed over all ranks, or the signalled rank would save alone while its peer waits in the next step's
all-reduce.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import torch
from conftest import kill_run, launch, read_metrics, run_train, tiny_args
from safetensors.torch import load_file

FINAL = "step_00000018"


def _descendants(root: int) -> list[int]:
    """PIDs of every live descendant of `root`, from /proc (parent links in /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_processes(launcher: int) -> dict[int, int]:
    """{global rank: PID} of the trainer processes under `launcher` (its DataLoader workers and their forkserver
    inherit RANK too, but their command line is not the trainer's)."""
    ranks = {}
    for pid in _descendants(launcher):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mixmo_dist.train" not in cmdline:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if b"RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early (rc {proc.returncode}): {kill_run(proc)[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting:\n{kill_run(proc)[-3000:]}")
        time.sleep(0.2)


def _last_train_step(out: Path) -> int:
    try:
        steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return steps[-1] if steps else 0


def test_signal_to_one_rank_stops_both_at_the_same_step(tiny_data, reference_run, tmp_path):
    """SIGUSR2 to rank 1's PID only: both ranks stop at one step, the run is "preempted" with exactly one complete
    checkpoint (at that step; periodic saves are off), and resuming ends bit-identical to the uninterrupted run."""
    out = tmp_path / "one_rank"
    args = tiny_args(tiny_data, out, "--checkpoint.every_n_steps=100")
    proc = launch(args)
    _wait_for(lambda: len(_rank_processes(proc.pid)) == 2 and _last_train_step(out) >= 2, proc)
    ranks = _rank_processes(proc.pid)
    at = _last_train_step(out)
    os.kill(ranks[1], signal.SIGUSR2)  # the rank's PID, not the launcher's: rank 0 never sees a signal
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        launcher = proc.poll()
        log = kill_run(proc)
        raise AssertionError(
            f"the run did not end within 180 s of the signal (launcher exit status then: {launcher}; a rank hung, or "
            f"a dead rank's DataLoader forkserver held the output open):\n{log[-3000:]}"
        ) from None
    assert (out / "PREEMPTED").exists(), f"the run was not preempted:\n{log[-3000:]}"
    step = json.loads((out / "PREEMPTED").read_text())["step"]
    assert at <= step <= at + 3, (at, step)
    # Each rank logs where it stopped: rank 1 after its own signal, rank 0 after its peer's.
    stops = re.findall(r"stopped at step (\d+) after (SIGUSR2|a signal on another rank)", log)
    assert sorted(stops) == sorted([(str(step), "SIGUSR2"), (str(step), "a signal on another rank")]), stops
    complete = sorted(p.parent.name for p in (out / "checkpoints").glob("step_*/COMPLETE"))
    assert complete == [f"step_{step:08d}"], complete
    assert all((out / "checkpoints" / complete[0] / f"rank_{r}.json").is_file() for r in (0, 1))

    rc, log2 = run_train(args, timeout=400)
    assert rc == 0, log2[-3000:]
    assert f"resumed from step {step}" in log2 and not (out / "PREEMPTED").exists()
    for name in ("model.safetensors", "trainer.safetensors"):
        got = load_file(out / "checkpoints" / FINAL / name)
        want = load_file(reference_run / "checkpoints" / FINAL / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), f"{name} differs"
    steps = [r["step"] for r in read_metrics(out) if r["split"] == "train"]
    assert steps == list(range(1, 19)), steps
