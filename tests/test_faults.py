"""A job that stops answering ends, says why, and comes back (issue 20), on one machine.

Real processes throughout: a rank frozen with SIGSTOP in a 2-machine gloo world, a data read stalled by the
`MIXMO_FAULT_STALL` hook, a real tmpfs that fills up under `accelerate launch` and under submitit's local
executor, SIGTERM to a run's whole process group. The two-node network cut and the healthy 2-node run with the
default timeouts are in tests/test_slurm_multinode.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    kill_run,
    launch,
    launch_two_machines,
    read_metrics,
    run_processes,
    tiny_args,
    train_env,
)
from slurm_support import process_environ

from mixmo_dist.checkpoint.state import SaveError
from mixmo_dist.runtime.faults import (
    EXIT_FAULT,
    FaultState,
    PeerLost,
    Watchdog,
    record_and_requeue,
    requeue_after_failed_step,
)

pytestmark = pytest.mark.slow


def _wait_line(proc: subprocess.Popen, pattern: str, timeout_s: float, seen: list[str]) -> str:
    """Read `proc`'s output until a line matches `pattern`; every line read is appended to `seen`."""
    deadline = time.monotonic() + timeout_s
    regex = re.compile(pattern)
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if regex.search(line):
            return line
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s}s:\n{''.join(seen)[-3000:]}")


def _rank_pid(tag: str, rank: int) -> int:
    for pid, env in run_processes(tag).items():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        if env.get("RANK") == str(rank) and "mixmo_dist.train" in cmd and "accelerate" not in cmd:
            return pid
    raise AssertionError(f"no rank {rank} process found")


# --------------------------------------------------------------------------------------------------------------
# (b) a frozen peer: the other rank ends within the collective timeout, with its stacks and one line
# --------------------------------------------------------------------------------------------------------------


def test_a_frozen_rank_is_a_lost_peer_the_other_ends_within_the_timeout(tiny_data, tmp_path):
    out = tmp_path / "run"
    timeout_s = 6
    args = tiny_args(tiny_data, out, f"--fault.collective_timeout_s={timeout_s}", "--fault.watchdog_s=60")
    procs = launch_two_machines(args)
    for proc in procs:
        proc.run_tag = None
    seen: list[str] = []
    try:
        _wait_line(procs[0], r"step 3/", 300, seen)
        frozen = [pid for pid in _run_ranks(out) if process_environ(pid).get("RANK") == "1"]
        assert len(frozen) == 1, frozen
        frozen = frozen[0]
        os.kill(frozen, signal.SIGSTOP)
        stopped_at = time.monotonic()
        rest, _ = procs[0].communicate(timeout=timeout_s + 60)
        took = time.monotonic() - stopped_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in _run_ranks(out):
            os.kill(pid, signal.SIGKILL)
    log = "".join(seen) + rest
    print(f"rank 0 ended {took:.1f}s after rank 1 froze (collective timeout {timeout_s}s)")
    assert took <= timeout_s + 30, log[-3000:]
    assert procs[0].returncode != 0
    errors = [line for line in log.splitlines() if line.startswith("error: rank 0 lost a peer at step")]
    assert len(errors) == 1, log[-3000:]
    assert re.search(r"at step \d+ during .*(all-reduce|gradient|gather|broadcast|barrier)", errors[0]), errors[0]
    assert "stacks in" in errors[0] and str(out / "stacks" / "rank_0.txt") in errors[0]
    stacks = (out / "stacks" / "rank_0.txt").read_text()
    assert "lost a peer" in stacks and "Current thread" in stacks and ("train_step" in stacks or "fit" in stacks)
    record = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    assert [r["rank"] for r in record] == [0] and record[0]["kind"] == "lost peer"


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _run_ranks(out: Path) -> list[int]:
    """The rank processes (not the launchers) of the run writing to `out`."""
    return [p for p in _all_pids() if f"--run.output_dir={out}" in _cmdline(p) and "accelerate" not in _cmdline(p)]


# --------------------------------------------------------------------------------------------------------------
# The watchdog: a stalled read outside any collective
# --------------------------------------------------------------------------------------------------------------


