"""Nothing a run started outlives it: after SIGKILL of a rank, of the launcher or of the launcher's process group,
every process of the run (ranks, DataLoader workers, their forkserver) is gone within 10 s.

`launch` gives each run a unique tag in its environment; every process it starts inherits that environment (the
forkserver is exec'd with it, workers are forked from the forkserver), so the process table is searched for the tag.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_run, launch, run_processes, tiny_args

GONE_WITHIN_S = 10.0


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _train_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count('"split": "train"') if path.exists() else 0


def _exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _is_trainer(pid: int) -> bool:
    try:
        return b"mixmo_dist.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _start(tiny_data: Path, out: Path, nproc: int):
    args = tiny_args(
        tiny_data,
        out,
        "--data.num_workers=2",
        "--schedule.epochs=50",
        "--checkpoint.every_n_steps=1000",
        "--eval.every_n_epochs=1000",
    )
    proc = launch(args, nproc=nproc)
    try:
        _wait_for(lambda: _train_rows(out) >= 2, 300, "two training steps")
        # Ranks, each with a forkserver and 2 train workers, are running now.
        procs = _wait_for(lambda: (p := run_processes(proc.run_tag)) and len(p) >= nproc * 4 and p, 60, "the workers")
    except BaseException:
        kill_run(proc)
        raise
    return proc, procs


@pytest.mark.parametrize(
    ("nproc", "victim"),
    [(1, "rank"), (2, "rank 1"), (2, "launcher"), (2, "process group")],
)
def test_nothing_outlives_a_sigkill(tiny_data, tmp_path, nproc, victim):
    proc, procs = _start(tiny_data, tmp_path / "run", nproc)
    try:
        if victim == "rank":
            os.kill(proc.pid, signal.SIGKILL)  # one process: the launched process is the rank
        elif victim == "rank 1":
            # Workers and forkservers inherit the rank's environment; the rank is the one running the trainer.
            (rank1,) = [pid for pid, env in procs.items() if env.get("RANK") == "1" and _is_trainer(pid)]
            os.kill(rank1, signal.SIGKILL)
        elif victim == "launcher":
            os.kill(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher leads its own group (start_new_session)
        t0 = time.monotonic()
        left = {}
        while time.monotonic() - t0 < GONE_WITHIN_S:
            left = run_processes(proc.run_tag)
            if not left:
                break
            time.sleep(0.2)
        assert not left, f"after {GONE_WITHIN_S:.0f} s these processes of the run are still alive: " + "; ".join(
            f"{pid} {Path(f'/proc/{pid}/cmdline').read_bytes()[:120]!r}"
            for pid in left
            if Path(f"/proc/{pid}").exists()
        )
    finally:
        kill_run(proc)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