def test_a_stalled_read_ends_the_rank_on_the_watchdog_with_its_stacks(tiny_data, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny_data, out, "--fault.collective_timeout_s=2", "--fault.watchdog_s=5")
    proc = launch(args, nproc=1, env=train_env(MIXMO_FAULT_STALL="0:3:600"))
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    assert proc.returncode == EXIT_FAULT, log[-3000:]
    line = [x for x in log.splitlines() if x.startswith("error: rank 0 hung")]
    assert len(line) == 1, log[-3000:]
    assert "hung at step 3: nothing completed for" in line[0] and "fault.watchdog_s=5" in line[0]
    assert "during training step" in line[0] and str(out / "stacks" / "rank_0.txt") in line[0]
    stacks = (out / "stacks" / "rank_0.txt").read_text()
    assert "in fit" in stacks and "sleep" not in line[0]  # the main thread's stack, in the trainer's loop
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2, 3]


def test_watchdog_fires_only_past_its_limit_and_beats_reset_it():
    """In-process: beats every 0.1 s for 1.5 s keep a 0.5 s watchdog quiet; the fire path is the subprocess
    test above (it ends the process)."""
    fired = []
    dog = Watchdog(FaultState(), 0.5, on_fire=fired.append)
    dog._fire = lambda idle: fired.append(idle)  # record instead of exiting the test process
    dog.start()
    for _ in range(15):
        time.sleep(0.1)
        dog.beat()
    assert fired == []
    time.sleep(1.2)
    dog.stop()
    assert len(fired) == 1 and fired[0] > 0.5


def test_requeue_is_bounded_by_restarts_without_a_newer_checkpoint(tmp_path, monkeypatch):
    """3 faulty restarts at the same checkpoint are requeued, the 4th is not; a newer checkpoint starts a new count.
    `scontrol` is a script on PATH that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("MIXMO_REQUEUE_CMD", "scontrol")
    state = FaultState(rank=1, step=40, checkpoint_step=30)
    outcomes = []
    for restart in range(5):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        # two ranks of the same restart record the same fault: counted once
        outcomes.append(record_and_requeue(tmp_path, state, "lost peer", max_requeues=3))
        record_and_requeue(tmp_path, FaultState(rank=0, step=40, checkpoint_step=30), "lost peer", 3)
    assert [o.startswith("; requeueing job 77") for o in outcomes[:3]] == [True] * 3
    assert "not requeued: 4 restarts of job 77" in outcomes[3] and "fault.max_requeues=3" in outcomes[3]
    assert "not requeued" in outcomes[4]
    state.checkpoint_step = 50  # progress: a new count
    monkeypatch.setenv("SLURM_RESTART_COUNT", "5")
    said = lambda phrase: calls.open("a").write(f"said{phrase}\n")  # noqa: E731
    assert record_and_requeue(tmp_path, state, "hang", 3, said).startswith("; requeueing job 77 (1 of")
    lines = calls.read_text().splitlines()
    assert lines.count("requeue 77") == 3 + 3 + 1  # both ranks asked, while allowed
    # the line is said before scontrol runs: the requeue may end this process before anything after it
    assert lines[-2:] == ["said; requeueing job 77 (1 of fault.max_requeues=3 in a row)", "requeue 77"], lines[-2:]
    monkeypatch.delenv("MIXMO_REQUEUE_CMD")
    assert record_and_requeue(tmp_path, state, "hang", 3, said) == ""  # not a SLURM job that asked for requeues
    assert calls.read_text().splitlines()[-1] == "said"  # the line is said all the same


def test_a_refused_requeue_gets_a_second_line_naming_the_answer(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol: error: Job is pending execution" >&2\nexit 1\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    monkeypatch.setenv("MIXMO_REQUEUE_CMD", "scontrol")
    said = []
    phrase = record_and_requeue(tmp_path, FaultState(rank=3, step=9, checkpoint_step=8), "hang", 3, said.append)
    assert said == [phrase] and phrase.startswith("; requeueing job 78 (1 of")
    assert capsys.readouterr().err == (
        "error: rank 3: `scontrol requeue 78` answered: scontrol: error: Job is pending execution "
        "(another rank may have requeued)\n"
    )


def _recording_scontrol(tmp_path, monkeypatch, status: int = 0) -> Path:
    """`scontrol` on PATH that appends its arguments to the returned file (and fails with `status` when non-zero)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    fail = f'echo "scontrol: error: Job is pending execution" >&2\nexit {status}\n' if status else ""
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{fail}')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def test_each_record_carries_the_requeue_decision(tmp_path, monkeypatch):
    """The batch script requeues from these records when a rank's own request died with the step."""
    _recording_scontrol(tmp_path, monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "81")
    monkeypatch.setenv("MIXMO_REQUEUE_CMD", "scontrol")
    state = FaultState(rank=0, step=7, checkpoint_step=6)
    for restart in range(3):
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restart))
        record_and_requeue(tmp_path, state, "lost peer", max_requeues=2)
    monkeypatch.delenv("MIXMO_REQUEUE_CMD")  # not asked for: no requeue, even within the bound
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    record_and_requeue(tmp_path, FaultState(rank=0, step=9, checkpoint_step=8), "hang", max_requeues=2)
    rows = [json.loads(line) for line in (tmp_path / "faults.jsonl").read_text().splitlines()]
    assert [(r["restart"], r["requeue"]) for r in rows] == [(0, True), (1, True), (2, False), (3, False)]


def test_the_batch_script_requeues_what_a_rank_decided_and_nothing_else(tmp_path, monkeypatch):
    """`requeue_after_failed_step`: only a record of this job and this restart whose decision was to requeue."""
    calls = _recording_scontrol(tmp_path, monkeypatch)
    env = {"SLURM_JOB_ID": "90", "SLURM_RESTART_COUNT": "2"}
    rows = [
        {"job": "90", "restart": 1, "requeue": True, "rank": 0, "kind": "lost peer", "step": 3},  # earlier restart
        {"job": "89", "restart": 2, "requeue": True, "rank": 0, "kind": "lost peer", "step": 3},  # another job
        {"job": "90", "restart": 2, "requeue": False, "rank": 1, "kind": "lost peer", "step": 5},  # bound reached
        {"job": "90", "restart": 2, "rank": 1, "kind": "lost peer", "step": 5},  # before the decision was recorded
    ]
    (tmp_path / "faults.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut by a full di')
    status, line = requeue_after_failed_step(tmp_path, env)
    assert status == 0 and not calls.exists()
    assert line == f"no rank of job 90 (restart 2) asked for a requeue in {tmp_path / 'faults.jsonl'}"
    with open(tmp_path / "faults.jsonl", "a") as f:
        f.write("\n" + json.dumps({"job": "90", "restart": 2, "requeue": True, "rank": 3, "kind": "hang", "step": 6}))
    expected = (0, "requeued job 90: rank 3 asked for it after a hang at step 6")
    assert requeue_after_failed_step(tmp_path, env) == expected
    assert calls.read_text() == "requeue 90\n"
    assert requeue_after_failed_step(tmp_path, {}) == (0, "not a SLURM job: nothing to requeue")
    assert requeue_after_failed_step(tmp_path / "absent", env)[1].startswith("no rank of job 90 (restart 2)")


def test_the_batch_scripts_refused_requeue_says_scontrols_answer(tmp_path, monkeypatch):
    _recording_scontrol(tmp_path, monkeypatch, status=1)
    row = {"job": "91", "restart": 0, "requeue": True, "rank": 2, "kind": "lost peer", "step": 4}
    (tmp_path / "faults.jsonl").write_text(json.dumps(row) + "\n")
    status, line = requeue_after_failed_step(tmp_path, {"SLURM_JOB_ID": "91"})
    assert status == 1
    assert line == (
        "`scontrol requeue 91` answered: scontrol: error: Job is pending execution (a rank may have requeued it "
        "already); rank 2 asked for it after a lost peer at step 4"
    )


def test_peer_lost_names_the_operation_and_the_peer_from_gloos_message(tmp_path):
    state = FaultState(rank=2, stacks_dir=tmp_path / "stacks", step=12, op="training step")
    with pytest.raises(PeerLost) as info:
        with state.during("all-reduce (max) in training step", always=True):
            raise RuntimeError(
                "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                "Connection closed by peer [198.18.1.12]:4711"
            )
    err = info.value
    assert str(err) == (
        "rank 2 lost a peer at step 12 during all-reduce (max) in training step (peer 198.18.1.12:4711): "
        "Connection closed by peer [198.18.1.12]:4711"
    )
    assert err.stacks == tmp_path / "stacks" / "rank_2.txt" and "Connection closed" in err.stacks.read_text()
    assert state.op == "training step"  # restored
    # A RuntimeError that is not the process group's passes through a non-collective block unchanged.
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with state.during("gradient all-reduce (DDP backward)"):
            raise RuntimeError("shape mismatch")


# --------------------------------------------------------------------------------------------------------------
# (c) a full disk: every rank stops together, nothing lost, resume once space is freed
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _small_disk(path: Path, size_mb: int):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _grow(path: Path, size_mb: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(path)], check=True)


# resnet18 with 2 members at 10 classes: one checkpoint (weights + SGD momentum) takes ~90 MB; a 150 MB disk holds
# the first and not the second.
_DISK_MB = 150


def _full_disk_args(data: Path, out: Path) -> list[str]:
    return tiny_args(data, out, "--schedule.epochs=1", "--checkpoint.every_n_steps=3", "--eval.at_end=false")


def _assert_full_disk_outcome(out: Path, log: str) -> None:
    errors = [line for line in log.splitlines() if "error: checkpoint save at step 6" in line]
    assert len(errors) == 1, log[-3000:]  # printed once, by rank 0
    assert "has" in errors[0] and "MB" in errors[0] and "free" in errors[0] and "stays the latest" in errors[0]
    assert "step_00000003" in errors[0]
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("latest"))
    assert steps == ["step_00000003"], steps  # no temporary directory left, the previous one intact
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_full_disk_under_accelerate_launch_stops_every_rank_and_resumes_after_space_is_freed(tiny_data, tmp_path):
    with _small_disk(tmp_path / "disk", _DISK_MB) as disk:
        out = disk / "run"
        proc = launch(_full_disk_args(tiny_data, out))
        try:
            log, _ = proc.communicate(timeout=300)
            ended = time.monotonic()
            # No process of the run is left once the launcher returned (at most 30 s for stragglers).
            while run_processes(proc.run_tag) and time.monotonic() - ended < 30:
                time.sleep(0.5)
            left = run_processes(proc.run_tag)
        finally:
            if proc.poll() is None or run_processes(proc.run_tag):
                kill_run(proc)
        assert not left, f"processes left after the failed save: {sorted(left)}"
        assert proc.returncode != 0
        _assert_full_disk_outcome(out, log)
        step6 = re.search(r"^(\d\d):(\d\d):(\d\d) INFO step 6/", log, re.MULTILINE)
        if step6:  # the save is due right after this line; the log's clock has 1 s resolution
            h, m, sec = map(int, step6.groups())
            now = time.localtime()
            took = time.mktime(now) - time.mktime((*now[:3], h, m, sec, *now[6:]))
            print(f"every rank gone {took:.0f}s (+-1 s) after the step whose save failed")
        assert "mixmo_dist/" not in log.split("error: checkpoint save", 1)[1], log[-3000:]  # no rank's traceback

        _grow(disk, 600)
        proc = launch(_full_disk_args(tiny_data, out))
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
        assert "resumed from step 3 " in log
        assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == list(range(1, 10))


def test_full_disk_under_submitit_local_executor_stops_every_task(tiny_data, tmp_path):
    with _small_disk(tmp_path / "disk", _DISK_MB) as disk:
        out = disk / "run"
        args = _full_disk_args(tiny_data, out) + ["--slurm.tasks_per_node=2", "--slurm.timeout_min=10"]
        args += ["--slurm.cpus_per_task=1"]
        start = time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "mixmo_dist.submit", "--cluster=local", "--wait", *args],
            cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        print(f"submitit local run with a full disk: {time.monotonic() - start:.0f}s")
        job_id = re.search(r"submitted job (\d+)", res.stdout).group(1)
        logs = "".join((out / "submitit" / f"{job_id}_{t}_log.err").read_text() for t in (0, 1))
        assert res.returncode != 0 and "failed" in res.stdout + res.stderr, res.stdout + res.stderr
        _assert_full_disk_outcome(out, logs)
        tasks = [p for p in _all_pids() if _cmdline(p).find(f"{out}/submitit") >= 0]
        assert not tasks, f"tasks left: {tasks}"

        _grow(disk, 600)
        args = _full_disk_args(tiny_data, out)
        proc = launch(args, nproc=2)
        log, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, log[-3000:]
        assert "resumed from step 3 " in log


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_write_that_fails_mid_save_removes_its_directory_and_keeps_the_previous(tmp_path):
    """In-process, one rank: the free-space check passes (the previous save is taken as 1 byte), then the disk fills
    mid-write: one SaveError line naming the full disk, no temporary directory, the previous checkpoint the latest."""
    from mixmo_dist.checkpoint.state import CheckpointManager
    from mixmo_dist.checkpoint.store import CheckpointStore
    from mixmo_dist.runtime.collectives import Collectives, StopAllRanks

    class _One:
        num_processes, process_index = 1, 0

        def wait_for_everyone(self):
            pass

    class _Counters:
        step = 0

        def state_dict(self):
            return {"step": self.step}

        def load_state_dict(self, state):
            self.step = state["step"]

    with _small_disk(tmp_path / "disk", 12) as disk:
        model = torch.nn.Linear(1000, 1000)  # 4 MB of weights, 4 MB of momentum: one checkpoint ~8 MB
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.ones(1, 1000)).sum().backward()
        opt.step()
        counters = _Counters()
        manager = CheckpointManager(
            CheckpointStore(disk / "checkpoints", keep_last=2), Collectives(_One()), rank=0, model=model,
            optimizer=opt, ema=None, scaler=None, counters=counters, rank_states={}, shape={}, describe=dict,
        )  # fmt: skip
        counters.step = 1
        first = manager.save()
        counters.step = 2
        manager.latest_bytes = 1  # the check passes: the write itself meets the full disk
        with pytest.raises(StopAllRanks) as info:
            manager.save()
        message = str(info.value)
        assert message.startswith("checkpoint save at step 2 failed: no space left on the file system of")
        assert "after removing the partial save" in message and f"{first}, stays the latest" in message
        assert isinstance(info.value.__context__, SaveError) or info.value.report
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["latest", "step_00000001"]
        # the next save is refused before it writes a byte: the previous save's size does not fit
        manager.latest_bytes = None
        with pytest.raises(StopAllRanks, match=r"save at step 2 not started: .* MB .* free, and a checkpoint"):
            manager.save()


# --------------------------------------------------------------------------------------------------------------
# SIGTERM to the whole process group: only the ranks act on it, and every trial ends in the agreed save
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nproc", "after_step"),
    [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2)],
    ids=["1proc-before-epoch-end", "1proc-during-validation", "1proc-mid-epoch", "2ranks-before-epoch-end",
         "2ranks-during-validation"],
)  # fmt: skip
def test_sigterm_to_the_process_group_always_ends_in_the_agreed_save(tiny_data, tmp_path, nproc, after_step):
    """2 steps per epoch and a validation at every epoch end (its DataLoader workers start at each pass, from the
    rank's forkserver): a SIGTERM sent to the launcher's whole process group right after the log line of step 1
    lands before an epoch end, after step 2's line during its validation, after step 3's mid-epoch. The forkserver
    used to die of it (it blocked SIGUSR2 only), the next validation's workers could not start and the run crashed
    unsaved (seen in the during-validation cases)."""
    out = tmp_path / "run"
    rows = 72 // nproc  # 36 unique images per step: 2 steps per epoch over the 70 images, at either world size
    args = tiny_args(
        tiny_data, out, f"--data.batch_size={rows}", "--schedule.epochs=4", "--checkpoint.every_n_steps=100"
    )
    proc = launch(args, nproc=nproc)
    seen: list[str] = []
    try:
        _wait_line(proc, rf"step {after_step}/", 300, seen)
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher's group: torchrun forwards it to each rank's group
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_run(proc)
    log = "".join(seen) + rest
    # torchrun's agent, signalled with its ranks, exits 143 once they are done; a rank that failed would show in its
    # failure summary ("Root Cause").
    assert proc.returncode == 0 or (nproc > 1 and proc.returncode == 143 and "Root Cause" not in log), log[-3000:]
    assert 'steps_per_epoch": 2.0' in log
    stops = re.findall(r"stopped at step (\d+) after SIGTERM", log)
    assert len(stops) == nproc and len(set(stops)) == 1, log[-3000:]
    stopped = int(stops[0])
    assert stopped > after_step
    preempted = json.loads((out / "PREEMPTED").read_text())
    assert preempted["step"] == stopped and preempted["signal"] == "SIGTERM"
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()


def _fill(disk: Path) -> None:
    """Fill the file system of `disk` to the last byte: zeros written until ENOSPC, in ever smaller writes."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


def test_a_disk_that_fills_mid_run_stops_every_rank_at_the_next_step_with_no_half_line(tiny_data, tmp_path):
    """The metrics files fill the disk's last page: rank 0's append fails, every rank stops at the next step's
    agreement with rank 0's one line (exit 2), and both files hold whole lines only."""
    with _small_disk(tmp_path / "disk", 8) as disk:
        out = disk / "run"
        args = tiny_args(tiny_data, out, "--schedule.epochs=6", "--checkpoint.every_n_minutes=null")
        args = [a for a in args if not a.startswith("--checkpoint.every_n_steps")]
        proc = launch(args)
        seen: list[str] = []
        try:
            _wait_line(proc, r"step 2/", 300, seen)
            _fill(disk)
            rest, _ = proc.communicate(timeout=300)
            ended = time.monotonic()
            while run_processes(proc.run_tag) and time.monotonic() - ended < 30:
                time.sleep(0.5)
            left = run_processes(proc.run_tag)
        finally:
            if proc.poll() is None or run_processes(proc.run_tag):
                kill_run(proc)
        log = "".join(seen) + rest
        assert not left, f"processes left: {sorted(left)}"
        errors = [line for line in log.splitlines() if line.startswith("error: cannot append to")]
        assert len(errors) == 1, log[-3000:]
        assert re.search(r"metrics\.(jsonl|csv): No space left on device at step \d+", errors[0]), errors[0]
        assert "mixmo_dist/" not in log.split("error: cannot append", 1)[1], log[-3000:]  # no rank's traceback
        rows = (out / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(row) for row in rows) and rows[-1].endswith("}")
        assert (out / "metrics.csv").read_text().endswith("\n")
        failed_at = int(re.search(r"at step (\d+)", errors[0]).group(1))
        last_step = max(int(k) for k in re.findall(r"step (\d+)/54", log))
        assert 2 < failed_at and last_step <= failed_at + 1, (failed_at, last_step)  # stopped at the next step


def test_a_rank_aborted_by_the_backend_leaves_its_python_stacks(tmp_path):
    """NCCL's watchdog ends a rank whose collective timed out with SIGABRT, before any Python handler runs (CUDA
    only, so shown here with the signal itself): the rank's stacks still reach stacks/rank_<R>.txt."""
    code = (
        "from pathlib import Path; import os, signal\n"
        "from mixmo_dist.runtime.faults import FaultState\n"
        f"st = FaultState(rank=3, stacks_dir=Path({str(tmp_path)!r}) / 'stacks')\n"
        "st.enable_crash_stacks()\n"
        "def waiting_in_a_collective():\n"
        "    os.kill(os.getpid(), signal.SIGABRT)\n"
        "waiting_in_a_collective()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=train_env(), capture_output=True, text=True)
    assert res.returncode == -signal.SIGABRT
    stacks = (tmp_path / "stacks" / "rank_3.txt").read_text()
    assert "Fatal Python error: Aborted" in stacks and "waiting_in_a_collective" in stacks
